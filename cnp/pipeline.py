"""The paper's pipeline as resumable stages over one run directory (what the notebooks call).

One run = one (pair, seed, parameters); its directory (default ``runs/<pair>/seed<k>/``) holds
each stage's outputs and, at the end, ``metrics.json``. Stages (and notebooks):

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

Parameters are validated up front by :func:`make_params`: an unknown name, a wrong type, K that
does not divide the layer's width, an unknown method or a target outside (0, 1) is reported as
one clear line (a :class:`~cnp.io.CNPError`) before any work starts.
"""

from __future__ import annotations

import json
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from cnp.io import (
    CNPError,
    atomic_torch_save,
    atomic_write_json,
    recipe_hash,
    safe_torch_load,
    sha256_file,
)
from cnp.models import FULL_WIDTHS, LAYER_NAMES, load_model, paper_name, save_model
from cnp.params import BENCHMARK_DEFAULTS, key_dict  # noqa: F401  (BENCHMARK_DEFAULTS re-exported: the notebooks' defaults)
from cnp.pruning.schedule import METHOD_SPECS, METHODS
from cnp.runtime import (
    MEMORY_FORMATS,
    PRECISIONS,
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


@dataclass(frozen=True)
class Params:
    """All parameters of one run (the notebooks' ``parameters`` cell).

    Data: ``pair``, ``seed``, ``dataset`` (``synthetic``, ``imagenet`` or ``folder``; with the
    latter two ``pair`` may be a manifest file, see docs/data.md), ``imagenet_root``,
    ``data_root``, ``weights_path``, ``label_csv``, the overlay of the real-data paths
    (``overlay``, ``overlay_style``), split sizes, and for the synthetic data the watermark style
    (``wm_text``, ``wm_size``, ``wm_opacity``, ``wm_color``, ``wm_placement``; for the real-data
    paths with ``overlay_style="params"``), the bias rates (``wm_rate_pos``, ``wm_rate_neg``) and
    the class-signal knobs (``faint_rate``, ``faint_opacity``). Stages: see the field names;
    defaults are the paper's (Appendix A) except where the embedded benchmark needs smaller sizes
    (stated in the README).
    """

    # run
    pair: str = "carton-dugong"
    seed: int = 0
    dataset: str = "synthetic"
    run_dir: str = ""
    device: str = "auto"
    threads: int = 0
    smoke: bool = False
    # arithmetic (not the method): the convolutions' layout and the fine-tunes' precision
    memory_format: str = "channels_last"  # channels_last (NHWC, faster) or contiguous (NCHW, versions before 0.4)
    precision: str = "auto"  # the fine-tunes: auto (bf16 autocast on CUDA, fp32 on the CPU), bf16 (also on CPUs with native bf16), fp32
    drsa_precision: str = "auto"  # DRSA's GEMMs: auto (bf16 where the device computes it natively), bf16, fp32
    # model: the architecture, where its weights come from
    arch: str = "vgg16"  # vgg16 (the paper), or any torchvision CNN: vgg16_bn, resnet18, resnet50 ...
    weights: str = ""  # imagenet/folder: torchvision weights by name (IMAGENET1K_V1, DEFAULT); "": weights_path
    allow_download: bool = False  # imagenet/folder: let torchvision download missing weights
    expected_sha256: str = ""  # imagenet/folder: SHA-256 of weights_path ("": torchvision's own check; "none": skip)
    # data (both paths)
    imagenet_root: str = ""
    weights_path: str = ""
    label_csv: str = ""
    data_root: str = ""  # dataset=folder: the image tree ("": the manifest's root)
    overlay: str = "auto"  # imagenet/folder: auto (the manifest's), cnp or imagenet-w
    overlay_style: str = "manifest"  # imagenet/folder: the cnp overlay's style: manifest or params (wm_*)
    image_size: int = 0  # 0: 48 synthetic, the manifest's centre crop otherwise (224 for the paper's pairs)
    n_train_per_class: int = 650
    n_drsa: int = 500
    n_rank: int = 500
    n_val_per_subgroup: int = 150
    n_test_per_subgroup: int = 500
    # synthetic data: watermark style, bias, class signal
    wm_text: str = "stock"
    wm_size: float = 0.22
    wm_opacity: float = 0.55
    wm_color: str = "white"
    wm_placement: str = "random"
    wm_rate_pos: float = 0.9
    wm_rate_neg: float = 0.05
    faint_rate: float = -1.0  # -1: the pair's default (0.5 for crate-packet, else 0)
    faint_opacity: float = 0.3
    backbone_epochs: int = 8
    backbone_images_per_class: int = 700
    # warm-up
    warmup_epochs: int = 15
    warmup_lr: float = 0.01
    warmup_head: str = "classifier"
    # augment (DRSA)
    layer: str = "conv4_3"
    K: int = 4
    d_k: int = 0  # 0: D / K
    lrp_variant: str = "alpha1beta0"
    drsa_steps: int = 500
    drsa_restarts: int = 3
    n_positions: int = 20
    subspace_method: str = "drsa"
    # ablate
    ablate: str = "auto"  # "auto" (latent analysis), indices like "3" / "1,3", or "mask:ball"
    ap_threshold: float = 0.85
    max_ablate: int = 1
    ablation_mode: str = "zero"
    # prune
    methods: tuple[str, ...] = ("cnp", "vanilla")
    step: float = 0.05
    target: float = 0.8
    rate_of: str = "all"
    epochs_per_step: int = 2
    final_epochs: int = 2
    ft_lr: float = 1e-3
    ft_batch_size: int = 64
    ft_grad_clip: float = 5.0
    ranking_data: str = "pos"
    aggregation: str = "signed"
    normalisation: str = "sum"
    freeze_drsa_layer: bool = False
    finetune_with_virtual_layer: bool = False
    recompute_drsa: bool = False
    rr_lambda: float = 1.0
    wm_share_images: int = 200
    heatmap_images: int = 6

    # ------------------------------------------------------------------ derived
    @property
    def drsa_layer(self) -> str:
        """The module the virtual layer sits on: for the paper's VGG-16 the activation after a
        conv (``conv4_3`` -> ``relu4_3``); for any other architecture the named module itself
        (e.g. ``layer3`` of a ResNet, ``features.32`` of ``vgg16_bn``)."""
        if self.arch != "vgg16":
            return self.layer
        name = paper_name(self.layer)
        return "relu" + name[4:] if name.startswith("conv") else name

    @property
    def protect_layer(self) -> str:
        """The layer whose channels are never pruned (``conv4_3``; the DRSA layer itself for
        other architectures, whose feeding channel group is then protected)."""
        if self.arch != "vgg16":
            return self.layer
        name = paper_name(self.drsa_layer)
        return "conv" + name[4:]

    @property
    def run_path(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        return Path("runs") / self.pair / f"seed{self.seed}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["methods"] = list(self.methods)
        return d


#: Overrides applied by ``smoke=True`` (CI): tiny sizes, few steps; explicit values win.
SMOKE = {
    "n_train_per_class": 60, "n_drsa": 40, "n_rank": 30, "n_val_per_subgroup": 10,
    "n_test_per_subgroup": 15, "backbone_epochs": 2, "backbone_images_per_class": 80, "warmup_epochs": 2, "drsa_steps": 20,
    "drsa_restarts": 1, "n_positions": 5, "step": 0.4, "target": 0.8, "epochs_per_step": 1,
    "final_epochs": 1, "wm_share_images": 10, "heatmap_images": 2,
}


def _coerce(name: str, value: Any, typ) -> Any:
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, bool | int):
                return bool(value)
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if typ is str:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, list | tuple):
                raise ValueError(value)
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return tuple(str(v) for v in value)
    except (TypeError, ValueError):
        raise CNPError(f"parameter {name}={value!r} has the wrong type: expected {getattr(typ, '__name__', typ)}") from None
    return value


def make_params(**overrides: Any) -> Params:
    """Validated :class:`Params` from overrides (strings from the command line are converted).

    Raises
    ------
    CNPError
        One line naming the first problem: unknown parameter, wrong type, bad value.
    """
    hints = typing.get_type_hints(Params)
    known = {f.name for f in fields(Params)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        import difflib

        hint = difflib.get_close_matches(unknown[0], known, n=1)
        raise CNPError(f"unknown parameter {unknown[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                       + f"; known parameters: {', '.join(sorted(known))}")
    values = {k: _coerce(k, v, hints[k]) for k, v in overrides.items()}
    smoke = values.get("smoke", False)
    if smoke:
        for k, v in SMOKE.items():
            values.setdefault(k, v)
    p = Params(**values)
    _validate(p)
    return p


def _validate(p: Params) -> None:
    from cnp.data.synthetic import PAIRS

    if p.memory_format not in MEMORY_FORMATS:
        raise CNPError(f"memory_format must be one of {MEMORY_FORMATS}, got {p.memory_format!r}")
    if p.precision not in PRECISIONS:
        raise CNPError(f"precision must be one of {PRECISIONS}, got {p.precision!r}")
    if p.drsa_precision not in PRECISIONS:
        raise CNPError(f"drsa_precision must be one of {PRECISIONS}, got {p.drsa_precision!r}")

    if p.dataset not in DATASETS:
        raise CNPError(f"dataset must be one of {DATASETS}, got {p.dataset!r}")
    # data: the pair (a name, or a manifest file for imagenet/folder), the roots, the real-data overlay
    from cnp.data.imagenet import OVERLAYS, imagenet_w_available, is_manifest_path, load_manifest

    if p.dataset == "synthetic":
        if p.pair not in PAIRS:
            hint = " (a manifest file needs dataset='folder' or 'imagenet')" if is_manifest_path(p.pair) else ""
            raise CNPError(f"unknown pair {p.pair!r}; known pairs: {', '.join(PAIRS)}{hint}")
        if p.overlay != "auto":
            raise CNPError(f"overlay={p.overlay!r} applies to dataset='imagenet' or 'folder' (the synthetic data "
                           "draws its own watermarks with the wm_* style); leave it 'auto'")
    else:
        man = load_manifest(p.pair)  # a packaged pair or a manifest file; CNPError says what is wrong
        if is_manifest_path(p.pair) and not p.run_dir:
            raise CNPError(f"pair={p.pair!r} is a manifest file: set run_dir too (the default runs/<pair>/seed<k> "
                           f"needs a pair name), e.g. run_dir='runs/{man.pair}/seed{p.seed}'")
        if p.dataset == "imagenet":
            if man.layout != "imagenet":
                raise CNPError(f"the manifest of {p.pair!r} has layout {man.layout!r}; use dataset='folder' "
                               "(with data_root) for it")
            if not p.imagenet_root:
                hint = " (data_root is the root of dataset='folder')" if p.data_root else ""
                raise CNPError("dataset='imagenet' needs imagenet_root (a folder with train/<wnid>/ class folders)"
                               + hint)
        elif not p.data_root and man.root is None:
            hint = " (imagenet_root is the root of dataset='imagenet')" if p.imagenet_root else ""
            raise CNPError(f"dataset='folder' needs data_root (the image tree of {p.pair!r}: root/<class>/ or "
                           f"root/train/<wnid>/), or a manifest that records its root{hint}")
    if p.overlay not in OVERLAYS:
        raise CNPError(f"overlay must be one of {', '.join(OVERLAYS)} (auto: the manifest's), got {p.overlay!r}")
    if p.overlay_style not in ("manifest", "params"):
        raise CNPError(f"overlay_style must be 'manifest' (the manifest's watermark style) or 'params' "
                       f"(the wm_* parameters), got {p.overlay_style!r}")
    if p.overlay == "imagenet-w":
        if p.overlay_style == "params":
            raise CNPError("overlay='imagenet-w' draws the ImageNet-W watermark, which has no style: "
                           "overlay_style='params' needs overlay='cnp' (or 'auto')")
        if not imagenet_w_available():
            raise CNPError("overlay='imagenet-w' needs the optional package imagenet-w (pip install imagenet-w; "
                           "non-commercial license), or use overlay='cnp'")
    if p.seed < 0:
        raise CNPError(f"seed must be >= 0, got {p.seed}")
    bad = [m for m in p.methods if m not in METHODS]
    if bad or not p.methods:
        raise CNPError(f"unknown method {bad[0] if bad else '(none given)'!r}; methods are {', '.join(METHODS)}")
    if not (0 < p.target < 1):
        raise CNPError(f"target pruning rate must be in (0, 1), got {p.target}")
    if not (0 < p.step <= p.target):
        raise CNPError(f"step must be in (0, target={p.target}], got {p.step}")
    if p.K < 1:
        raise CNPError(f"K must be >= 1, got {p.K}")
    if p.d_k < 0:
        raise CNPError(f"d_k must be >= 0 (0: D / K), got {p.d_k}")
    if p.arch != "vgg16":
        import torchvision

        if p.arch not in torchvision.models.list_models(module=torchvision.models):
            raise CNPError(f"unknown arch {p.arch!r}: use vgg16 (the paper) or a torchvision classification model "
                           "such as vgg16_bn, resnet18, resnet50")
        if p.layer in LAYER_NAMES:
            raise CNPError(f"layer={p.layer!r} is a VGG-16 name; for arch={p.arch!r} give a module name of that "
                           "model, e.g. 'layer3' (ResNet) or 'features.32' (vgg16_bn)")
    D = layer_width(p)
    if D and (D % p.K or (p.d_k and p.K * p.d_k != D)):
        raise CNPError(f"K * d_k must equal D = {D} at {p.layer}: K={p.K}, d_k={p.d_k or 'D/K'} "
                       f"(valid K: {[k for k in range(1, D + 1) if D % k == 0]})")
    if p.ablation_mode not in ("zero", "mean"):
        raise CNPError(f"ablation_mode must be 'zero' or 'mean', got {p.ablation_mode!r}")
    if p.ablate.startswith("mask:"):
        if not p.ablate[5:]:
            raise CNPError("ablate='mask:<part>' needs a part name, e.g. 'mask:ball' (basketball demo)")
    elif p.ablate != "auto":
        try:
            idx = [int(v) for v in p.ablate.split(",") if v.strip()]
        except ValueError:
            raise CNPError(f"ablate must be 'auto' or subspace indices like '3' or '1,3', got {p.ablate!r}") from None
        if any(not 0 <= k < p.K for k in idx):
            raise CNPError(f"ablate={p.ablate!r}: subspace indices must be in 0..{p.K - 1}")
        if len(set(idx)) >= p.K:
            raise CNPError(f"ablate={p.ablate!r} ablates every subspace; keep at least one")
    if p.lrp_variant not in ("alpha1beta0", "epsilon", "gamma"):
        raise CNPError(f"lrp_variant must be alpha1beta0, epsilon or gamma, got {p.lrp_variant!r}")
    for name in ("wm_rate_pos", "wm_rate_neg", "faint_rate", "faint_opacity"):
        v = getattr(p, name)
        if name == "faint_rate" and v == -1:
            continue
        if not 0 <= v <= 1:
            raise CNPError(f"{name} must be a rate in [0, 1], got {v}")
    if p.subspace_method not in ("drsa", "prca", "oracle"):
        raise CNPError(f"subspace_method must be 'drsa', 'prca' or 'oracle', got {p.subspace_method!r}")
    if p.epochs_per_step < 0 or p.final_epochs < 0:
        raise CNPError("epochs_per_step and final_epochs must be >= 0")
    from cnp.pruning.ranking import AGGREGATIONS, NORMALISATIONS
    from cnp.pruning.schedule import RATE_BASES

    if not p.rr_lambda >= 0:
        raise CNPError(f"rr_lambda (the concept penalty's weight, method cnp-rr) must be >= 0, got {p.rr_lambda}")
    for name, allowed in (("aggregation", AGGREGATIONS), ("normalisation", NORMALISATIONS),
                          ("rate_of", RATE_BASES), ("ranking_data", ("pos", "pos+neg"))):
        if getattr(p, name) not in allowed:
            raise CNPError(f"{name} must be one of {', '.join(allowed)}, got {getattr(p, name)!r}")


def layer_width(p: Params) -> int:
    """D, the channels at ``p.layer`` of the backbone the run uses, known before anything is loaded.

    Synthetic data: the embedded backbone's recipe (:func:`backbone_config`; conv4_3 has 128
    channels); ImageNet: torchvision's VGG-16 (512 at conv4_3).

    Raises
    ------
    CNPError
        When ``p.layer`` is not a conv layer of the features (or its ReLU output).
    """
    if p.arch != "vgg16":
        return 0  # known once the model is loaded (checked by the augment stage)
    name = paper_name(p.layer)  # CNPError for an unknown name
    if not name.startswith(("conv", "relu")):
        raise CNPError(f"layer must be a conv layer of the features such as conv4_3 (or its ReLU, relu4_3), "
                       f"got {p.layer!r}")
    embedded = p.dataset == "synthetic" or p.weights == "embedded"
    widths = backbone_config(p).block_widths if embedded else FULL_WIDTHS
    return int(widths[int(name[4]) - 1])


# ============================================================================ context
@dataclass
class Run:
    """A run's parameters plus lazily loaded shared objects (data, backbone)."""

    params: Params
    timer: StageTimer = field(default_factory=StageTimer)
    _data: Any = None
    _backbone: Any = None

    @property
    def dir(self) -> Path:
        return self.params.run_path

    @property
    def device(self) -> torch.device:
        return resolve_device(self.params.device)

    def data(self):
        """The pair's splits (synthetic: generated/cached; imagenet: decoded/cached)."""
        if self._data is None:
            self._data = load_data(self.params)
        return self._data

    def backbone(self):
        if self._backbone is None:
            self._backbone = set_memory_format(load_pretrained(self.params), self.params.memory_format)
        return self._backbone


def open_run(params: Params | None = None, **overrides) -> Run:
    """Start or continue a run: validate parameters (and the ImageNet path's root and weights file),
    set threads and seeds, record params.json."""
    p = params if params is not None else make_params(**overrides)
    _check_files(p)
    if p.threads:
        configure_threads(p.threads)
    seed_everything(p.seed)
    run = Run(p)
    atomic_write_json(run.dir / "params.json", p.to_dict())  # creates the directory; CNPError if unwritable
    return run


def _check_files(p: Params) -> None:
    """The ImageNet path's inputs exist (root folder, weights file), before any work starts.

    Raises
    ------
    CNPError
        A missing root or weights file; for the weights, where to download them and how to pass
        the file (the companion never downloads on its own).
    """
    if p.dataset == "imagenet":
        from cnp.data.imagenet import check_root
        from cnp.models import vgg16_weights_file

        check_root(p.imagenet_root)
        vgg16_weights_file(p.weights_path or None)


def synthetic_config(p: Params):
    from cnp.data.synthetic import PairConfig

    return PairConfig.from_params(
        pair=p.pair, seed=p.seed, image_size=p.image_size or 48, n_train_per_class=p.n_train_per_class,
        n_drsa=p.n_drsa, n_rank=p.n_rank, n_val_per_subgroup=p.n_val_per_subgroup,
        n_test_per_subgroup=p.n_test_per_subgroup, wm_rate_pos=p.wm_rate_pos, wm_rate_neg=p.wm_rate_neg,
        faint_rate=None if p.faint_rate == -1 else p.faint_rate, faint_opacity=p.faint_opacity, wm_text=p.wm_text, wm_size=p.wm_size,
        wm_opacity=p.wm_opacity, wm_color=p.wm_color, wm_placement=p.wm_placement,
    )


def load_data(p: Params):
    """The pair's :class:`~cnp.data.splits.PairData` for ``p.dataset``.

    ``imagenet`` and ``folder`` read the manifest ``p.pair`` names (a packaged pair or a manifest
    file) from ``imagenet_root`` or ``data_root`` (default: the manifest's root). The w1
    subgroups' overlay is ``p.overlay`` (``auto``: the manifest's choice) in the manifest's style,
    or in the ``wm_*`` style with ``overlay_style="params"``. Split sizes: ``imagenet`` takes all
    of the ``n_*`` parameters; ``folder`` the manifest's sizes (fitted to the data by
    ``python -m cnp.data manifest``) except the ``n_*`` parameters that differ from their defaults
    (as the smoke sizes do); with a split file only ``n_drsa`` and ``n_rank`` can apply.
    """
    if p.dataset == "synthetic":
        from cnp.data.synthetic import load_pair

        return load_pair(synthetic_config(p))
    from cnp.data.imagenet import build_pair, load_manifest
    from cnp.data.watermark import WatermarkStyle

    man = load_manifest(p.pair)
    names = {"train": "n_train_per_class", "drsa": "n_drsa", "rank": "n_rank", "val": "n_val_per_subgroup",
             "test": "n_test_per_subgroup"}
    sizes = {k: getattr(p, name) for k, name in names.items()}
    if p.dataset == "folder":
        defaults = Params()
        sizes = {k: v for k, v in sizes.items() if v != getattr(defaults, names[k])}
    if man.splits:
        sizes = {k: v for k, v in sizes.items() if k in ("drsa", "rank")}
    style = None
    if p.overlay_style == "params":
        style = WatermarkStyle(wm_text=p.wm_text, wm_size=p.wm_size, wm_opacity=p.wm_opacity, wm_color=p.wm_color,
                               wm_placement=p.wm_placement)
    root = p.imagenet_root if p.dataset == "imagenet" else (p.data_root or None)
    return build_pair(man.pair, root, seed=p.seed, manifest=man, label_csv=p.label_csv or None, style=style,
                      overlay=None if p.overlay == "auto" else p.overlay, image_size=p.image_size or None,
                      sizes=sizes or None)


def backbone_config(p: Params):
    from cnp.data.synthetic import CorpusConfig
    from cnp.pretrain import BackboneConfig

    return BackboneConfig(epochs=p.backbone_epochs,
                          corpus=CorpusConfig(n_per_class=p.backbone_images_per_class,
                                              n_val_per_class=max(10, p.backbone_images_per_class // 7)))


def load_pretrained(p: Params):
    """The pretrained backbone: the embedded one (cached; ``arch`` other than vgg16: that
    torchvision architecture pretrained on the same corpus) or torchvision's weights.
    ``weights="embedded"`` takes the embedded backbone for any data set (e.g. the embedded
    benchmark written out as an image folder, ``dataset="folder"``)."""
    if p.dataset == "synthetic" or p.weights == "embedded":
        if p.arch != "vgg16":
            from cnp.pretrain import load_torchvision_backbone

            model, _report = load_torchvision_backbone(p.arch, p.drsa_layer, backbone_config(p))
            return model
        from cnp.pretrain import load_backbone

        model, _report = load_backbone(backbone_config(p))
        return model
    from cnp.models import VGG16_IMAGENET_SHA256, load_torchvision_model

    if p.arch == "vgg16" and not p.weights:  # the paper's file, from weights_path or the hub cache
        from cnp.models import load_torchvision_vgg16

        sha = None if p.expected_sha256.lower() == "none" else (p.expected_sha256 or VGG16_IMAGENET_SHA256)
        if p.allow_download or p.weights_path:
            return load_torchvision_vgg16(p.weights_path or None, expected_sha256=sha, allow_download=p.allow_download)
        return load_torchvision_model("vgg16", "IMAGENET1K_V1", allow_download=False)
    sha = None if p.expected_sha256.lower() in ("", "none") else p.expected_sha256
    return load_torchvision_model(p.arch, p.weights or None, weights_path=p.weights_path or None,
                                  expected_sha256=sha, allow_download=p.allow_download)


def _lrp_config(p: Params):
    from cnp.lrp import LRPConfig

    return LRPConfig(variant=p.lrp_variant)


def _drsa_precision(p: Params, device) -> str:
    """DRSA's arithmetic as it resolves on ``device`` (``cnp.drsa.fit``'s ``auto`` rule)."""
    from cnp.runtime import bf16_native

    if p.drsa_precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return p.drsa_precision


def _stage_key(p: Params, stage: str) -> str:
    """Hash of the parameters a stage depends on (later stages include earlier ones).

    A parameter in no group below is part of every stage's key. ``wm_share_images`` is one of
    them: the warm-up stage measures the watermark share and the ablate stage the per-subspace
    shares on that many images, so a changed count must not reuse their summaries.
    """
    # the fine-tunes' arithmetic as it resolves on this device: "auto" on a device without native
    # bf16 is fp32, the same key as precision="fp32"
    dev = resolve_device(p.device)
    d = key_dict({**p.to_dict(), "precision": resolve_precision(p.precision, dev),
                  "drsa_precision": _drsa_precision(p, dev)})
    for k in ("run_dir", "device", "threads", "methods", "heatmap_images"):
        d.pop(k)
    order = {"warmup": 0, "augment": 1, "ablate": 2, "prune": 3, "evaluate": 4}
    groups = {
        1: ("layer", "K", "d_k", "lrp_variant", "drsa_steps", "drsa_restarts", "n_positions", "subspace_method",
            "drsa_precision"),
        2: ("ablate", "ap_threshold", "max_ablate", "ablation_mode"),
        3: ("step", "target", "rate_of", "freeze_drsa_layer", "epochs_per_step", "final_epochs", "ft_lr", "ft_batch_size", "ft_grad_clip", "ranking_data",
            "aggregation", "normalisation", "finetune_with_virtual_layer", "recompute_drsa", "rr_lambda", "precision"),
    }
    for level, keys in groups.items():
        if order[stage] < level:
            for k in keys:
                d.pop(k, None)
    if order[stage] >= 3 and d.get("ranking_data") == "pos+neg":
        # pruning stages computed before the rank split held negatives (RANK_LAYOUT 1) ranked on
        # positives only: never reuse them
        from cnp.data.synthetic import RANK_LAYOUT

        d["rank_layout"] = RANK_LAYOUT
    return recipe_hash({"stage": stage, "params": d})


#: The files each stage writes (besides its summary.json), relative to the run directory, and the
#: stage whose summary it reads. A summary records their SHA-256; see :func:`_done`.
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

    Trusted means: ``summary.json`` reads, was written for the same parameters, every file the
    stage wrote still has the SHA-256 recorded in it (so a truncated, corrupt or missing file is
    rebuilt, never read) and the upstream stage's summary is the one this stage was computed
    from. Anything else but a missing summary is reported with one line.
    """
    path = run.dir / stage / "summary.json"
    if not path.exists():
        return None
    try:
        s = json.loads(path.read_text())
        if not isinstance(s, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        print(f"[cnp] {stage}: {path} is unreadable ({type(exc).__name__}): re-running the stage")
        return None
    why = None
    if s.get("key") != _stage_key(run.params, stage):
        why = "its results are for other parameters"
    elif not isinstance(s.get("files"), dict):
        why = "its summary.json records no file hashes (written by an older version)"
    else:
        for rel, digest in s["files"].items():
            got = _digest(run.dir / rel)
            if got is None:
                why = f"{rel} is missing"
            elif got != digest:
                why = f"{rel} does not match the SHA-256 in its summary.json (corrupt or truncated)"
            if why:
                break
    if why is None:
        up = _STAGE_INPUT[stage]
        if up is not None and s.get("input") != _digest(run.dir / up / "summary.json"):
            why = f"the {up} stage it was computed from has changed"
    if why:
        print(f"[cnp] {stage}: {why}; re-running the stage")
        return None
    return s


def _finish(run: Run, stage: str, summary: dict) -> dict:
    """Write ``<stage>/summary.json``: the summary, the parameters key, the SHA-256 of every file
    the stage wrote and of the upstream summary it used (atomically, after those files)."""
    up = _STAGE_INPUT[stage]
    summary = {**summary, "key": _stage_key(run.params, stage),
               "files": {rel: _digest(run.dir / rel) for rel in _stage_outputs(run, stage, summary)},
               "input": _digest(run.dir / up / "summary.json") if up is not None else None}
    atomic_write_json(run.dir / stage / "summary.json", summary)
    return summary


# ============================================================================ stages
def run_warmup(run: Run, verbose: bool = True) -> dict:
    """Stage 0 (01_warmup): new 2-way head on the frozen backbone; accuracy per subgroup."""
    done = _done(run, "warmup")
    if done is not None:
        return done
    from cnp.evaluate import wm_area_fraction, wm_relevance_shares
    from cnp.warmup import warmup

    p = run.params
    with run.timer("warmup"):
        data = run.data()
        res = warmup(run.backbone(), data, epochs=p.warmup_epochs, lr=p.warmup_lr, seed=p.seed,
                     head=p.warmup_head, device=run.device, verbose=verbose)
        save_model(res.model, run.dir / "warmup" / "model.pt")
        shares = wm_relevance_shares(res.model, data["test"], _lrp_config(p), device=run.device,
                                     max_images=p.wm_share_images)
    return _finish(run, "warmup", {
        "acc": res.test_acc, "val_acc": res.val_acc, "wm_relevance_share": shares.pop("all"),
        "wm_relevance_share_by_subgroup": shares,
        "wm_area_fraction": wm_area_fraction(data["test"], p.wm_share_images),
        "loss_history": res.history,
        "data": {k: {"n": len(s), **s.counts()} for k, s in data.splits.items()},
        "seconds": run.timer.times.get("warmup", 0.0),
    })


def warm_model(run: Run):
    model, _ = load_model(run.dir / "warmup" / "model.pt")
    return set_memory_format(model.to(run.device).eval(), run.params.memory_format)


def run_augment(run: Run, verbose: bool = True) -> dict:
    """Stage 1 (02_augment): DRSA subspaces U_k at the layer; the virtual layer leaves logits unchanged."""
    done = _done(run, "augment")
    if done is not None:
        return done
    from cnp.concepts import fit_concepts
    from cnp.virtual_layer import insert_virtual_layer, remove_virtual_layer

    p = run.params
    run_warmup(run, verbose)
    model = warm_model(run)
    D = _layer_width(model, p.drsa_layer, run.data().image_size)
    if D % p.K or (p.d_k and p.K * p.d_k != D):
        raise CNPError(f"K * d_k must equal D = {D} at {p.layer}: K={p.K}, d_k={p.d_k or 'D/K'} "
                       f"(valid K: {[k for k in range(1, D + 1) if D % k == 0]})")
    with run.timer("augment"):
        fit = fit_concepts(model, run.data()["drsa"], K=p.K, layer=p.drsa_layer, steps=p.drsa_steps,
                           restarts=p.drsa_restarts, seed=p.seed, n_positions=p.n_positions,
                           method=p.subspace_method, lrp_config=_lrp_config(p), device=run.device,
                           checkpoint=run.dir / "augment" / "drsa_checkpoint.pt", verbose=verbose,
                           precision=_drsa_precision(p, run.device))
        x = run.data()["test"].images[:16]
        from cnp.data.splits import normalize_images

        xb = normalize_images(x, run.device)
        with torch.no_grad():
            before = model(xb)
            insert_virtual_layer(model, fit.U.to(run.device), p.K, layer=p.drsa_layer)
            after = model(xb)
            remove_virtual_layer(model)
        identity_error = float((after - before).abs().max() / before.abs().max().clamp(min=1e-12))
        atomic_torch_save(run.dir / "augment" / "concepts.pt",
                          {"U": fit.U.cpu(), "K": p.K, "J": fit.J, "history": fit.history, "layer": p.drsa_layer})
    return _finish(run, "augment", {
        "layer": p.layer, "drsa_layer": p.drsa_layer, "K": p.K, "d_k": D // p.K, "D": D, "J": fit.J,
        "J_history": fit.history[:: max(1, len(fit.history) // 100)], "identity_error": identity_error,
        "seconds": run.timer.times.get("augment", 0.0),
    })


def _layer_width(model, layer: str, image_size: int = 224) -> int:
    """Channels D at the output of ``layer``."""
    from cnp.models import VGG, get_layer

    host = get_layer(model, layer)
    if isinstance(model, VGG):
        width = None
        for m in model.features:
            if isinstance(m, torch.nn.Conv2d):
                width = m.out_channels
            if m is host:
                return int(width)
        raise CNPError(f"layer {layer!r} is not in the model's features")
    from cnp.models import layer_output_shape

    shape = layer_output_shape(model, layer, image_size)
    if len(shape) != 4:
        raise CNPError(f"layer {layer!r} does not output a (n, D, H, W) feature map")
    return int(shape[1])


def augmented_model(run: Run, ablated=(), mode: str = "zero"):
    """The warmed-up model with the virtual concept layer (from the augment stage)."""
    from cnp.virtual_layer import insert_virtual_layer

    model = warm_model(run)
    c = safe_torch_load(run.dir / "augment" / "concepts.pt")
    vl = insert_virtual_layer(model, c["U"].to(run.device), int(c["K"]), layer=c["layer"])
    if mode == "mean":
        vl.fit_mean(model, run.data()["drsa"].images)
    vl.set_ablation(ablated, mode)
    return model, vl


def run_ablate(run: Run, verbose: bool = True) -> dict:
    """Stage 2 (03_ablate): latent analysis (AP of R(k) vs watermark), shares, heatmaps, K'."""
    done = _done(run, "ablate")
    if done is not None:
        return done
    from cnp.concepts import (
        concept_scores,
        latent_analysis,
        propose_ablation,
        subspace_heatmaps,
        subspace_mask_share,
    )
    from cnp.data.splits import normalize_images

    p = run.params
    run_augment(run, verbose)
    with run.timer("ablate"):
        data = run.data()
        model, vl = augmented_model(run)
        # latent analysis on positive images with and without watermark (balanced: val positives)
        la_split = data["val"].positives()
        if la_split.wm.all() or not la_split.wm.any():
            la_split = data["drsa"]
        scores = concept_scores(model, vl, la_split, lrp_config=_lrp_config(p), device=run.device)
        try:
            ap = latent_analysis(scores, la_split.wm)
        except CNPError:
            ap = [float("nan")] * p.K
        per_share, overall_share = subspace_mask_share(model, vl, data["test"].positives(), lrp_config=_lrp_config(p),
                                                       device=run.device, max_images=p.wm_share_images)
        part_share = None
        if p.ablate == "auto":
            ablated = propose_ablation(ap, threshold=p.ap_threshold, max_ablate=p.max_ablate or None)
        elif p.ablate.startswith("mask:"):
            # a stand-in for the human evaluation of the heatmaps: the subspace whose heatmaps put
            # the largest share of relevance on a named part (e.g. the ball of the Figure 1 demo),
            # measured on the validation positives (the test set is only evaluated)
            part = p.ablate[5:]
            pos = data["val"].positives()
            if part not in pos.extra_masks:
                raise CNPError(f"ablate={p.ablate!r}: this data set has no '{part}' masks "
                               f"(available: {sorted(pos.extra_masks) or 'none'})")
            part_share, _ = subspace_mask_share(model, vl, pos, masks=pos.extra_masks[part],
                                                lrp_config=_lrp_config(p), device=run.device,
                                                max_images=p.wm_share_images)
            ablated = [int(torch.tensor(part_share).argmax())]
        else:
            ablated = sorted({int(v) for v in p.ablate.split(",") if v.strip()})
        # heatmap examples for the figures (positives with a watermark first)
        test = data["test"]
        order = torch.cat([test.subgroup_index("c1w1"), test.subgroup_index("c1w0")])[: p.heatmap_images]
        x = normalize_images(test.images[order], run.device)
        maps_k, maps = subspace_heatmaps(model, vl, x, lrp_config=_lrp_config(p))
        atomic_torch_save(run.dir / "ablate" / "heatmaps.pt", {
            "index": order, "images": test.images[order], "masks": test.masks[order],
            "subspaces": maps_k.cpu(), "overall": maps.cpu(),
            "extra_masks": {k: v[order] for k, v in test.extra_masks.items()},
        })
    return _finish(run, "ablate", {
        "ap_watermark": ap, "wm_relevance_share": per_share, "overall_wm_relevance_share": overall_share,
        "ablated": ablated, "ablation_mode": p.ablation_mode, "latent_analysis_split": la_split.name,
        "mean_concept_relevance": scores.mean(0).tolist(), "part_relevance_share": part_share,
        "seconds": run.timer.times.get("ablate", 0.0),
    })


def run_prune(run: Run, verbose: bool = True) -> dict:
    """Stage 3 (04_prune): the iterative schedule for every method; curves per method."""
    p = run.params
    summary = _done(run, "prune")
    if summary is not None and all(m in summary["curves"] for m in p.methods):
        return summary
    from cnp.lrp import LRPConfig
    from cnp.pruning import PruneConfig, run_pruning

    abl = run_ablate(run, verbose)
    cfg = PruneConfig(step=p.step, target=p.target, rate_of=p.rate_of, epochs_per_step=p.epochs_per_step, final_epochs=p.final_epochs,
                      lr=p.ft_lr, batch_size=p.ft_batch_size, grad_clip=p.ft_grad_clip, ranking_data=p.ranking_data,
                      aggregation=p.aggregation, normalisation=p.normalisation, protect=(p.protect_layer,),
                      freeze=(p.protect_layer,) if p.freeze_drsa_layer else (),
                      finetune_with_virtual_layer=p.finetune_with_virtual_layer, recompute_drsa=p.recompute_drsa,
                      rr_lambda=p.rr_lambda, wm_share_images=p.wm_share_images, lrp=LRPConfig(variant=p.lrp_variant),
                      precision=p.precision, memory_format=p.memory_format, drsa_precision=p.drsa_precision)
    curves, timings = dict(summary["curves"]) if summary else {}, dict(summary["timings"]) if summary else {}
    for method in p.methods:
        if method in curves:
            continue
        state = None
        if METHOD_SPECS[method].concept:
            model, vl = augmented_model(run, abl["ablated"], p.ablation_mode)
            state = vl.state()
        model = warm_model(run)
        t0 = time.perf_counter()
        res = run_pruning(model, run.data(), method, cfg, concept_state=state, seed=p.seed, device=run.device,
                          run_dir=run.dir / "prune", verbose=verbose)
        run.timer.times[f"prune:{method}"] = time.perf_counter() - t0
        curves[method] = res.curve
        timings[method] = res.timings
        if method == "cnp":
            _pruned_heatmaps(run, res.model)
        # record progress after every method (a restart skips finished methods)
        _finish(run, "prune", {"curves": curves, "timings": timings})
    return _finish(run, "prune", {"curves": curves, "timings": timings})


def _pruned_heatmaps(run: Run, model) -> None:
    """Overall LRP heatmaps of the CNP-pruned model on the ablate stage's example images."""
    from cnp.data.splits import normalize_images
    from cnp.evaluate import pixel_relevance
    from cnp.lrp import LRP

    path = run.dir / "ablate" / "heatmaps.pt"
    if not path.exists():
        return
    h = safe_torch_load(path)
    x = normalize_images(h["images"], run.device)
    out = LRP(model, _lrp_config(run.params)).attribute(x, 1)
    atomic_torch_save(run.dir / "prune" / "heatmaps_cnp.pt", {"overall": pixel_relevance(out.input_relevance).cpu()})


def run_evaluate(run: Run, verbose: bool = True) -> dict:
    """Stage 4 (05_evaluate): collect everything into ``metrics.json`` (the results contract)."""
    p = run.params
    warm = run_warmup(run, verbose)
    aug = run_augment(run, verbose)
    abl = run_ablate(run, verbose)
    pr = run_prune(run, verbose)
    timings = {"warmup": warm.get("seconds", 0.0), "augment": aug.get("seconds", 0.0),
               "ablate": abl.get("seconds", 0.0)}
    for m, t in pr["timings"].items():
        timings[f"prune:{m}"] = float(sum(t.values()))
    metrics = {
        "pair": p.pair, "seed": p.seed, "dataset": p.dataset, "params": p.to_dict(),
        "unpruned": {"acc": warm["acc"], "wm_relevance_share": warm["wm_relevance_share"],
                     "wm_relevance_share_by_subgroup": warm.get("wm_relevance_share_by_subgroup", {}),
                     "wm_area_fraction": warm.get("wm_area_fraction", float("nan"))},
        "drsa": {"layer": p.layer, "K": p.K, "d_k": aug["d_k"], "J": aug["J"], "ap_watermark": abl["ap_watermark"],
                 "wm_relevance_share": abl["wm_relevance_share"], "ablated": abl["ablated"]},
        "curves": {m: [_curve_entry(e) for e in c] for m, c in pr["curves"].items()},
        "timings_s": timings,
        # the arithmetic the numbers come from (the fine-tunes' precision as resolved on this device)
        "compute": {"device": run.device.type, "memory_format": p.memory_format,
                    "precision": resolve_precision(p.precision, run.device),
                    "drsa_precision": _drsa_precision(p, run.device), "torch": torch.__version__},
    }
    atomic_write_json(run.dir / "metrics.json", metrics)
    if verbose:
        ran = set(run.timer.times)
        cached = {k for k in timings if k not in ran}
        print(stage_breakdown(timings, {f"prune:{m}": t for m, t in pr["timings"].items()}, cached,
                              title=f"[cnp] time per stage: {p.pair} seed {p.seed} ({run.dir})"))
    return metrics


def _curve_entry(e: dict) -> dict:
    """A schedule entry as ``metrics.json`` carries it (the method-specific fields where present)."""
    keep = ("pruned", "pruned_of_all", "pruned_of_prunable", "acc", "wm_relevance_share",
            "wm_relevance_share_by_subgroup", "params", "macs", "stage", "val_acc", "filters", "step",
            "acc_virtual_layer", "acc_ablation_removed", "drsa_recomputed")
    return {k: e[k] for k in keep if k in e}


def run_all(verbose: bool = True, **overrides) -> dict:
    """Every stage of one run (what ``cnp.sweep`` does per (pair, seed) through the notebooks)."""
    run = open_run(**overrides)
    return run_evaluate(run, verbose)


__all__ = ["METHODS", "Params", "Run", "SMOKE", "STAGES", "augmented_model", "load_data", "make_params",
           "open_run", "run_ablate", "run_all", "run_augment", "run_evaluate", "run_prune", "run_warmup",
           "warm_model"]
