"""The prunable structure of a CNN: channel groups, their widths, their physical removal.

Stage 3 ranks and removes *filters*. In a plain chain of convolutions (VGG-16) a filter is one
output channel of one convolution. In a network with residual connections (ResNet) the output
channels of several convolutions are added together, so they can only be removed together: a
*channel group* is the set of convolutions whose output channels are coupled, and one "filter"
of the group is one channel in all of them. Both cases share one interface:

* :class:`VGGStructure` - the paper's VGG-16 (:class:`cnp.models.VGG`), one group per conv,
  removed by :func:`cnp.pruning.surgery.remove_filters` (the layer names are kept);
* :class:`GraphStructure` - any other CNN (torchvision's VGG family with or without BatchNorm,
  ResNets, your own), groups and removal from Torch-Pruning's dependency graph.

:func:`prunable_structure` picks the right one. The concept layer (a context site such as the
virtual layer) is never part of the graph: Torch-Pruning's tracing does not handle its matmul, so
the graph is built on the model with every site disabled; ranking uses the layer, removal does
not need it. The group that feeds the DRSA layer is protected by name (its width is the
dimension D of the subspaces).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from cnp.io import CNPError
from cnp.models import VGG, get_layer, resolve_layer_name


class VGGStructure:
    """One channel group per convolution of a :class:`cnp.models.VGG` (the paper's network).

    Removal goes through Torch-Pruning's dependency graph like any other model (it gives the
    same weights, to the bit, as the hand-written :func:`cnp.pruning.surgery.remove_filters`,
    which the tests keep as a reference); the layer names and :attr:`cnp.models.VGG.arch` stay.
    """

    def __init__(self, model: VGG, image_size: int = 224) -> None:
        self.model = model
        self.image_size = image_size
        self._graph: GraphStructure | None = None

    def _names(self) -> dict[nn.Module, str]:
        return {m: n for n, m in self.model.named_modules()}

    @property
    def members(self) -> list[list[str]]:
        """Per group, the convolutions whose output channels it holds (one each here)."""
        names = self._names()
        return [[names[c]] for c in self.model.convs]

    @property
    def names(self) -> list[str]:
        """A name per group (its first convolution)."""
        return [m[0] for m in self.members]

    @property
    def widths(self) -> list[int]:
        return list(self.model.conv_widths)

    def group_of(self, layer: str) -> int:
        """Index of the group that a convolution (or, for any layer, the last conv before it) is in."""
        conv = _feeding_conv(self.model, layer)
        return next(i for i, c in enumerate(self.model.convs) if c is conv)

    def remove(self, chosen: Mapping[int, torch.Tensor | Sequence[int]]) -> None:
        """Remove the chosen channels (group index -> channel indices), in place."""
        convs = self.model.convs
        for ci, idx in chosen.items():
            if not 0 <= ci < len(convs):
                raise CNPError(f"conv index {ci} outside 0..{len(convs) - 1}")
            idx = torch.as_tensor(idx, dtype=torch.long).unique()
            if idx.numel() and (idx.min() < 0 or idx.max() >= convs[ci].out_channels):
                raise CNPError(f"filter index out of range for conv {ci} with {convs[ci].out_channels} filters")
        if self._graph is None:
            p = next(self.model.parameters())
            self._graph = GraphStructure(self.model, torch.zeros(1, 3, self.image_size, self.image_size,
                                                                 device=p.device, dtype=p.dtype))
            if self._graph.members != self.members:
                raise CNPError("Torch-Pruning's channel groups of this VGG differ from its convolutions")
        self._graph.remove(chosen)

    def mask(self, chosen: Mapping[int, torch.Tensor | Sequence[int]]) -> None:
        """Zero the chosen channels' weights and biases (the masked equivalent of :meth:`remove`)."""
        from cnp.pruning.surgery import mask_filters

        mask_filters(self.model, chosen)

    @property
    def arch(self) -> dict:
        return self.model.arch

    def rebuild(self, arch: dict) -> VGG:
        """A new model of the recorded architecture (random weights: load a state dict into it)."""
        from cnp.models import vgg_from_arch

        return vgg_from_arch(arch)


class GraphStructure:
    """Channel groups and removal of any CNN from Torch-Pruning's dependency graph.

    Parameters
    ----------
    model : nn.Module
        The network (pruned in place by :meth:`remove`). Context sites attached to it (the virtual
        concept layer, a kept ablation) are disabled while the graph is traced.
    example_input : torch.Tensor
        One input batch (e.g. ``torch.zeros(1, 3, S, S)``) for the tracing.

    Notes
    -----
    A group is rooted at a convolution's output channels; its members are every convolution
    whose output channels Torch-Pruning couples with them (a ResNet stage's ``conv2`` /
    ``conv3`` outputs and its ``downsample`` convolution). Removing a channel of a group removes
    it from every member, from the BatchNorm layers after them and from the inputs of every layer
    that reads them.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor) -> None:
        import torch_pruning as tp

        from cnp.lrp import find_sites

        self.model = model
        self._tp = tp
        sites = find_sites(model)
        was = [s.enabled for s in sites]
        for s in sites:
            s.enabled = False
        training = model.training
        model.eval()
        try:
            # the sites are not called while disabled; they are listed so that the graph leaves
            # their tensors (U, mean) alone
            self.graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, ignored_layers=sites or None)
        except Exception as exc:  # noqa: BLE001 - any tracing failure: say what to do
            raise CNPError(f"Torch-Pruning could not trace this model ({type(exc).__name__}: {exc}); "
                           "pass a model whose forward is plain torch code") from exc
        finally:
            for s, w in zip(sites, was):
                s.enabled = w
            model.train(training)
        names = {m: n for n, m in model.named_modules()}
        roots, members = [], []
        seen: set[str] = set()
        for group in self.graph.get_all_groups(root_module_types=[nn.Conv2d]):
            convs = [names[it.dep.target.module] for it in group
                     if it.dep.handler == tp.prune_conv_out_channels and it.dep.target.module in names
                     and isinstance(it.dep.target.module, nn.Conv2d)]
            convs = [c for c in dict.fromkeys(convs) if c not in seen]
            if not convs:
                continue
            seen.update(convs)
            roots.append(names[group[0].dep.target.module])
            members.append(convs)
        # groups in forward order of their first convolution
        order = {n: i for i, (n, m) in enumerate(model.named_modules())}
        ranked = sorted(range(len(roots)), key=lambda i: min(order[c] for c in members[i]))
        self._roots = [roots[i] for i in ranked]
        self._members = [sorted(members[i], key=order.get) for i in ranked]

    @property
    def members(self) -> list[list[str]]:
        return [list(m) for m in self._members]

    @property
    def names(self) -> list[str]:
        return list(self._roots)

    def _module(self, name: str) -> nn.Module:
        return dict(self.model.named_modules())[name]

    @property
    def widths(self) -> list[int]:
        return [int(self._module(m[0]).out_channels) for m in self._members]

    def group_of(self, layer: str) -> int:
        conv = _feeding_conv(self.model, layer)
        name = {m: n for n, m in self.model.named_modules()}[conv]
        for i, mem in enumerate(self._members):
            if name in mem:
                return i
        raise CNPError(f"the convolution {name} before {layer!r} is in no prunable channel group")

    def _check(self, chosen) -> dict[int, list[int]]:
        out = {}
        widths = self.widths
        for gi, idx in chosen.items():
            if not 0 <= gi < len(widths):
                raise CNPError(f"channel group {gi} outside 0..{len(widths) - 1}")
            idx = sorted({int(i) for i in torch.as_tensor(idx).flatten().tolist()})
            if not idx:
                continue
            if idx[0] < 0 or idx[-1] >= widths[gi]:
                raise CNPError(f"channel index out of range for group {gi} ({self._roots[gi]}) with {widths[gi]} channels")
            if len(idx) >= widths[gi]:
                raise CNPError(f"removing all {widths[gi]} channels of group {gi} ({self._roots[gi]}) would "
                               "disconnect the network")
            out[gi] = idx
        return out

    @torch.no_grad()
    def remove(self, chosen: Mapping[int, torch.Tensor | Sequence[int]]) -> None:
        """Remove the chosen channels (group index -> channel indices, current numbering), in place."""
        tp = self._tp
        for gi, idx in self._check(chosen).items():
            root = self._module(self._members[gi][0])
            group = self.graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs=idx)
            group.prune()

    @torch.no_grad()
    def mask(self, chosen: Mapping[int, torch.Tensor | Sequence[int]]) -> None:
        """Zero the chosen channels where the network produces them: the masked equivalent of
        :meth:`remove` (the members' weights and biases, and the BatchNorm after each member)."""
        tp = self._tp
        for gi, idx in self._check(chosen).items():
            root = self._module(self._members[gi][0])
            group = self.graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs=idx)
            for it in group:
                m, h, ids = it.dep.target.module, it.dep.handler, it.idxs
                if h == tp.prune_conv_out_channels:
                    m.weight[ids] = 0
                    if m.bias is not None:
                        m.bias[ids] = 0
                elif h == tp.prune_batchnorm_out_channels and m.affine:
                    m.weight[ids] = 0
                    m.bias[ids] = 0

    @property
    def arch(self) -> dict:
        """The group widths, by group name: with the unpruned model, enough to rebuild the network."""
        return {"kind": "graph", "widths": dict(zip(self._roots, self.widths))}

    def rebuild(self, arch: dict, template: nn.Module, example_input: torch.Tensor) -> nn.Module:
        """A copy of ``template`` (the unpruned model) shrunk to the widths in ``arch``.

        The weights are those of the template's kept channels: load the pruned state dict into
        the result. Used to resume a schedule from a checkpoint.
        """
        import copy

        model = copy.deepcopy(template)
        struct = GraphStructure(model, example_input)
        widths = arch.get("widths", {})
        chosen = {}
        for gi, (name, w) in enumerate(zip(struct.names, struct.widths)):
            want = int(widths.get(name, w))
            if want < w:
                chosen[gi] = list(range(want, w))
        struct.remove(chosen)
        return model


def _feeding_conv(model: nn.Module, layer: str) -> nn.Conv2d:
    """The convolution that last runs before ``layer``'s output is complete (the one whose
    channels ``layer`` outputs: ``conv4_3`` for ``relu4_3``, ``layer3.1.conv2`` for a ResNet-18's
    ``layer3``)."""
    host = get_layer(model, layer)
    if isinstance(model, VGG):
        feeding = None
        for m in model.features:
            if isinstance(m, nn.Conv2d):
                feeding = m
            if m is host:
                break
        if feeding is None:
            raise CNPError(f"no convolution precedes {layer!r}")
        return feeding
    last: list[nn.Module] = []
    found: list[nn.Module] = []
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles = [c.register_forward_pre_hook(lambda m, i: last.append(m)) for c in convs]
    handles.append(host.register_forward_hook(lambda m, i, o: found.append(last[-1]) if last and not found else None))
    p = next(model.parameters())
    conv0 = convs[0] if convs else None
    if conv0 is None:
        raise CNPError("the model has no convolution to prune")
    x = torch.zeros(1, conv0.in_channels, 32, 32, device=p.device, dtype=p.dtype)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            _run_for_size(model, x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if not found:
        raise CNPError(f"no convolution runs before {resolve_layer_name(model, layer)!r}")
    return found[0]


def _run_for_size(model: nn.Module, x: torch.Tensor) -> None:
    """A forward pass at 32 px, or at 224 px when the model needs larger inputs."""
    try:
        model(x)
    except RuntimeError:
        model(torch.zeros(1, x.shape[1], 224, 224, device=x.device, dtype=x.dtype))


def prunable_structure(model: nn.Module, image_size: int = 224) -> VGGStructure | GraphStructure:
    """The channel groups of ``model``: :class:`VGGStructure` for the paper's VGG-16 layout,
    :class:`GraphStructure` (Torch-Pruning) for any other CNN."""
    if isinstance(model, VGG):
        return VGGStructure(model, image_size)
    p = next(model.parameters())
    conv0 = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv0 is None:
        raise CNPError("the model has no convolution to prune")
    x = torch.zeros(1, conv0.in_channels, image_size, image_size, device=p.device, dtype=p.dtype)
    return GraphStructure(model, x)


__all__ = ["GraphStructure", "VGGStructure", "prunable_structure"]
