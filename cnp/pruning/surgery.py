"""Structural filter removal for :class:`cnp.models.VGG` (stage 3's "prune").

Removing filter ``f`` of conv ``i`` drops row ``f`` of that conv's weight and bias and input
channel ``f`` of the next conv; after the last conv it drops the ``pool_size**2`` columns of
``fc6`` that read channel ``f``. All filters of a step are removed in one vectorised
``index_select`` per layer; the model keeps its layer names (modules are replaced in place in
``model.features``). A removed network equals the *masked* network (weight and bias of the
pruned filters zeroed) to float precision.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from cnp.io import CNPError
from cnp.models import VGG


def _conv_positions(model: VGG) -> list[int]:
    return [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]


def _new_conv(old: nn.Conv2d, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> nn.Conv2d:
    w = old.weight.detach()
    b = old.bias.detach() if old.bias is not None else None
    if out_keep is not None:
        w = w.index_select(0, out_keep)
        b = b.index_select(0, out_keep) if b is not None else None
    if in_keep is not None:
        w = w.index_select(1, in_keep)
    # made without a random initialisation, directly where the weights live (the weights are
    # overwritten below; initialising fc6-sized layers on the CPU costs ~0.5 s per step at 224 px)
    new = torch.nn.utils.skip_init(nn.Conv2d, w.shape[1], w.shape[0], old.kernel_size, stride=old.stride,
                                   padding=old.padding, dilation=old.dilation, bias=b is not None,
                                   device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


@torch.no_grad()
def remove_filters(model: VGG, remove: Mapping[int, torch.Tensor | list[int]]) -> VGG:
    """Physically remove filters, in place.

    Parameters
    ----------
    model : VGG
        The network (modified in place and returned).
    remove : mapping conv index (0..12) -> filter indices
        Filters to remove in each conv (indices into the *current* widths).

    Raises
    ------
    CNPError
        For an index out of range or a layer that would lose all its filters.
    """
    positions = _conv_positions(model)
    keeps: dict[int, torch.Tensor] = {}
    for ci, idx in remove.items():
        if not 0 <= ci < len(positions):
            raise CNPError(f"conv index {ci} outside 0..{len(positions) - 1}")
        conv = model.features[positions[ci]]
        idx = torch.as_tensor(idx, dtype=torch.long).unique()
        if idx.numel() == 0:
            continue
        if idx.min() < 0 or idx.max() >= conv.out_channels:
            raise CNPError(f"filter index out of range for conv {ci} with {conv.out_channels} filters")
        mask = torch.ones(conv.out_channels, dtype=torch.bool)
        mask[idx] = False
        if not mask.any():
            raise CNPError(f"removing all {conv.out_channels} filters of conv {ci} would disconnect the network")
        keeps[ci] = torch.nonzero(mask).flatten().to(conv.weight.device)
    for ci, keep in keeps.items():
        pos = positions[ci]
        model.features[pos] = _new_conv(model.features[pos], None, keep)
        if ci + 1 < len(positions):
            nxt = positions[ci + 1]
            model.features[nxt] = _new_conv(model.features[nxt], keep, None)
        else:
            fc = model.classifier[0]
            size = model.avgpool.output_size
            p2 = size * size if isinstance(size, int) else size[0] * size[1]
            cols = (keep[:, None] * p2 + torch.arange(p2, device=keep.device)[None]).flatten()
            new = torch.nn.utils.skip_init(nn.Linear, cols.numel(), fc.out_features, device=fc.weight.device,
                                           dtype=fc.weight.dtype)
            new.weight.copy_(fc.weight.index_select(1, cols))
            new.bias.copy_(fc.bias)
            model.classifier[0] = new
    return model


@torch.no_grad()
def mask_filters(model: VGG, remove: Mapping[int, torch.Tensor | list[int]]) -> VGG:
    """Zero weight and bias of the given filters, in place (the masked equivalent of removal)."""
    convs = model.convs
    for ci, idx in remove.items():
        idx = torch.as_tensor(idx, dtype=torch.long)
        convs[ci].weight[idx] = 0
        if convs[ci].bias is not None:
            convs[ci].bias[idx] = 0
    return model
