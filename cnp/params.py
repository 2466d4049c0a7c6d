"""The parameters of one run: a few typed sections, one line of help per parameter (no torch).

A run's :class:`Params` holds eight frozen sections, one per part of the paper's pipeline::

    Params.run           seed, run directory, device, threads, the arithmetic
    Params.data          the class pair, its source and split sizes, the watermark and its bias
    Params.model         the architecture, its weights, the embedded backbone's pretraining
    Params.warmup        the binary warm-up (section 4.1)
    Params.concepts      DRSA at the layer l, the virtual layer and the ablated set K' (4.2, 4.3)
    Params.pruning       the LRP filter ranking and the iterative schedule (4.4, Appendix A)
    Params.experimental  switches beyond the paper's method (not used by ``cnp`` or ``vanilla``)
    Params.report        how many images the measurements and the heatmaps use

Every parameter has one flat name, unique over the sections (``K``, ``step``, ``wm_text``): the
name of the notebooks' parameters cells, of ``python -m cnp.sweep -p name=value`` and of the
``params`` object in ``metrics.json``. :meth:`Params.from_flat` builds the sections from flat
names (converting strings from the command line), :meth:`Params.to_dict` gives them back.
``None`` means "not set" where a parameter has a data-dependent default (``image_size``,
``faint_rate``, ``threads``); there are no other placeholder values.

The defaults are the paper's method (Appendix A). :data:`BENCHMARK_DEFAULTS` holds the embedded
benchmark's method settings where they differ; the notebooks and presets apply them.
Validation of values that need the data or the network (a pair name, K against the layer's
width) is :func:`cnp.pipeline.make_params`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cnp.io import CNPError


@dataclass(frozen=True)
class RunParams:
    """Where and how a run computes: its seed, directory, device and arithmetic."""

    seed: int = 0
    run_dir: str = ""
    device: str = "auto"
    threads: int | None = None
    smoke: bool = False
    memory_format: str = "channels_last"
    precision: str = "auto"
    drsa_precision: str = "auto"


@dataclass(frozen=True)
class DataParams:
    """The class pair, where its images come from, the split sizes, the watermark and its bias."""

    pair: str = "carton-dugong"
    dataset: str = "synthetic"
    imagenet_root: str = ""
    data_root: str = ""
    label_csv: str = ""
    overlay: str = "auto"
    overlay_style: str = "manifest"
    image_size: int | None = None
    n_train_per_class: int = 650
    n_drsa: int = 500
    n_rank: int = 500
    n_val_per_subgroup: int = 150
    n_test_per_subgroup: int = 500
    wm_text: str = "stock"
    wm_size: float = 0.22
    wm_opacity: float = 0.55
    wm_color: str = "white"
    wm_placement: str = "random"
    wm_rate_pos: float = 0.9
    wm_rate_neg: float = 0.05
    faint_rate: float | None = None
    faint_opacity: float = 0.3


@dataclass(frozen=True)
class ModelParams:
    """The network: its architecture, its weights, and the embedded backbone's pretraining."""

    arch: str = "vgg16"
    weights: str = ""
    weights_path: str = ""
    allow_download: bool = False
    expected_sha256: str = ""
    backbone_epochs: int = 8
    backbone_images_per_class: int = 700


@dataclass(frozen=True)
class WarmupParams:
    """The binary warm-up of the pretrained network (the paper's section 4.1)."""

    warmup_epochs: int = 15
    warmup_lr: float = 0.01
    warmup_head: str = "classifier"


@dataclass(frozen=True)
class ConceptParams:
    """DRSA's subspaces U_k at the layer l, the virtual layer, and the ablated set K'."""

    layer: str = "conv4_3"
    K: int = 4
    lrp_variant: str = "alpha1beta0"
    drsa_steps: int = 500
    drsa_restarts: int = 3
    n_positions: int = 20
    subspace_method: str = "drsa"
    ablate: str = "auto"
    ap_threshold: float = 0.85
    max_ablate: int = 1
    ablation_mode: str = "zero"


@dataclass(frozen=True)
class PruningParams:
    """The LRP filter ranking, the iterative schedule and its fine-tunes, the methods compared."""

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
    rr_lambda: float = 1.0


@dataclass(frozen=True)
class ExperimentalParams:
    """Switches beyond the paper's method; each changes what ``cnp`` does, so each is keyed."""

    freeze_drsa_layer: bool = False
    finetune_with_virtual_layer: bool = False
    recompute_drsa: bool = False


@dataclass(frozen=True)
class ReportParams:
    """How many images the measurements and the notebooks' heatmaps use.

    ``heatmap_images`` is in no cache key. ``wm_share_images`` is not in the keys of the warm-up
    and DRSA stages (a changed count re-measures the warm-up's shares on the saved model); it is
    in the keys of the ablate stage (``ablate="mask:<part>"`` chooses K' by a share measured on
    that many images) and of the pruning stage (the schedule measures the share after every
    step, with models it does not keep).
    """

    wm_share_images: int = 200
    heatmap_images: int = 6


#: The sections of :class:`Params` by attribute name, in the order the help lists them.
SECTIONS: dict[str, type] = {
    "run": RunParams, "data": DataParams, "model": ModelParams, "warmup": WarmupParams,
    "concepts": ConceptParams, "pruning": PruningParams, "experimental": ExperimentalParams,
    "report": ReportParams,
}


@dataclass(frozen=True)
class Params:
    """All parameters of one run, in sections (see the module's docstring).

    Build one with :meth:`from_flat` (or :func:`cnp.pipeline.make_params`, which also validates
    the values against the data and the network); read a value as ``p.concepts.K``.
    """

    run: RunParams = field(default_factory=RunParams)
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    warmup: WarmupParams = field(default_factory=WarmupParams)
    concepts: ConceptParams = field(default_factory=ConceptParams)
    pruning: PruningParams = field(default_factory=PruningParams)
    experimental: ExperimentalParams = field(default_factory=ExperimentalParams)
    report: ReportParams = field(default_factory=ReportParams)

    @property
    def run_path(self) -> Path:
        """The run directory: ``run_dir``, else ``runs/<pair>/seed<k>``."""
        if self.run.run_dir:
            return Path(self.run.run_dir)
        return Path("runs") / self.data.pair / f"seed{self.run.seed}"

    @classmethod
    def from_flat(cls, **values: Any) -> Params:
        """Sections from flat names; strings (the command line's) are converted to each type.

        ``smoke=True`` sets the small sizes of :data:`SMOKE` where no value is given.

        Raises
        ------
        CNPError
            An unknown name (with the closest known one) or a value of the wrong type.
        """
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            hint = difflib.get_close_matches(unknown[0], FIELDS, n=1)
            raise CNPError(f"unknown parameter {unknown[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                           + f"; known parameters: {', '.join(sorted(FIELDS))}")
        smoke = coerce("smoke", values.get("smoke", False), bool)
        if smoke:  # the smoke sizes where no value is given
            values = {**{k: v for k, v in SMOKE.items() if k not in values}, **values}
        parts: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for name, value in values.items():
            section, typ, _default = FIELDS[name]
            parts[section][name] = coerce(name, value, typ)
        return cls(**{name: SECTIONS[name](**kw) for name, kw in parts.items()})

    def to_dict(self) -> dict[str, Any]:
        """Every parameter by its flat name (``metrics.json``'s ``params``; lists for tuples)."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            for f in fields(getattr(self, name)):
                v = getattr(getattr(self, name), f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def replace(self, **values: Any) -> Params:
        """A copy with some flat parameters changed (converted like :meth:`from_flat`)."""
        return Params.from_flat(**{**self.to_dict(), **values})


def _field_table() -> dict[str, tuple[str, Any, Any]]:
    table: dict[str, tuple[str, Any, Any]] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name in table:  # pragma: no cover - a programming error caught at import
                raise RuntimeError(f"parameter {f.name} is defined in two sections")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            table[f.name] = (section, hints[f.name], default)
    return table


#: Every parameter: flat name -> (section, type, default).
FIELDS: dict[str, tuple[str, Any, Any]] = _field_table()


def type_name(typ: Any) -> str:
    """``int``, ``int or None``, ``list`` ... for help texts."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) is tuple:
        return "list"
    if type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return f"{inner.__name__} or None"
    return getattr(typ, "__name__", str(typ))


def coerce(name: str, value: Any, typ: Any) -> Any:
    """``value`` as ``typ`` (bool, int, float, str, tuple of str, or one of those or None).

    Strings are parsed as the command line gives them (``"true"``, ``"0.1"``, ``"cnp,vanilla"``;
    ``"none"`` for an optional parameter). Raises :class:`CNPError` for a value of the wrong type.
    """
    args = typing.get_args(typ)
    if type(None) in args:  # X | None
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
            return None
        typ = [a for a in args if a is not type(None)][0]
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
            return str(value)
        if typing.get_origin(typ) is tuple:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return tuple(str(v) for v in value)
    except (TypeError, ValueError):
        raise CNPError(f"parameter {name}={value!r} has the wrong type: expected {type_name(typ)}") from None
    return value


#: Overrides applied by ``smoke=True`` (CI): tiny sizes, few steps; explicit values win.
SMOKE: dict[str, Any] = {
    "n_train_per_class": 60, "n_drsa": 40, "n_rank": 30, "n_val_per_subgroup": 10,
    "n_test_per_subgroup": 15, "backbone_epochs": 2, "backbone_images_per_class": 80, "warmup_epochs": 2,
    "drsa_steps": 20, "drsa_restarts": 1, "n_positions": 5, "step": 0.4, "target": 0.8, "epochs_per_step": 1,
    "final_epochs": 1, "wm_share_images": 10, "heatmap_images": 2,
}

#: The embedded benchmark's method settings where they differ from the paper's (the ``Params``
#: defaults), used by the notebooks' parameters cells and every preset on the embedded benchmark:
#: K = 8 subspaces of the 128-channel conv4_3 (the paper: K = 4 of VGG-16's 512 channels) and the
#: pruning rate counted over the prunable filters (the paper counts all filters). docs/benchmark.md
#: says how they were chosen.
BENCHMARK_DEFAULTS: dict[str, Any] = {"K": 8, "rate_of": "prunable"}

#: One line per parameter: what it means (``python -m cnp.sweep --list-params`` prints it with the
#: parameter's section, type and default; a test keeps it complete).
PARAM_HELP: dict[str, str] = {
    # run
    "seed": "seed of the data split, the warm-up, DRSA's starts and the fine-tunes",
    "run_dir": "run directory ('' : runs/<pair>/seed<k>)",
    "device": "auto, cpu or cuda",
    "threads": "torch threads (None: $CNP_THREADS, else all cores)",
    "smoke": "tiny sizes and few steps (a check of the machinery, minutes on a CPU)",
    "memory_format": "channels_last (NHWC convolutions, faster) or contiguous (NCHW)",
    "drsa_precision": "DRSA's two large GEMMs: auto (bf16 where the device computes it natively, else fp32), bf16, fp32",
    "precision": "the fine-tunes' arithmetic: auto or bf16 (bf16 autocast where the device computes bf16 natively: CUDA, CPUs with AVX512-BF16 or AMX; fp32 elsewhere), fp32",
    # data
    "pair": "class pair: carton-dugong (easy), crate-packet (hard), basketball (Figure 1 demo); imagenet/folder: or a manifest file",
    "dataset": "synthetic (the embedded benchmark, no download), imagenet (an ImageNet tree) or folder (any tree a manifest describes)",
    "imagenet_root": "dataset=imagenet: the folder with train/<wnid>/ class folders",
    "label_csv": "watermark labels file,watermark ('': the manifest's, when it has one)",
    "data_root": "dataset=folder: the image tree, root/<class>/ or root/train/<wnid>/ ('': the manifest's root)",
    "overlay": "imagenet/folder: the overlay that makes the w1 subgroups: auto (the manifest's), cnp or imagenet-w",
    "overlay_style": "imagenet/folder: the cnp overlay's style: manifest (its watermark.style) or params (the wm_* values)",
    "image_size": "image side in pixels (None: 48 for synthetic, else the manifest's centre crop, 224 for the paper's pairs)",
    "n_train_per_class": "training images per class (warm-up and fine-tuning)",
    "n_drsa": "positive images DRSA is fitted on",
    "n_rank": "images the filter ranking uses",
    "n_val_per_subgroup": "validation images per subgroup c0w0, c0w1, c1w0, c1w1",
    "n_test_per_subgroup": "test images per subgroup",
    "wm_text": "synthetic (imagenet/folder with overlay_style=params): the watermark's text",
    "wm_size": "synthetic (imagenet/folder with overlay_style=params): watermark height / image size",
    "wm_opacity": "synthetic (imagenet/folder with overlay_style=params): watermark opacity",
    "wm_color": "synthetic (imagenet/folder with overlay_style=params): watermark colour",
    "wm_placement": "synthetic (imagenet/folder with overlay_style=params): random, fixed or tiled",
    "wm_rate_pos": "share of positive training images with a watermark",
    "wm_rate_neg": "share of negative training images with a watermark",
    "faint_rate": "synthetic: share of images with a faint class signal (None: the pair's default)",
    "faint_opacity": "synthetic: opacity of the faint class signal",
    # model
    "arch": "vgg16 (the paper's network) or a torchvision CNN (vgg16_bn, resnet18, resnet50 ...); synthetic: pretrained on the embedded corpus",
    "weights": "imagenet/folder: torchvision weights by name (IMAGENET1K_V1, DEFAULT; '': weights_path, or VGG-16's file in the hub cache; embedded: the embedded benchmark's backbone)",
    "weights_path": "imagenet/folder: a weights file of arch ('': torchvision's cache)",
    "allow_download": "imagenet/folder: let torchvision download missing weights (default: never touch the network)",
    "expected_sha256": "imagenet/folder: SHA-256 of weights_path ('': torchvision's own check; 'none': skip, for your own weights)",
    "backbone_epochs": "synthetic: pretraining epochs of the embedded backbone",
    "backbone_images_per_class": "synthetic: pretraining images per corpus class",
    # warm-up
    "warmup_epochs": "epochs of the binary warm-up",
    "warmup_lr": "learning rate of the warm-up",
    "warmup_head": "what the warm-up trains: classifier (fc6-fc8, fc8 new) or fc8 (the new last layer only)",
    # concepts
    "layer": "the DRSA layer l (paper or qualified name; the virtual layer sits on its ReLU); each U_k has D / K dimensions",
    "K": "number of concept subspaces U_k (must divide the layer's width D)",
    "lrp_variant": "LRP rules: alpha1beta0 (the paper), epsilon or gamma",
    "drsa_steps": "DRSA optimisation steps",
    "drsa_restarts": "DRSA restarts (the best objective J is kept)",
    "n_positions": "feature-map positions sampled per image for DRSA",
    "subspace_method": "drsa (the paper), prca (baseline) or oracle (from watermark masks)",
    "ablate": "ablated set K': auto (latent analysis), indices like 3 or 1,3, or mask:<part>",
    "ap_threshold": "auto: ablate subspaces whose watermark AP reaches this",
    "max_ablate": "auto: at most this many subspaces (never all K)",
    "ablation_mode": "zero (the paper) or mean (the paper's footnote 3)",
    # pruning
    "methods": "pruning methods, comma-separated: cnp, vanilla, l1, random, cnp-keep, cnp-rr, cnp-recompute, "
               "cnp-refit, cnp-keep-refit, cnp-rr-refit, cnp-posthoc, vanilla-posthoc",
    "step": "share of the filters removed per pruning step",
    "target": "final pruning rate",
    "rate_of": "what step and target count: all filters (the paper) or the prunable ones",
    "epochs_per_step": "fine-tuning epochs after each pruning step",
    "final_epochs": "epochs of the final recovery fine-tune",
    "ft_lr": "fine-tuning learning rate",
    "ft_batch_size": "fine-tuning batch size",
    "ft_grad_clip": "fine-tuning gradient-norm clip (0: off)",
    "ranking_data": "pos (positive images, the paper) or pos+neg",
    "aggregation": "relevance per filter: signed (the paper's code), abs (Yeom et al.) or abs_of_sum",
    "normalisation": "per layer: sum, v / sum(v) (the paper's code and Yeom et al.), mean or none",
    "rr_lambda": "cnp-rr: weight of the concept penalty in the fine-tunes",
    # experimental
    "freeze_drsa_layer": "do not fine-tune the DRSA layer's weights",
    "finetune_with_virtual_layer": "fine-tune with the ablated layer active (the paper's code; text: bypassed)",
    "recompute_drsa": "refit DRSA after every fine-tune for cnp too (the method cnp-recompute does this)",
    # report
    "wm_share_images": "watermarked test images explained per evaluation (relevance share on the watermark)",
    "heatmap_images": "example images whose heatmaps the notebooks show",
}


__all__ = ["BENCHMARK_DEFAULTS", "FIELDS", "PARAM_HELP", "SECTIONS", "SMOKE", "ConceptParams", "DataParams",
           "ExperimentalParams", "ModelParams", "Params", "PruningParams", "ReportParams", "RunParams",
           "WarmupParams", "coerce", "type_name"]
