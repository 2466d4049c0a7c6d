"""CNP on your own model and data: the stages of the paper as functions of a model, a layer and data.

Every function here is the one the notebooks and the sweep run (they reach it through
:mod:`cnp.pipeline`, which adds the run directory and its cache); nothing is computed a second
way. Data are :class:`~cnp.data.splits.Split` objects (uint8 images with class labels, watermark
flags and optional watermark masks); :func:`as_split` makes one from tensors, a
``torch.utils.data.Dataset`` or a ``DataLoader``, and :func:`pair_data` bundles the five splits
the paper uses (``train``, ``drsa``, ``rank``, ``val``, ``test``).

The model is any classification CNN: the paper's VGG-16 (:class:`cnp.models.VGG`),
torchvision's VGG family with or without BatchNorm, ResNets, or your own network of Conv2d /
BatchNorm / ReLU / pooling / Linear layers. Inputs are normalised with the ImageNet mean and
standard deviation inside ``cnp`` (pass unnormalised images).

Example
-------
>>> import cnp, torchvision                                         # doctest: +SKIP
>>> data = cnp.benchmark_pair("carton-dugong", seed=0)              # or cnp.pair_data(...)
>>> model = torchvision.models.resnet18(num_classes=2)              # your trained model
>>> warm = cnp.warm_up(model, data).model                           # new 2-way head
>>> fit = cnp.fit_concepts(warm, data["drsa"], layer="layer3", K=4)  # DRSA subspaces U_k
>>> vl = cnp.insert_virtual_layer(warm, fit.U, K=4, layer="layer3")
>>> ap = cnp.latent_analysis(cnp.concept_relevance(warm, vl, data["val"].positives()),
...                          data["val"].positives().wm)
>>> ablated = cnp.propose_ablation(ap)                              # K'
>>> vl.set_ablation(ablated); state = vl.state(); cnp.remove_virtual_layer(warm)
>>> res = cnp.prune(warm, data, "cnp", layer="layer3", concept_state=state)
>>> res.curve[-1]["acc"]["c0w1"]                                    # the OOD subgroup
>>> cnp.export_model(res.model, "pruned", image_size=data.image_size)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnp.data.splits import PairData, Split
from cnp.io import CNPError, atomic_write_json
from cnp.models import count_macs, count_params
from cnp.runtime import set_memory_format

SPLIT_NAMES = ("train", "drsa", "rank", "val", "test")


# ------------------------------------------------------------------------------------ data
def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise CNPError(f"images must be uint8 (0..255) or float (0..1), got {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise CNPError(f"float images must lie in 0..1 (unnormalised; cnp normalises them itself), got values "
                       f"in [{lo:.3g}, {hi:.3g}]: drop the Normalize transform, or pass uint8 images")
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


def _unpack(item) -> tuple[torch.Tensor, Any, Any, Any]:
    if isinstance(item, Mapping):
        return item["image"], item["label"], item.get("watermark", item.get("wm")), item.get("mask")
    if isinstance(item, list | tuple):
        if len(item) < 2:
            raise CNPError("a dataset item must be (image, label), (image, label, watermark) or "
                           "(image, label, watermark, mask), or a dict with 'image' and 'label'")
        item = list(item) + [None] * (4 - len(item))
        return item[0], item[1], item[2], item[3]
    raise CNPError(f"cannot read a dataset item of type {type(item).__name__}: use (image, label[, watermark[, mask]])")


def as_split(data, labels=None, watermark=None, masks=None, *, name: str = "data") -> Split:
    """A :class:`~cnp.data.splits.Split` from tensors, a ``Dataset`` or a ``DataLoader``.

    Parameters
    ----------
    data : torch.Tensor, Dataset, DataLoader or Split
        Images (n, 3, H, W), uint8 0..255 or float 0..1 (unnormalised); or a dataset / loader
        whose items (batches) are ``(image, label)``, ``(image, label, watermark)``,
        ``(image, label, watermark, mask)`` or dicts with keys ``image``, ``label`` and optionally
        ``watermark``, ``mask``. A Split is returned as it is.
    labels : tensor of int, optional
        Class labels (1 = the positive class, 0 = the negative) when ``data`` is a tensor.
    watermark : tensor of bool, optional
        Whether each image carries the spurious feature (default: unknown, all False).
    masks : tensor of bool (n, H, W), optional
        Its pixels, for the share-of-relevance metrics (default: all False).
    name : str
        The split's name.

    Raises
    ------
    CNPError
        Mismatched lengths, labels outside {0, 1}, normalised float images, unreadable items.
    """
    if isinstance(data, Split):
        return data
    if isinstance(data, torch.Tensor):
        images = data
    else:
        imgs, labs, wms, msks = [], [], [], []
        batched = isinstance(data, torch.utils.data.DataLoader)
        for item in data:
            x, y, w, m = _unpack(item)
            x = torch.as_tensor(x)
            if not batched:
                x, y = x[None], torch.as_tensor(y).reshape(1)
                w = None if w is None else torch.as_tensor(w).reshape(1)
                m = None if m is None else torch.as_tensor(m)[None]
            imgs.append(_to_uint8(x))
            labs.append(torch.as_tensor(y).reshape(-1))
            wms.append(None if w is None else torch.as_tensor(w).reshape(-1).bool())
            msks.append(None if m is None else torch.as_tensor(m).bool())
        if not imgs:
            raise CNPError(f"the {name} data are empty")
        images = torch.cat(imgs)
        labels = torch.cat(labs)
        if all(w is not None for w in wms):
            watermark = torch.cat(wms)
        if all(m is not None for m in msks):
            masks = torch.cat(msks)
    images = _to_uint8(images)
    n = images.shape[0]
    if images.ndim != 4 or images.shape[1] != 3:
        raise CNPError(f"images must be (n, 3, H, W), got {tuple(images.shape)}")
    if labels is None:
        raise CNPError("labels are needed with image tensors: as_split(images, labels)")
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.numel() != n:
        raise CNPError(f"{labels.numel()} labels for {n} images")
    if n and not bool(((labels == 0) | (labels == 1)).all()):
        raise CNPError("labels must be 0 (negative class) or 1 (positive class)")
    wm = torch.zeros(n, dtype=torch.bool) if watermark is None else torch.as_tensor(watermark).bool().reshape(-1)
    if wm.numel() != n:
        raise CNPError(f"{wm.numel()} watermark flags for {n} images")
    known = masks is not None
    m = torch.zeros(n, images.shape[2], images.shape[3], dtype=torch.bool) if masks is None else torch.as_tensor(masks).bool()
    if tuple(m.shape) != (n, images.shape[2], images.shape[3]):
        raise CNPError(f"masks must be (n, H, W) = {(n, images.shape[2], images.shape[3])}, got {tuple(m.shape)}")
    return Split(images=images.contiguous(), labels=labels, wm=wm, masks=m, name=name,
                 meta={"masks_known": known})


def pair_data(train, test, *, drsa=None, rank=None, val=None, positive: str = "positive",
              negative: str = "negative", pair: str = "custom") -> PairData:
    """The five splits of the paper as a :class:`~cnp.data.splits.PairData`.

    Each argument is anything :func:`as_split` reads. ``drsa`` and ``rank`` default to the
    training split (the paper learns the subspaces and ranks filters on training images of the
    positive class); ``val`` defaults to ``test`` (then nothing is selected on held-out data:
    pass a separate validation set when you choose settings).
    """
    tr = as_split(train, name="train")
    splits = {"train": tr, "drsa": as_split(drsa, name="drsa") if drsa is not None else replace(tr, name="drsa"),
              "rank": as_split(rank, name="rank") if rank is not None else replace(tr, name="rank"),
              "val": None, "test": as_split(test, name="test")}
    splits["val"] = as_split(val, name="val") if val is not None else replace(splits["test"], name="val")
    sizes = {s.images.shape[2:] for s in splits.values()}
    if len(sizes) != 1:
        raise CNPError(f"every split must have the same image size, got {sorted(sizes)}")
    return PairData(pair=pair, positive=positive, negative=negative, splits=splits, meta={"source": "pair_data"})


def benchmark_pair(pair: str = "carton-dugong", seed: int = 0, **overrides) -> PairData:
    """The embedded watermark benchmark's pair (generated, cached): the notebooks' default data.

    ``overrides``: any data parameter of :class:`cnp.pipeline.Params` (``image_size``,
    ``n_train_per_class``, ``wm_text`` ...).
    """
    from cnp.pipeline import load_data, make_params

    return load_data(make_params(pair=pair, seed=seed, dataset="synthetic", **overrides))


def benchmark_backbone(**overrides) -> nn.Module:
    """The embedded benchmark's pretrained VGG-16-topology backbone (built once, cached)."""
    from cnp.pipeline import load_pretrained, make_params

    return load_pretrained(make_params(dataset="synthetic", **overrides))


def folder_pair(manifest: str | os.PathLike, root: str | os.PathLike | None = None, seed: int = 0,
                **kwargs) -> PairData:
    """The splits of a pair of classes of an image folder, from its manifest.

    ``manifest``: a file written by ``python -m cnp.data manifest`` (any two classes of an
    ``ImageFolder`` or ImageNet tree), by :func:`example_folder`, or a packaged pair's name.
    ``root``: the image tree (default: the manifest's). ``kwargs`` go to
    :func:`cnp.data.imagenet.build_pair` (``label_csv``, ``masks``, ``sizes``, ``overlay`` ...).
    """
    from cnp.data.imagenet import build_pair

    return build_pair(manifest, root, seed=seed, **kwargs)


def example_folder(out_dir: str | os.PathLike, pair: str = "carton-dugong", seed: int = 0, *,
                   smoke: bool = False, image_format: str = "jpeg") -> Path:
    """The embedded benchmark written out as an image folder (JPEG images, label CSV, mask PNGs,
    split file, manifest), or the existing one in ``out_dir``; returns its manifest file."""
    manifest = Path(out_dir) / "manifest.json"
    if manifest.is_file():
        return manifest
    from cnp.data.folder import export_synthetic

    return export_synthetic(out_dir, pair, seed, smoke=smoke, image_format=image_format)


def backbone(arch: str = "vgg16", *, layer: str = "", weights: str = "", weights_path: str = "",
             num_classes: int | None = None, allow_download: bool = False, smoke: bool = False) -> nn.Module:
    """A model to apply CNP to: torchvision weights (by name or file) or, with neither given, the
    architecture pretrained on the embedded corpus (cached; ``layer`` is the DRSA layer its
    watermark head reads, e.g. ``layer3``; ``smoke``: the tiny pretraining of the smoke settings)."""
    if weights or weights_path:
        from cnp.models import load_torchvision_model

        return load_torchvision_model(arch, weights or None, weights_path=weights_path or None,
                                      allow_download=allow_download, num_classes=num_classes)
    overrides = {"layer": layer} if layer else {}
    return benchmark_backbone(arch=arch, smoke=smoke, **overrides)


# ------------------------------------------------------------------------------------ prune
def prune(model: nn.Module, data: PairData, method: str = "cnp", *, layer: str,
          concept_state: dict | None = None, config=None, seed: int = 0, device: str | torch.device = "cpu",
          run_dir: str | os.PathLike | None = None, verbose: bool = True, **config_overrides):
    """The paper's iterative pruning schedule for one method (:func:`cnp.pruning.run_pruning`).

    Parameters
    ----------
    model : nn.Module
        The warmed-up binary model (not modified; a copy is pruned).
    data : PairData
        ``train`` (fine-tuning), ``rank`` (ranking), ``drsa``, ``val`` and ``test``.
    method : str
        ``cnp`` (the paper), ``vanilla`` (LRP pruning without the concept layer), ``l1``,
        ``random``, or a named variant beyond the paper (:data:`cnp.pruning.METHOD_SPECS`).
    layer : str
        The DRSA layer (a module name such as ``features.22`` or ``layer3``): the channels that
        feed it are never pruned (their number is the subspaces' dimension D).
    concept_state : dict
        :meth:`cnp.virtual_layer.VirtualLayer.state` with the ablated set K' (concept methods).
    config : PruneConfig, optional
        Schedule settings (default: the paper's Appendix A.1); ``config_overrides`` replace
        single fields (``target=0.5``, ``epochs_per_step=1`` ...).

    Returns
    -------
    PruneResult
        ``model`` (pruned, concept layer removed), ``curve`` (one entry per step: accuracy per
        subgroup, shares, MACs, parameters), ``timings``.
    """
    from cnp.pruning import PruneConfig, run_pruning

    default = PruneConfig()
    cfg = config or default
    # the DRSA layer is always protected; a config's own protect list is kept unless it is the
    # default one (VGG-16's conv4_3), which another architecture does not have
    protect = (layer,) if cfg.protect == default.protect else tuple(dict.fromkeys((*cfg.protect, layer)))
    cfg = replace(cfg, protect=protect, **config_overrides)
    return run_pruning(model, data, method, cfg, concept_state=concept_state, seed=seed, device=device,
                       run_dir=run_dir, verbose=verbose)


def result_rows(results: Mapping[str, Any], unpruned: Mapping[str, float] | None = None) -> list[dict]:
    """One row per method (after the final fine-tune; the unpruned model first when given):
    accuracy overall and per subgroup on the test split, filters, MACs and parameters."""
    rows = []
    if unpruned is not None:
        rows.append({"model": "unpruned", **{k: f"{v:.3f}" for k, v in unpruned.items()},
                     "filters": "", "MMACs": "", "params": ""})
    for method, res in results.items():
        last = res.curve[-1]
        rows.append({"model": method, **{k: f"{v:.3f}" for k, v in last["acc"].items()},
                     "filters": f"{last['filters']:,}", "MMACs": f"{last['macs'] / 1e6:,.1f}",
                     "params": f"{last['params']:,}"})
    return rows


# ------------------------------------------------------------------------------------ export
def export_model(model: nn.Module, path: str | os.PathLike, image_size: int, *,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Save a (pruned) model so that it loads without ``cnp``.

    Writes, each atomically (temporary file, then rename):

    * ``<path>.pt2``: a ``torch.export`` program: ``torch.export.load(f).module()`` is a plain
      torch module (no ``cnp``, no torchvision needed) that takes normalised (n, 3, S, S) inputs;
    * ``<path>.state.pt``: the state dict with the architecture recorded (the per-layer widths;
      for :class:`cnp.models.VGG` its ``arch``, rebuilt by :func:`cnp.models.vgg_from_arch`);
    * ``<path>.json``: MACs and parameter count at ``image_size``, input size and normalisation.

    A kept ablation (``cnp-keep``) is part of the exported program; the virtual layer, when
    still attached, is removed from the copy that is exported.

    Returns
    -------
    dict with the keys ``program``, ``state``, ``info`` and the written paths.
    """
    import copy

    from cnp.images import IMAGENET_MEAN, IMAGENET_STD
    from cnp.io import atomic_torch_save
    from cnp.models import VGG
    from cnp.virtual_layer import get_kept_ablation, remove_virtual_layer

    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    # NCHW weights: the exported program and state dict do not carry the run's memory layout
    m = set_memory_format(copy.deepcopy(model).cpu().eval(), "contiguous")
    remove_virtual_layer(m)
    kept = get_kept_ablation(m)
    x = torch.zeros(2, 3, image_size, image_size)
    try:  # any batch size
        program = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=1 << 16)},))
    except Exception as exc:  # noqa: BLE001 - say what failed and what still works
        raise CNPError(f"torch.export could not trace the model ({type(exc).__name__}: {exc}); "
                       "save model.state_dict() instead") from exc
    prog_path = base.with_name(base.name + ".pt2")
    tmp = prog_path.with_name(f".{base.name}.{os.getpid()}.tmp.pt2")
    torch.export.save(program, str(tmp))
    os.replace(tmp, prog_path)
    widths = {n: int(c.out_channels) for n, c in m.named_modules() if isinstance(c, nn.Conv2d)}
    macs = count_macs(m, image_size)
    extra_macs = 0
    if kept is not None:
        from cnp.pruning.schedule import _feature_size

        h = _feature_size(m, kept._host, image_size)
        extra_macs = kept.extra_macs(h, h)
    info = {
        "format": "cnp-export-1", "image_size": image_size, "input": "normalised RGB (n, 3, S, S)",
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "macs": int(macs + extra_macs), "macs_concept_correction": int(extra_macs), "params": count_params(m),
        "class": f"{type(m).__module__}.{type(m).__qualname__}", "conv_widths": widths,
        "kept_ablation": kept is not None, **dict(extra or {}),
    }
    state = {"state_dict": {k: v.detach().cpu() for k, v in m.state_dict().items()}, "info": info,
             "arch": m.arch if isinstance(m, VGG) else {"kind": "widths", "conv_widths": widths}}
    state_path = atomic_torch_save(base.with_name(base.name + ".state.pt"), state)
    info_path = base.with_name(base.name + ".json")
    atomic_write_json(info_path, info)
    return {"program": prog_path, "state": Path(state_path), "info": info_path}


def load_exported(path: str | os.PathLike) -> nn.Module:
    """The plain torch module of an :func:`export_model` program (``<path>.pt2``)."""
    p = Path(path)
    if p.suffix != ".pt2":
        p = p.with_name(p.name + ".pt2")
    if not p.is_file():
        raise CNPError(f"{p} does not exist: pass the path given to export_model (without suffix) or the .pt2 file")
    return torch.export.load(str(p)).module()


def read_export_info(path: str | os.PathLike) -> dict:
    """The ``<path>.json`` of :func:`export_model` (MACs, parameters, input size)."""
    p = Path(path)
    p = p if p.suffix == ".json" else p.with_name(p.name + ".json")
    return json.loads(p.read_text())


__all__ = ["SPLIT_NAMES", "as_split", "backbone", "benchmark_backbone", "benchmark_pair", "example_folder",
           "export_model", "folder_pair", "load_exported", "pair_data", "prune", "read_export_info", "result_rows"]
