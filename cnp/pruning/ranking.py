"""Filter ranking criteria and the global selection of filters to prune.

LRP criterion (Yeom et al.; the paper's stage 3)
-------------------------------------------------
The relevance of filter ``f`` of a conv is the LRP relevance at that conv's output channel,
aggregated over the ranking images and spatial positions as

* ``aggregation='signed'`` (default): ``score_f = sum R_f``, the plain sum - what the paper's
  code does for LRP-alpha1beta0;
* ``'abs'``: ``sum |R_f|``, Yeom et al.'s code;
* ``'abs_of_sum'``: the sum over images of ``|sum over positions of R_f|`` (PxP).

The explained logit is the positive class (index 1) and the ranking images are the positive
images of the ranking set (``ranking_data='pos'``, the paper) or all of it (``'pos+neg'``).
When the model carries an enabled virtual concept layer, relevance flows through it, so CNP ranks
with the ablated subspaces removed; vanilla LRP pruning ranks the same way without it.

Selection
---------
Scores are normalised per layer (``normalisation``), then ranked globally and the lowest-scoring
filters of the prunable (non-protected) convs are removed, never leaving a layer without filters:

* ``'sum'`` (default): ``v / sum(v)``, what both Yeom et al.'s ``normalize_ranks_per_layer`` and
  the paper's code do. With exact conservation every layer's relevance sums to about the same
  total, so this is close to the raw scores and a filter's score shrinks as 1 / layer width:
  wide layers are pruned more.
* ``'mean'``: ``v / mean(v)`` = ``v * width / sum(v)``, each filter relative to its layer's
  average; it removes the width effect. A variant, neither Yeom's rule nor the paper's.
* ``'none'``: the raw scores.

The rule of the paper's code is ``aggregation='signed', normalisation='sum'``; Yeom et al.'s is
``aggregation='abs', normalisation='sum'``. Baselines behind the same interface: ``l1`` (L1
norm of the filter weights, normalised the same way) and ``random``.
"""

from __future__ import annotations

import torch
from torch import nn

from cnp.data.splits import Split
from cnp.images import normalize_images
from cnp.io import CNPError
from cnp.lrp import LRP, LRPConfig
from cnp.models import VGG, conv_index
from cnp.runtime import progress

CRITERIA = ("lrp", "l1", "random")
AGGREGATIONS = ("abs", "abs_of_sum", "signed")


def _members(model: nn.Module, members: list[list[str]] | None) -> list[list[str]]:
    if members is not None:
        return members
    if isinstance(model, VGG):
        names = {m: n for n, m in model.named_modules()}
        return [[names[c]] for c in model.convs]
    from cnp.pruning.structure import prunable_structure

    return prunable_structure(model).members


def lrp_filter_scores(model: nn.Module, split: Split, *, target: int = 1, ranking_data: str = "pos",
                      aggregation: str = "signed", lrp_config: LRPConfig | None = None, batch_size: int = 64,
                      device: torch.device | str = "cpu", verbose: bool = False,
                      members: list[list[str]] | None = None, lrp: LRP | None = None) -> list[torch.Tensor]:
    """LRP relevance of every filter, aggregated over ``split`` (see the module docstring).

    ``members``: per channel group, the convolutions whose output channels it holds (a
    :class:`~cnp.pruning.structure.GraphStructure`'s ``members``); a group's score per channel is
    the sum over its members. Default: one group per conv of a :class:`~cnp.models.VGG`, else
    the groups of :func:`~cnp.pruning.structure.prunable_structure`. ``lrp``: an :class:`LRP` to
    use (e.g. with your own canonizers or input bounds) instead of ``LRP(model, lrp_config)``.
    """
    if ranking_data not in ("pos", "pos+neg"):
        raise CNPError(f"ranking_data must be 'pos' or 'pos+neg', got {ranking_data!r}")
    if aggregation not in AGGREGATIONS:
        raise CNPError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    device = torch.device(device)
    index = (torch.nonzero(split.labels == 1).flatten() if ranking_data == "pos"
             else torch.arange(len(split)))
    if index.numel() == 0:
        raise CNPError(f"the ranking set has no {'positive ' if ranking_data == 'pos' else ''}images")
    # the split's uint8 images are held on the device (Split.device_images) and the totals are
    # accumulated there (float64): no host transfer or synchronisation per batch
    images = split.device_images(device)
    index = index.to(images.device)
    lrp = lrp if lrp is not None else LRP(model, lrp_config)
    groups = _members(model, members)
    modules = dict(model.named_modules())
    totals = [torch.zeros(modules[g[0]].out_channels, dtype=torch.float64, device=device) for g in groups]
    which = "abs" if aggregation == "abs" else "signed"
    for start in progress(range(0, index.numel(), batch_size), desc="LRP ranking", disable=not verbose):
        x = normalize_images(images[index[start:start + batch_size]], device)
        out = lrp.attribute(x, target, filters=which, input_relevance=False)
        for i, group in enumerate(groups):
            for n in group:
                if aggregation == "abs":
                    v = out.filter_relevance_abs[n].sum(0)
                elif aggregation == "abs_of_sum":
                    v = out.filter_relevance[n].abs().sum(0)
                else:
                    v = out.filter_relevance[n].sum(0)
                totals[i] += v.double()
    return [t.cpu() for t in totals]


def l1_filter_scores(model: nn.Module, members: list[list[str]] | None = None) -> list[torch.Tensor]:
    """L1 norm of each filter's weights (per channel group: summed over the group's convolutions)."""
    modules = dict(model.named_modules())
    return [sum(modules[n].weight.detach().abs().flatten(1).sum(1).double().cpu() for n in g)
            for g in _members(model, members)]


def random_filter_scores(model: nn.Module, generator: torch.Generator,
                         members: list[list[str]] | None = None) -> list[torch.Tensor]:
    """Uniform random scores (selection uniformly at random among prunable filters)."""
    modules = dict(model.named_modules())
    return [torch.rand(modules[g[0]].out_channels, generator=generator, dtype=torch.float64)
            for g in _members(model, members)]


NORMALISATIONS = ("sum", "mean", "none")


def normalise_per_layer(scores: list[torch.Tensor], how: str = "sum") -> list[torch.Tensor]:
    """Per-layer normalisation of filter scores before the global ranking.

    Parameters
    ----------
    scores : list of 1-D tensors
        One score per filter, per conv.
    how : str
        ``sum``: ``v / sum(v)`` (Yeom et al. and the paper's code), signed scores kept signed as
        there; ``mean``: ``v / mean(v)``, signed scores ranked by magnitude; ``none``: raw scores.
        A layer whose scores sum to zero (or, for ``mean``, not above zero) is left as it is.

    Returns
    -------
    list of tensors, the normalised scores (new tensors).
    """
    if how not in NORMALISATIONS:
        raise CNPError(f"normalisation must be one of {NORMALISATIONS}, got {how!r}")
    out = []
    for v in scores:
        if how == "none":
            out.append(v.clone())
            continue
        if how == "sum":
            s = v.sum()
            out.append(v / s if s != 0 else v.clone())
            continue
        v = v.abs() if (v < 0).any() else v
        s = v.sum()
        out.append(v * (v.numel() / s) if s > 0 else v.clone())
    return out


def protected_indices(model: VGG, protect: tuple[str, ...] | list[str]) -> set[int]:
    """Conv indices (0..12) of the protected layers (``conv4_3`` protects the DRSA layer)."""
    return {conv_index(model, name) for name in protect}


def select_filters(scores: list[torch.Tensor], n_remove: int, protected: set[int],
                   min_keep: int = 1, normalise: bool = True,
                   normalisation: str = "sum") -> dict[int, torch.Tensor]:
    """The ``n_remove`` globally lowest-scoring filters of unprotected convs.

    Scores are normalised per layer first (``normalisation``, see :func:`normalise_per_layer`)
    unless ``normalise`` is False.

    Ties are broken by (layer, filter) order, so the selection is deterministic. No layer keeps
    fewer than ``min_keep`` filters.

    Returns
    -------
    dict conv index -> LongTensor of filter indices (current numbering)
    """
    if n_remove < 0:
        raise CNPError(f"cannot remove a negative number of filters ({n_remove})")
    vals = normalise_per_layer(scores, normalisation) if normalise else scores
    layer_ids, filt_ids, flat = [], [], []
    for li, v in enumerate(vals):
        if li in protected:
            continue
        layer_ids.append(torch.full((v.numel(),), li, dtype=torch.long))
        filt_ids.append(torch.arange(v.numel()))
        flat.append(v.double())
    if not flat:
        raise CNPError("every conv layer is protected; nothing can be pruned")
    layer_ids, filt_ids, flat = torch.cat(layer_ids), torch.cat(filt_ids), torch.cat(flat)
    order = torch.argsort(flat, stable=True)
    # Walking the global order and taking a filter unless its layer's budget is spent takes
    # exactly the first n_remove filters, in global order, whose rank *within their layer* (in
    # that order) is below the layer's budget. Computed here without a loop over filters.
    lay = layer_ids[order]
    budget = torch.tensor([int(v.numel()) - min_keep for v in vals], dtype=torch.long)
    rank_in_layer = torch.nn.functional.one_hot(lay, len(vals)).cumsum(0).gather(1, lay[:, None]).squeeze(1) - 1
    eligible = torch.nonzero(rank_in_layer < budget[lay]).flatten()
    taken = min(int(eligible.numel()), n_remove)
    if taken < n_remove:
        raise CNPError(f"only {taken} filters can be removed while keeping {min_keep} per layer; "
                       f"asked for {n_remove} (lower the target pruning rate)")
    pick = order[eligible[:n_remove]]
    pick_layers = layer_ids[pick]
    # layers in the order of their first chosen filter (as the sequential walk filled the dict)
    first = torch.full((len(vals),), n_remove, dtype=torch.long).scatter_reduce(
        0, pick_layers, torch.arange(n_remove), reduce="amin")
    layers = [li for li in torch.argsort(first, stable=True).tolist() if int(first[li]) < n_remove]
    return {li: filt_ids[pick[pick_layers == li]].sort().values for li in layers}


def filter_scores(model: nn.Module, criterion: str, split: Split | None = None,
                  generator: torch.Generator | None = None, members: list[list[str]] | None = None,
                  **lrp_kwargs) -> list[torch.Tensor]:
    """Scores of every filter (channel group) by ``criterion`` (``lrp``, ``l1`` or ``random``)."""
    if criterion == "lrp":
        if split is None:
            raise CNPError("the LRP criterion needs a ranking split")
        return lrp_filter_scores(model, split, members=members, **lrp_kwargs)
    if criterion == "l1":
        return l1_filter_scores(model, members)
    if criterion == "random":
        return random_filter_scores(model, generator or torch.Generator().manual_seed(0), members)
    raise CNPError(f"unknown ranking criterion {criterion!r}; use one of {CRITERIA}")


