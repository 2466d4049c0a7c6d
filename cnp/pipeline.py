"""One run of the paper's pipeline over a run directory: the stages, cached (what the notebooks call).

One run = one (pair, seed, parameters); its directory (default ``runs/<pair>/seed<k>/``) holds
each stage's outputs and, at the end, ``metrics.json``. The stages themselves are the functions
of :mod:`cnp.stages`; this module loads their inputs (the pair's data, the backbone), calls them,
and keeps what they return:

==========  ================================  =====================================
stage       notebook                          writes
==========  ================================  =====================================
warmup      01_warmup                         ``warmup/model.pt``, ``warmup/summary.json``
augment     02_augment (DRSA + virtual layer)  ``augment/concepts.pt``, ``augment/summary.json``
ablate      03_ablate (latent analysis)       ``ablate/summary.json``, ``ablate/heatmaps.pt``
prune       04_prune                          ``prune/prune_<method>.pt``, ``prune/summary.json``
evaluate    05_evaluate                       ``metrics.json``
==========  ================================  =====================================

Every stage records a hash of the parameters it depends on; a stage whose outputs exist with the
same hash is not recomputed (and :func:`cnp.pruning.run_pruning` resumes inside the schedule).
All files are written atomically.

Parameters are validated once, by :func:`make_params`, before any work starts: an unknown name,
a wrong type, K that does not divide the layer's width, an unknown method or a target outside
(0, 1) is reported as one clear line (a :class:`~cnp.io.CNPError`).
"""

from __future__ import annotations

import ast
import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision

from cnp import stages
from cnp.data import imagenet
from cnp.data.imagenet import OVERLAYS, build_pair, check_root, is_manifest_path, load_manifest
from cnp.data.splits import PairData
from cnp.data.synthetic import PAIRS, CorpusConfig, load_pair, pair_config
from cnp.data.watermark import WatermarkStyle
from cnp.drsa import BF16_ARITHMETIC
from cnp.drsa import _resolve_precision as _resolve_drsa_precision
from cnp.io import (
    CNPError,
    atomic_torch_save,
    atomic_write_json,
    load_current,
    recipe_hash,
    safe_torch_load,
    sha256_file,
)
from cnp.lrp import LRPConfig
from cnp.models import (
    FULL_WIDTHS,
    LAYER_NAMES,
    VGG16_IMAGENET_SHA256,
    load_model,
    load_torchvision_model,
    load_torchvision_vgg16,
    paper_name,
    save_model,
    vgg16_weights_file,
)
from cnp.params import BENCHMARK_DEFAULTS, FIELDS, SMOKE, Params
from cnp.pretrain import BackboneConfig, load_backbone, load_torchvision_backbone
from cnp.pruning import PruneConfig, run_pruning
from cnp.pruning.schedule import METHOD_SPECS, METHODS, record_unpruned_evaluation
from cnp.resources import default_run_dir
from cnp.runtime import (
    StageTimer,
    configure_threads,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_memory_format,
    stage_breakdown,
)

DATASETS = ("synthetic", "imagenet", "folder")
STAGES = ("warmup", "augment", "ablate", "prune", "evaluate")
#: The layout of the stage caches: a summary written under another layout (by another version of
#: cnp) is not trusted, and its stage runs again.
CACHE_LAYOUT = 2


# ============================================================================ parameters
def make_params(**overrides: Any) -> Params:
    """Validated :class:`~cnp.params.Params` from flat overrides (strings are converted).

    ``smoke=True`` sets the small sizes of :data:`~cnp.params.SMOKE` where no value is given.
    Calls :meth:`Params.from_flat` for names and types, then checks every value.

    Raises
    ------
    CNPError
        One line naming the first problem: unknown parameter, wrong type, bad value.
    """
    p = Params.from_flat(**overrides)  # names and types
    _validate(p)
    return p


def _choice(name: str, value: Any, allowed, hint: str = "") -> None:
    if value not in allowed:
        raise CNPError(f"{name} must be one of {', '.join(map(str, allowed))}{hint}, got {value!r}")


def _validate(p: Params) -> None:
    """Every value of ``p`` against the data, the network and the methods (the one place)."""
    run, data, model, c = p.run, p.data, p.model, p.concepts
    if run.seed < 0:
        raise CNPError(f"seed must be >= 0, got {run.seed}")
    if run.threads is not None and run.threads < 1:
        raise CNPError(f"threads must be >= 1 (None: $CNP_THREADS, else all cores), got {run.threads}")
    _choice("dataset", data.dataset, DATASETS)
    # data: the pair (a name, or a manifest file for imagenet/folder), the roots, the real-data overlay
    if data.dataset == "synthetic":
        if data.pair not in PAIRS:
            hint = " (a manifest file needs dataset='folder' or 'imagenet')" if is_manifest_path(data.pair) else ""
            raise CNPError(f"unknown pair {data.pair!r}; known pairs: {', '.join(PAIRS)}{hint}")
        if data.overlay != "auto":
            raise CNPError(f"overlay={data.overlay!r} applies to dataset='imagenet' or 'folder' (the synthetic data "
                           "draws its own watermarks with the wm_* style); leave it 'auto'")
    else:
        man = load_manifest(data.pair)  # a packaged pair or a manifest file; CNPError says what is wrong
        if is_manifest_path(data.pair) and not run.run_dir:
            raise CNPError(f"pair={data.pair!r} is a manifest file: set run_dir too (the default runs/<pair>/seed<k> "
                           f"needs a pair name), e.g. run_dir='runs/{man.pair}/seed{run.seed}'")
        if data.dataset == "imagenet":
            if man.layout != "imagenet":
                raise CNPError(f"the manifest of {data.pair!r} has layout {man.layout!r}; use dataset='folder' "
                               "(with data_root) for it")
            if not data.imagenet_root:
                hint = " (data_root is the root of dataset='folder')" if data.data_root else ""
                raise CNPError("dataset='imagenet' needs imagenet_root (a folder with train/<wnid>/ class folders)"
                               + hint)
        elif not data.data_root and man.root is None:
            hint = " (imagenet_root is the root of dataset='imagenet')" if data.imagenet_root else ""
            raise CNPError(f"dataset='folder' needs data_root (the image tree of {data.pair!r}: root/<class>/ or "
                           f"root/train/<wnid>/), or a manifest that records its root{hint}")
    _choice("overlay", data.overlay, OVERLAYS, " (auto: the manifest's)")
    _choice("overlay_style", data.overlay_style, ("manifest", "params"),
            " (the manifest's watermark style, or the wm_* parameters)")
    if data.overlay == "imagenet-w":
        if data.overlay_style == "params":
            raise CNPError("overlay='imagenet-w' draws the ImageNet-W watermark, which has no style: "
                           "overlay_style='params' needs overlay='cnp' (or 'auto')")
        if not imagenet.imagenet_w_available():
            raise CNPError("overlay='imagenet-w' needs the optional package imagenet-w (pip install imagenet-w; "
                           "non-commercial license), or use overlay='cnp'")
    if data.image_size is not None and data.image_size < 8:
        raise CNPError(f"image_size must be >= 8 pixels (None: the data set's size), got {data.image_size}")
    for name in ("wm_rate_pos", "wm_rate_neg", "faint_rate", "faint_opacity"):
        v = getattr(data, name)
        if v is not None and not 0 <= v <= 1:
            raise CNPError(f"{name} must be a rate in [0, 1], got {v}")
    # the network
    if model.arch != "vgg16":
        if model.arch not in torchvision.models.list_models(module=torchvision.models):
            raise CNPError(f"unknown arch {model.arch!r}: use vgg16 (the paper) or a torchvision classification "
                           "model such as vgg16_bn, resnet18, resnet50")
        if c.layer in LAYER_NAMES:
            raise CNPError(f"layer={c.layer!r} is a VGG-16 name; for arch={model.arch!r} give a module name of that "
                           "model, e.g. 'layer3' (ResNet) or 'features.32' (vgg16_bn)")
    # concepts
    if c.K < 1:
        raise CNPError(f"K must be >= 1, got {c.K}")
    D = layer_width(p)
    if D and D % c.K:
        raise CNPError(f"K * d_k must equal D = {D} at {c.layer}: K={c.K} does not divide it (d_k = D / K; "
                       f"valid K: {[k for k in range(1, D + 1) if D % k == 0]})")
    if c.lrp_variant not in ("alpha1beta0", "epsilon", "gamma"):
        raise CNPError(f"lrp_variant must be alpha1beta0, epsilon or gamma, got {c.lrp_variant!r}")
    if c.subspace_method not in ("drsa", "prca", "oracle"):
        raise CNPError(f"subspace_method must be 'drsa', 'prca' or 'oracle', got {c.subspace_method!r}")
    if c.ablation_mode not in ("zero", "mean"):
        raise CNPError(f"ablation_mode must be 'zero' or 'mean', got {c.ablation_mode!r}")
    if c.max_ablate < 1:
        raise CNPError(f"max_ablate must be >= 1 (at most this many subspaces are ablated), got {c.max_ablate}")
    if c.ablate.startswith("mask:"):
        if not c.ablate[5:]:
            raise CNPError("ablate='mask:<part>' needs a part name, e.g. 'mask:ball' (basketball demo)")
    elif c.ablate != "auto":
        try:
            idx = [int(v) for v in c.ablate.split(",") if v.strip()]
        except ValueError:
            raise CNPError(f"ablate must be 'auto' or subspace indices like '3' or '1,3', got {c.ablate!r}") from None
        if any(not 0 <= k < c.K for k in idx):
            raise CNPError(f"ablate={c.ablate!r}: subspace indices must be in 0..{c.K - 1}")
        if len(set(idx)) >= c.K:
            raise CNPError(f"ablate={c.ablate!r} ablates every subspace; keep at least one")
    # pruning: the methods, and every schedule value through the schedule's own checks
    bad = [m for m in p.pruning.methods if m not in METHODS]
    if bad or not p.pruning.methods:
        raise CNPError(f"unknown method {bad[0] if bad else '(none given)'!r}; methods are {', '.join(METHODS)}")
    prune_config(p)
    if p.report.wm_share_images < 0 or p.report.heatmap_images < 0:
        raise CNPError("wm_share_images and heatmap_images must be >= 0")


def drsa_layer(p: Params) -> str:
    """The module the virtual layer sits on: for the paper's VGG-16 the activation after a conv
    (``conv4_3`` -> ``relu4_3``); for any other architecture the named module itself (e.g.
    ``layer3`` of a ResNet, ``features.32`` of ``vgg16_bn``)."""
    if p.model.arch != "vgg16":
        return p.concepts.layer
    name = paper_name(p.concepts.layer)
    return "relu" + name[4:] if name.startswith("conv") else name


def protect_layer(p: Params) -> str:
    """The layer whose channels are never pruned (``conv4_3``; the DRSA layer itself for other
    architectures, whose feeding channel group is then protected)."""
    if p.model.arch != "vgg16":
        return p.concepts.layer
    name = paper_name(drsa_layer(p))
    return "conv" + name[4:]


def layer_width(p: Params) -> int:
    """D, the channels at the DRSA layer of the backbone the run uses, known before anything is
    loaded (0 for architectures other than vgg16: known once the model is loaded).

    Raises
    ------
    CNPError
        When the layer is not a conv layer of the features (or its ReLU output).
    """
    if p.model.arch != "vgg16":
        return 0
    name = paper_name(p.concepts.layer)  # CNPError for an unknown name
    if not name.startswith(("conv", "relu")):
        raise CNPError(f"layer must be a conv layer of the features such as conv4_3 (or its ReLU, relu4_3), "
                       f"got {p.concepts.layer!r}")
    embedded = p.data.dataset == "synthetic" or p.model.weights == "embedded"
    widths = backbone_config(p).block_widths if embedded else FULL_WIDTHS
    return int(widths[int(name[4]) - 1])


def lrp_config(p: Params) -> LRPConfig:
    """The LRP rules of the run (``lrp_variant``)."""
    return LRPConfig(variant=p.concepts.lrp_variant)


def drsa_precision(p: Params, device) -> str:
    """DRSA's arithmetic as it resolves on ``device`` (``cnp.drsa.fit``'s ``auto`` rule)."""
    return _resolve_drsa_precision(p.run.drsa_precision, torch.float32, torch.device(device))


def prune_config(p: Params) -> PruneConfig:
    """The schedule's :class:`~cnp.pruning.PruneConfig` (validates the pruning values)."""
    q, x = p.pruning, p.experimental
    return PruneConfig(step=q.step, target=q.target, rate_of=q.rate_of, epochs_per_step=q.epochs_per_step,
                       final_epochs=q.final_epochs, lr=q.ft_lr, batch_size=q.ft_batch_size, grad_clip=q.ft_grad_clip,
                       ranking_data=q.ranking_data, aggregation=q.aggregation, normalisation=q.normalisation,
                       protect=(protect_layer(p),), freeze=(protect_layer(p),) if x.freeze_drsa_layer else (),
                       finetune_with_virtual_layer=x.finetune_with_virtual_layer, recompute_drsa=x.recompute_drsa,
                       rr_lambda=q.rr_lambda, wm_share_images=p.report.wm_share_images, lrp=lrp_config(p),
                       precision=p.run.precision, memory_format=p.run.memory_format,
                       drsa_precision=p.run.drsa_precision, refit_steps=p.concepts.drsa_steps)


# ============================================================================ notebooks
def notebook_params(namespace: Mapping[str, Any]):
    """The validated :class:`~cnp.pipeline.Params` of a notebook's ``parameters`` cell.

    Takes every variable of ``namespace`` (the notebook's ``globals()``) named like a
    ``Params`` field, skipping ``None`` ("the default", which for ``smoke=True`` is the smoke
    size), then the entries of the dict ``extra`` (any other field). An empty ``run_dir`` becomes
    :func:`default_run_dir`; no ``threads`` becomes ``$CNP_THREADS`` when that is set. A name that
    papermill injected (its ``# Parameters`` cell, found in the kernel's input history ``In``)
    but that is no parameter is an error too, rather than silently ignored.

    Raises
    ------
    CNPError
        One line naming the first bad parameter (from :func:`cnp.pipeline.make_params`).
    """
    names = set(FIELDS)
    over = {k: namespace[k] for k in names if k in namespace and namespace[k] is not None}
    extra = namespace.get("extra") or {}
    if not isinstance(extra, Mapping):
        raise CNPError(f"extra must be a dict of further parameters, got {type(extra).__name__}")
    over.update(extra)
    for name in sorted(_papermill_injected(namespace) - names - {"extra"}):
        over[name] = namespace.get(name)  # make_params reports it as an unknown parameter
    if not over.get("threads") and os.environ.get("CNP_THREADS"):
        over["threads"] = os.environ["CNP_THREADS"]
    if not over.get("run_dir"):
        p = make_params(**over)  # validates pair and seed before they name a folder
        over["run_dir"] = str(default_run_dir(p.data.pair, p.run.seed, p.run.smoke))
    return make_params(**over)


def _papermill_injected(namespace: Mapping[str, Any]) -> set[str]:
    """Names assigned in the cells papermill injected (source starting ``# Parameters``)."""
    found: set[str] = set()
    history = namespace.get("In")
    if not isinstance(history, list):
        return found
    for src in history:
        if not (isinstance(src, str) and src.lstrip().startswith("# Parameters")):
            continue
        try:
            body = ast.parse(src).body
        except SyntaxError:
            continue
        for node in body:
            if isinstance(node, ast.Assign):
                found.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return found


# ============================================================================ inputs
def load_data(p: Params) -> PairData:
    """The pair's :class:`~cnp.data.splits.PairData` for ``dataset``.

    ``imagenet`` and ``folder`` read the manifest ``pair`` names (a packaged pair or a manifest
    file) from ``imagenet_root`` or ``data_root`` (default: the manifest's root). The w1
    subgroups' overlay is ``overlay`` (``auto``: the manifest's choice) in the manifest's style,
    or in the ``wm_*`` style with ``overlay_style="params"``. Split sizes: ``imagenet`` takes all
    of the ``n_*`` parameters; ``folder`` the manifest's sizes (fitted to the data by
    ``python -m cnp.data manifest``) except the ``n_*`` parameters that differ from their defaults
    (as the smoke sizes do); with a split file only ``n_drsa`` and ``n_rank`` can apply.
    """
    d = p.data
    if d.dataset == "synthetic":
        return load_pair(pair_config(p))
    man = load_manifest(d.pair)
    names = {"train": "n_train_per_class", "drsa": "n_drsa", "rank": "n_rank", "val": "n_val_per_subgroup",
             "test": "n_test_per_subgroup"}
    sizes = {k: getattr(d, name) for k, name in names.items()}
    if d.dataset == "folder":
        sizes = {k: v for k, v in sizes.items() if v != FIELDS[names[k]][2]}
    if man.splits:
        sizes = {k: v for k, v in sizes.items() if k in ("drsa", "rank")}
    style = None
    if d.overlay_style == "params":
        style = WatermarkStyle(wm_text=d.wm_text, wm_size=d.wm_size, wm_opacity=d.wm_opacity, wm_color=d.wm_color,
                               wm_placement=d.wm_placement)
    root = d.imagenet_root if d.dataset == "imagenet" else (d.data_root or None)
    return build_pair(man.pair, root, seed=p.run.seed, manifest=man, label_csv=d.label_csv or None, style=style,
                      overlay=None if d.overlay == "auto" else d.overlay, image_size=d.image_size, sizes=sizes or None)


def backbone_config(p: Params) -> BackboneConfig:
    n = p.model.backbone_images_per_class
    return BackboneConfig(epochs=p.model.backbone_epochs,
                          corpus=CorpusConfig(n_per_class=n, n_val_per_class=max(10, n // 7)))


def load_pretrained(p: Params) -> torch.nn.Module:
    """The pretrained backbone: the embedded one (cached; ``arch`` other than vgg16: that
    torchvision architecture pretrained on the same corpus) or torchvision's weights.
    ``weights="embedded"`` takes the embedded backbone for any data set (e.g. the embedded
    benchmark written out as an image folder, ``dataset="folder"``)."""
    m = p.model
    if p.data.dataset == "synthetic" or m.weights == "embedded":
        if m.arch != "vgg16":
            return load_torchvision_backbone(m.arch, drsa_layer(p), backbone_config(p))[0]
        return load_backbone(backbone_config(p))[0]
    if m.arch == "vgg16" and not m.weights:  # the paper's file, from weights_path or the hub cache
        sha = None if m.expected_sha256.lower() == "none" else (m.expected_sha256 or VGG16_IMAGENET_SHA256)
        if m.allow_download or m.weights_path:
            return load_torchvision_vgg16(m.weights_path or None, expected_sha256=sha, allow_download=m.allow_download)
        return load_torchvision_model("vgg16", "IMAGENET1K_V1", allow_download=False)
    sha = None if m.expected_sha256.lower() in ("", "none") else m.expected_sha256
    return load_torchvision_model(m.arch, m.weights or None, weights_path=m.weights_path or None,
                                  expected_sha256=sha, allow_download=m.allow_download)


# ============================================================================ the run directory
@dataclass
class Run:
    """A run's parameters and directory, and the inputs its stages share (loaded once, lazily)."""

    params: Params
    timer: StageTimer = field(default_factory=StageTimer)
    _data: Any = None
    _backbone: Any = None

    @property
    def dir(self) -> Path:
        return self.params.run_path

    @property
    def device(self) -> torch.device:
        return resolve_device(self.params.run.device)

    def data(self) -> PairData:
        """The pair's splits (synthetic: generated/cached; imagenet, folder: decoded/cached)."""
        if self._data is None:
            self._data = load_data(self.params)
        return self._data

    def backbone(self) -> torch.nn.Module:
        """The pretrained backbone in the run's memory format."""
        if self._backbone is None:
            self._backbone = set_memory_format(load_pretrained(self.params), self.params.run.memory_format)
        return self._backbone


def open_run(params: Params | None = None, **overrides) -> Run:
    """Start or continue a run: validate parameters (and the ImageNet path's root and weights file),
    set threads and seeds, record params.json."""
    p = params if params is not None else make_params(**overrides)
    if p.data.dataset == "imagenet":  # the inputs exist, before any work starts
        check_root(p.data.imagenet_root)
        vgg16_weights_file(p.model.weights_path or None)
    if p.run.threads:
        configure_threads(p.run.threads)
    seed_everything(p.run.seed)
    run = Run(p)
    atomic_write_json(run.dir / "params.json", p.to_dict())  # creates the directory; CNPError if unwritable
    return run


# ---------------------------------------------------------------------------- the stage cache
#: The parameter sections each stage depends on beyond the earlier stages' (``run`` contributes
#: its seed and arithmetic, see :func:`_stage_key`).
_STAGE_SECTIONS = {"warmup": ("data", "model", "warmup"), "augment": ("concepts",), "ablate": ("report",),
                   "prune": ("pruning", "experimental"), "evaluate": ()}
#: The concepts section's parameters of the ablated set K': chosen at the ablate stage, so not
#: part of the augment stage's key.
_STAGE_LATER = {"ablate", "ap_threshold", "max_ablate", "ablation_mode"}


def _stage_key(p: Params, stage: str) -> str:
    """Hash of the parameters a stage depends on (later stages include the earlier ones' keys).

    The run section contributes the seed and the arithmetic as it resolves on this device
    (``precision="auto"`` on a CPU is fp32, the same key as ``"fp32"``); not the run directory,
    device name or threads. ``methods`` is in no key (each method has its own outputs),
    ``heatmap_images`` neither; ``wm_share_images`` joins at the ablate stage.
    """
    dev = resolve_device(p.run.device)
    d = p.to_dict()
    arithmetic = {"memory_format": p.run.memory_format}
    upto = STAGES[: STAGES.index(stage) + 1]
    keys: dict[str, Any] = {"seed": p.run.seed, "smoke": p.run.smoke}
    for s in upto:
        for section in _STAGE_SECTIONS[s]:
            names = [f for f, (sec, _t, _d) in FIELDS.items() if sec == section]
            keys.update({n: d[n] for n in names if n not in ("methods", "heatmap_images")})
    if "augment" in upto:
        arithmetic["drsa_precision"] = drsa_precision(p, dev)
        if arithmetic["drsa_precision"] == "bf16":
            arithmetic["drsa_bf16_arithmetic"] = BF16_ARITHMETIC
    if "ablate" not in upto:
        for n in _STAGE_LATER:
            keys.pop(n, None)
    if "prune" in upto:
        arithmetic["precision"] = resolve_precision(p.run.precision, dev)
    return recipe_hash({"stage": stage, "layout": CACHE_LAYOUT, "params": keys, "arithmetic": arithmetic})


#: The stage whose summary each stage reads.
_STAGE_INPUT = {"warmup": None, "augment": "warmup", "ablate": "augment", "prune": "ablate"}
_DIGESTS: dict[tuple, str] = {}


def _digest(path: Path) -> str | None:
    """SHA-256 of a file (memoised by path, size and mtime), ``None`` when it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def _stage_outputs(run: Run, stage: str, summary: dict) -> list[str]:
    if stage == "warmup":
        return ["warmup/model.pt"]
    if stage == "augment":
        return ["augment/concepts.pt"]
    if stage == "ablate":
        return ["ablate/heatmaps.pt"]
    out = [f"prune/prune_{m}.pt" for m in summary.get("curves", {})]
    if "cnp" in summary.get("curves", {}) and (run.dir / "prune" / "heatmaps_cnp.pt").exists():
        out.append("prune/heatmaps_cnp.pt")
    return out


def _done(run: Run, stage: str) -> dict | None:
    """The stage's summary when its results can be trusted, else ``None`` (the stage runs again).

    Trusted means: ``summary.json`` reads, was written in this cache layout for the same
    parameters, every file the stage wrote still has the SHA-256 recorded in it (so a truncated,
    corrupt or missing file is rebuilt, never read) and the upstream stage's key and files are
    the ones this stage was computed from. Anything else but a missing summary is reported with
    one line (:func:`cnp.io.load_current`).
    """
    return load_current(run.dir / stage / "summary.json", what=f"{stage}:", name="", load=_read_summary,
                        check=lambda s: _distrust(run, stage, s), then="re-running the stage")


def _read_summary(path: Path) -> dict:
    try:
        s = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CNPError(f"{type(exc).__name__}") from exc
    if not isinstance(s, dict):
        raise CNPError("not a JSON object")
    return s


def _distrust(run: Run, stage: str, s: dict) -> str | None:
    """Why a stage's summary ``s`` cannot be trusted (``None``: it can)."""
    if s.get("layout") != CACHE_LAYOUT:
        return "its results were written by an earlier version of cnp"
    if s.get("key") != _stage_key(run.params, stage):
        return "its results are for other parameters"
    if not isinstance(s.get("files"), dict):
        return "its summary.json records no file hashes"
    for rel, digest in s["files"].items():
        got = _digest(run.dir / rel)
        if got is None:
            return f"{rel} is missing"
        if got != digest:
            return f"{rel} does not match the SHA-256 in its summary.json (corrupt or truncated)"
    up = _STAGE_INPUT[stage]
    if up is not None and s.get("input") != _input_id(run, up):
        return f"the {up} stage it was computed from has changed"
    return None


def _finish(run: Run, stage: str, summary: dict) -> dict:
    """Write ``<stage>/summary.json``: the summary, the layout and parameters key, the SHA-256 of
    every file the stage wrote and the upstream stage it used (atomically, after those files)."""
    up = _STAGE_INPUT[stage]
    summary = {**summary, "layout": CACHE_LAYOUT, "key": _stage_key(run.params, stage),
               "computed": summary.get("computed") or uuid.uuid4().hex,
               "files": {rel: _digest(run.dir / rel) for rel in _stage_outputs(run, stage, summary)},
               "input": _input_id(run, up) if up is not None else None}
    atomic_write_json(run.dir / stage / "summary.json", summary)
    return summary


def _input_id(run: Run, stage: str) -> str | None:
    """What a later stage records of the ``stage`` it was computed from: the token that stage
    drew when it last computed its outputs (a re-measured share in the warm-up's summary keeps
    it, so DRSA stays valid; a warm-up that ran again has a new one, so everything after it runs
    again)."""
    try:
        s = json.loads((run.dir / stage / "summary.json").read_text())
        return recipe_hash({"key": s["key"], "files": s["files"], "computed": s["computed"]})
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ============================================================================ stages
def warm_model(run: Run) -> torch.nn.Module:
    """The warm-up stage's model (eval mode, on the run's device and in its memory format)."""
    model, _ = load_model(run.dir / "warmup" / "model.pt")
    return set_memory_format(model.to(run.device).eval(), run.params.run.memory_format)


def concepts(run: Run) -> stages.Concepts:
    """The augment stage's DRSA subspaces."""
    return stages.Concepts.from_state(safe_torch_load(run.dir / "augment" / "concepts.pt"))


def augmented_model(run: Run, ablated=(), mode: str = "zero"):
    """The warmed-up model with the virtual concept layer (from the augment stage)."""
    return stages.with_virtual_layer(warm_model(run), concepts(run), ablated=ablated, mode=mode,
                                     mean_images=run.data()["drsa"].images if mode == "mean" else None,
                                     device=run.device)


def run_warmup(run: Run, verbose: bool = True) -> dict:
    """Stage 0 (01_warmup): new 2-way head on the frozen backbone; accuracy per subgroup."""
    p = run.params
    n = p.report.wm_share_images
    done = _done(run, "warmup")
    if done is not None:
        if done.get("wm_share_images") == n:
            return done
        # a changed measurement size: measure again on the saved model, nothing else
        shares = stages.watermark_shares(warm_model(run), run.data()["test"], lrp_config(p), n_images=n,
                                         device=run.device)
        return _finish(run, "warmup", {**done, **shares})
    with run.timer("warmup"):
        data = run.data()
        model, summary = stages.warm_up(run.backbone(), data, p.warmup, seed=p.run.seed, device=run.device,
                                        verbose=verbose)
        save_model(model, run.dir / "warmup" / "model.pt")
        summary.update(stages.watermark_shares(model, data["test"], lrp_config(p), n_images=n, device=run.device))
    return _finish(run, "warmup", {**summary, "seconds": run.timer.times.get("warmup", 0.0)})


def run_augment(run: Run, verbose: bool = True) -> dict:
    """Stage 1 (02_augment): DRSA subspaces U_k at the layer; the virtual layer leaves logits unchanged."""
    done = _done(run, "augment")
    if done is not None:
        return done
    p = run.params
    run_warmup(run, verbose)
    model = warm_model(run)
    data = run.data()
    with run.timer("augment"):
        fit, summary = stages.augment(model, data["drsa"], data["test"], p.concepts, drsa_layer=drsa_layer(p),
                                      seed=p.run.seed, lrp_config=lrp_config(p),
                                      precision=drsa_precision(p, run.device), device=run.device,
                                      checkpoint=run.dir / "augment" / "drsa_checkpoint.pt", verbose=verbose)
        atomic_torch_save(run.dir / "augment" / "concepts.pt", fit.state())
    return _finish(run, "augment", {**summary, "seconds": run.timer.times.get("augment", 0.0)})


def run_ablate(run: Run, verbose: bool = True) -> dict:
    """Stage 2 (03_ablate): latent analysis (AP of R(k) vs watermark), shares, heatmaps, K'."""
    done = _done(run, "ablate")
    if done is not None:
        return done
    p = run.params
    run_augment(run, verbose)
    with run.timer("ablate"):
        model, vl = augmented_model(run)
        heatmaps, summary = stages.ablate(model, vl, run.data(), p.concepts, lrp_config=lrp_config(p),
                                          n_share_images=p.report.wm_share_images,
                                          n_heatmaps=p.report.heatmap_images, device=run.device)
        atomic_torch_save(run.dir / "ablate" / "heatmaps.pt", heatmaps)
    return _finish(run, "ablate", {**summary, "seconds": run.timer.times.get("ablate", 0.0)})


def run_prune(run: Run, verbose: bool = True) -> dict:
    """Stage 3 (04_prune): the iterative schedule for every method; curves per method."""
    p = run.params
    summary = _done(run, "prune")
    if summary is not None and all(m in summary["curves"] for m in p.pruning.methods):
        return summary
    abl = run_ablate(run, verbose)
    cfg = prune_config(p)
    curves, timings = dict(summary["curves"]) if summary else {}, dict(summary["timings"]) if summary else {}
    todo = [m for m in p.pruning.methods if m not in curves]
    if any(not METHOD_SPECS[m].keep for m in todo):
        # the warm-up stage measured the network every schedule starts from, on the same splits
        # with the same functions: its numbers are the schedules' step 0, to the bit
        warm = run_warmup(run, verbose)
        if warm.get("wm_share_images") == cfg.wm_share_images:
            record_unpruned_evaluation(warm_model(run), run.data(), cfg, {k: warm[k] for k in (
                "acc", "val_acc", "wm_relevance_share", "wm_relevance_share_by_subgroup")},
                run.dir / "prune", device=run.device)
    for method in p.pruning.methods:
        if method in curves:
            continue
        state = None
        if METHOD_SPECS[method].needs_concepts:
            _model, vl = augmented_model(run, abl["ablated"], p.concepts.ablation_mode)
            state = vl.state()
        t0 = time.perf_counter()
        res = run_pruning(warm_model(run), run.data(), method, cfg, concept_state=state, seed=p.run.seed,
                          device=run.device, run_dir=run.dir / "prune", verbose=verbose)
        run.timer.times[f"prune:{method}"] = time.perf_counter() - t0
        curves[method] = res.curve
        timings[method] = res.timings
        heatmaps = run.dir / "ablate" / "heatmaps.pt"
        if method == "cnp" and heatmaps.exists():
            images = safe_torch_load(heatmaps)["images"]
            atomic_torch_save(run.dir / "prune" / "heatmaps_cnp.pt",
                              {"overall": stages.pruned_heatmaps(res.model, images, lrp_config(p), run.device)})
        # record progress after every method (a restart skips finished methods)
        _finish(run, "prune", {"curves": curves, "timings": timings})
    return _finish(run, "prune", {"curves": curves, "timings": timings})


def run_evaluate(run: Run, verbose: bool = True) -> dict:
    """Stage 4 (05_evaluate): collect everything into ``metrics.json`` (the results contract)."""
    p = run.params
    warm, aug, abl, pr = (run_warmup(run, verbose), run_augment(run, verbose), run_ablate(run, verbose),
                          run_prune(run, verbose))
    # the arithmetic the numbers come from (the fine-tunes' precision as resolved on this device)
    compute = {"device": run.device.type, "memory_format": p.run.memory_format,
               "precision": resolve_precision(p.run.precision, run.device),
               "drsa_precision": drsa_precision(p, run.device), "torch": torch.__version__}
    metrics = stages.metrics(p.to_dict(), warm, aug, abl, pr, compute)
    atomic_write_json(run.dir / "metrics.json", metrics)
    if verbose:
        timings = metrics["timings_s"]
        cached = {k for k in timings if k not in run.timer.times}
        print(stage_breakdown(timings, {f"prune:{m}": t for m, t in pr["timings"].items()}, cached,
                              title=f"[cnp] time per stage: {p.data.pair} seed {p.run.seed} ({run.dir})"))
    return metrics


def run_all(verbose: bool = True, **overrides) -> dict:
    """Every stage of one run (what ``cnp.sweep`` does per (pair, seed) through the notebooks)."""
    return run_evaluate(open_run(**overrides), verbose)


__all__ = ["BENCHMARK_DEFAULTS", "CACHE_LAYOUT", "DATASETS", "METHODS", "Params", "Run", "SMOKE", "STAGES",
           "augmented_model", "backbone_config", "concepts", "drsa_layer", "drsa_precision", "layer_width",
           "load_data", "load_pretrained", "lrp_config", "make_params", "notebook_params", "open_run", "protect_layer",
           "prune_config", "run_ablate", "run_all", "run_augment", "run_evaluate", "run_prune", "run_warmup",
           "warm_model"]
