"""The iterative pruning schedule of the paper (stage 3 and Appendix A.1), for CNP and baselines.

For ``n = target / step`` steps:

1. **rank** every filter (LRP relevance of the positive logit on the ranking set; for ``cnp``
   through the *enabled, ablated* virtual concept layer, for ``vanilla`` without it; ``l1`` and
   ``random`` baselines) and **remove** the lowest-scoring filters, structurally, so that
   ``step`` x (the original number of filters of every conv, ``rate_of='all'``, the paper's "5 %
   of total network filters"; or of the prunable convs only, ``rate_of='prunable'``) more are
   gone after each step; the DRSA layer (``conv4_3``) and the virtual layer are never pruned;
2. **fine-tune** all weights for ``epochs_per_step`` epochs on the training set with the virtual
   layer *bypassed* (the paper's text), or kept active (``finetune_with_virtual_layer``, what the
   paper's code does), then re-enable it for the next ranking; optionally **recompute DRSA** warm-started
   from the previous U (``recompute_drsa``, Appendix C's suggestion);
3. **evaluate** on the balanced test (and validation) set: accuracy overall and per subgroup,
   the share of relevance on watermark pixels, parameters and MACs.

At the end the virtual layer is removed permanently and a final recovery fine-tune runs. Every
step is checkpointed atomically in ``run_dir``; a restarted run resumes after the last finished
step and ends with identical numbers (CPU). Fine-tuning data stay uint8 tensors in memory.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cnp.data.splits import PairData
from cnp.evaluate import subgroup_accuracy, subgroup_accuracy_with_site, wm_relevance_shares
from cnp.io import CNPError, atomic_torch_save, load_current, recipe_hash, tensor_hash
from cnp.lrp import LRPConfig
from cnp.models import VGG, count_macs, count_params, get_layer, layer_output_shape
from cnp.pruning.penalty import ConceptPenalty
from cnp.pruning.ranking import (
    AGGREGATIONS,
    NORMALISATIONS,
    filter_scores,
    protected_indices,
    select_filters,
)
from cnp.pruning.structure import VGGStructure, prunable_structure
from cnp.runtime import MEMORY_FORMATS, PRECISIONS, progress, resolve_precision, set_memory_format
from cnp.training import make_optimizer, train_epoch
from cnp.virtual_layer import (
    KeptAblation,
    VirtualLayer,
    from_state,
    get_kept_ablation,
    get_virtual_layer,
    keep_ablation,
    kept_from_state,
    remove_virtual_layer,
)


@dataclass(frozen=True)
class Method:
    """A pruning method: a filter criterion plus what the schedule does with the concept layer.

    Attributes
    ----------
    name : str
        What ``methods=`` selects.
    criterion : str
        ``lrp`` (relevance of the positive logit), ``l1`` or ``random``.
    concept : bool
        Needs the virtual layer (``concept_state``) and ranks through it, ablated.
    keep : bool
        The ablation stays in the deployed network (active in every fine-tune, kept at the end
        as :class:`cnp.virtual_layer.KeptAblation`); otherwise it is bypassed while fine-tuning
        and removed before the final fine-tune (the paper).
    penalty : bool
        The fine-tunes add :class:`cnp.pruning.penalty.ConceptPenalty` on the ablated subspaces.
    recompute : bool
        DRSA is refitted after every intermediate fine-tune and the ablated subspaces
        re-identified (the paper's Appendix C suggestion).
    refit : str
        How those refits start: ``warm`` (from the previous U, ``recompute_steps`` steps, the
        ablated set re-identified as ``PruneConfig.reidentify`` says) or ``fresh`` (random starts,
        ``refit_steps`` steps, re-identified by latent analysis: the subspaces with the highest
        watermark AP of concept relevance on the DRSA images, as many as were ablated).
    posthoc : bool
        After the final fine-tune, DRSA is fitted afresh on the pruned network, the watermark
        subspace re-identified by latent analysis, and its ablation kept in the deployed network
        (no training after it).
    paper : bool
        The method as the paper describes it.
    summary : str
        One line for tables and ``--help``.
    """

    name: str
    criterion: str
    concept: bool = False
    keep: bool = False
    penalty: bool = False
    recompute: bool = False
    refit: str = "warm"
    posthoc: bool = False
    paper: bool = False
    summary: str = ""

    @property
    def needs_concepts(self) -> bool:
        """Whether ``run_pruning`` needs ``concept_state`` (to rank through it, or for the last step)."""
        return self.concept or self.posthoc


#: every pruning method ``run_pruning`` (and ``methods=`` in notebooks and sweeps) accepts
METHOD_SPECS: dict[str, Method] = {m.name: m for m in (
    Method("cnp", "lrp", concept=True, paper=True,
           summary="the paper: LRP ranking through the ablated virtual layer; layer bypassed while fine-tuning, "
                   "removed before the final fine-tune"),
    Method("vanilla", "lrp", paper=True, summary="LRP pruning (Yeom et al.) without the concept layer"),
    Method("l1", "l1", summary="filters with the smallest L1 weight norm"),
    Method("random", "random", summary="random filters"),
    Method("cnp-keep", "lrp", concept=True, keep=True,
           summary="beyond the paper: CNP whose ablation stays in the deployed network (a - U_K' U_K'^T a), "
                   "active in every fine-tune"),
    Method("cnp-rr", "lrp", concept=True, penalty=True,
           summary="beyond the paper: CNP whose fine-tunes penalise the logit margin's gradient in the "
                   "ablated subspaces (rr_lambda)"),
    Method("cnp-recompute", "lrp", concept=True, recompute=True,
           summary="beyond the paper: CNP with DRSA refitted after every intermediate fine-tune, warm-started "
                   "from the previous U (the paper's future work)"),
    Method("cnp-refit", "lrp", concept=True, recompute=True, refit="fresh",
           summary="beyond the paper: CNP with DRSA fitted afresh after every intermediate fine-tune and K' "
                   "re-identified by latent analysis"),
    Method("cnp-keep-refit", "lrp", concept=True, keep=True, recompute=True, refit="fresh",
           summary="beyond the paper: cnp-keep whose kept ablation follows a fresh DRSA fit after every fine-tune"),
    Method("cnp-rr-refit", "lrp", concept=True, penalty=True, recompute=True, refit="fresh",
           summary="beyond the paper: cnp-rr whose penalty follows a fresh DRSA fit after every fine-tune"),
    Method("cnp-posthoc", "lrp", concept=True, posthoc=True,
           summary="beyond the paper: CNP, then DRSA fitted afresh on the pruned network and the re-identified "
                   "watermark subspace ablated in the deployed network (no training after it)"),
    Method("vanilla-posthoc", "lrp", posthoc=True,
           summary="beyond the paper: vanilla LRP pruning, then the last step of cnp-posthoc (a fresh DRSA fit's "
                   "watermark subspace ablated in the deployed network)"),
)}
METHODS = tuple(METHOD_SPECS)
#: what the pruning rate is a fraction of (see PruneConfig.rate_of)
RATE_BASES = ("all", "prunable")


@dataclass(frozen=True)
class PruneConfig:
    """Hyper-parameters of the schedule (defaults: the paper's Appendix A.1).

    Parameters
    ----------
    step : float
        Fraction of the original filters removed per step (5 %; 10 % in Table 1).
    target : float
        Final pruning rate, in (0, 1) (80 %).
    rate_of : str
        What ``step`` and ``target`` are fractions of: ``all`` (default, the paper: every conv
        filter of the network, the protected DRSA layer included, which is never pruned itself)
        or ``prunable`` (the filters of the unprotected convs only).
    epochs_per_step : int
        Fine-tuning epochs after each step (2; Table 1 tried 0, 5, 10 - 0 collapses).
    final_epochs : int
        Epochs of the final recovery fine-tune.
    lr, momentum, weight_decay, batch_size, optimizer : fine-tuning (SGD by default).
    grad_clip : float
        Gradient-norm clipping while fine-tuning (0 disables): bounds the updates right after a
        removal. It did not prevent the one-class collapse of 20 % steps on the embedded
        benchmark (smaller steps did; README "Results").
    ranking_data : str
        ``pos`` (positive images of the ranking set, the paper) or ``pos+neg``.
    aggregation : str
        How LRP relevance is aggregated per filter: ``signed`` (default, the paper's code),
        ``abs`` (Yeom et al.) or ``abs_of_sum`` (see :mod:`cnp.pruning.ranking`).
    normalisation : str
        Per-layer normalisation before the global ranking: ``sum`` (default, v / sum(v): Yeom
        et al. and the paper's code), ``mean`` or ``none`` (see
        :func:`cnp.pruning.ranking.normalise_per_layer`).
    protect : tuple of str
        Convs never pruned (the DRSA layer).
    freeze : tuple of str
        Convs whose weights are not fine-tuned (none by default; ``("conv4_3",)`` keeps the DRSA
        layer's weights, so the subspaces stay those DRSA was fitted on).
    finetune_with_virtual_layer : bool
        Fine-tune with the ablated virtual layer active, as the paper's code does (its text
        bypasses the layer, the default here; docs/fidelity.md).
    recompute_drsa : bool
        Beyond the paper: recompute DRSA after each fine-tune, warm-started from the previous U.
    recompute_steps : int
        DRSA steps of each warm-started recomputation.
    refit_steps : int
        DRSA steps of each fresh fit (``refit="fresh"`` methods and ``cnp-posthoc``; one start).
    drsa_precision : str
        The recomputations' DRSA arithmetic (:func:`cnp.drsa.fit`'s ``precision``).
    reidentify : str
        How the ablated subspaces are found again after a recomputation: ``overlap`` (largest
        overlap with the previous ablated subspaces; needs no labels) or ``ap`` (latent analysis
        with the DRSA set's watermark labels).
    rr_lambda : float
        Weight of the concept penalty in the fine-tunes of ``cnp-rr`` (other methods ignore it).
    wm_share_images : int
        Watermarked test images explained per evaluation (0 disables the relevance share).
    amp : bool
        Allow bf16 autocast in the fine-tunes where ``precision`` asks for it (``False``: fp32
        everywhere).
    precision : str
        The fine-tunes' arithmetic (:data:`cnp.runtime.PRECISIONS`): ``auto`` (and ``bf16``) =
        bf16 autocast where the device computes bf16 natively (CUDA, CPUs with AVX512-BF16 or
        AMX), fp32 elsewhere; ``fp32`` everywhere. Ranking, LRP and evaluation always run in fp32.
    memory_format : str
        ``channels_last`` (NHWC convolutions, faster on CPUs and GPUs) or ``contiguous`` (NCHW,
        the arithmetic of versions before 0.4); the model is put into it at the start and after
        every removal.
    lrp : LRPConfig
        LRP rules of the ranking.
    """

    step: float = 0.05
    target: float = 0.8
    rate_of: str = "all"
    epochs_per_step: int = 2
    final_epochs: int = 2
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    optimizer: str = "sgd"
    grad_clip: float = 5.0
    ranking_data: str = "pos"
    aggregation: str = "signed"
    normalisation: str = "sum"
    protect: tuple[str, ...] = ("conv4_3",)
    freeze: tuple[str, ...] = ()
    finetune_with_virtual_layer: bool = False
    recompute_drsa: bool = False
    recompute_steps: int = 100
    refit_steps: int = 300
    drsa_precision: str = "auto"
    reidentify: str = "overlap"
    rr_lambda: float = 1.0
    wm_share_images: int = 200
    amp: bool = True
    precision: str = "auto"
    memory_format: str = "channels_last"
    lrp: LRPConfig = field(default_factory=LRPConfig)

    def __post_init__(self) -> None:
        for name in ("protect", "freeze"):
            v = getattr(self, name)
            if isinstance(v, str):
                object.__setattr__(self, name, (v,))
            else:
                object.__setattr__(self, name, tuple(v))
        if self.normalisation not in NORMALISATIONS:
            raise CNPError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        if not (0.0 < float(self.target) < 1.0):
            raise CNPError(f"target pruning rate must be in (0, 1), got {self.target}")
        if not (0.0 < float(self.step) <= float(self.target)):
            raise CNPError(f"step must be in (0, target={self.target}], got {self.step} "
                           "(a step larger than the target)")
        for name in ("epochs_per_step", "final_epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise CNPError(f"{name} must be a non-negative integer, got {v!r}")
        if self.ranking_data not in ("pos", "pos+neg"):
            raise CNPError(f"ranking_data must be 'pos' or 'pos+neg', got {self.ranking_data!r}")
        if self.aggregation not in AGGREGATIONS:
            raise CNPError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.rate_of not in RATE_BASES:
            raise CNPError(f"rate_of must be one of {RATE_BASES}, got {self.rate_of!r}")
        if not float(self.rr_lambda) >= 0:
            raise CNPError(f"rr_lambda must be >= 0, got {self.rr_lambda!r}")
        if self.precision not in PRECISIONS:
            raise CNPError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.drsa_precision not in PRECISIONS:
            raise CNPError(f"drsa_precision must be one of {PRECISIONS}, got {self.drsa_precision!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise CNPError(f"memory_format must be one of {MEMORY_FORMATS}, got {self.memory_format!r}")
        for name in ("recompute_steps", "refit_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise CNPError(f"{name} must be a positive integer, got {v!r}")
        if self.reidentify not in ("overlap", "ap"):
            raise CNPError(f"reidentify must be 'overlap' or 'ap', got {self.reidentify!r}")
        if self.epochs_per_step == 0:
            warnings.warn("epochs_per_step=0: the paper reports catastrophic degradation without "
                          "intermediate fine-tuning", stacklevel=2)

    @property
    def n_steps(self) -> int:
        return int(math.ceil(round(self.target / self.step, 6)))

    def recipe(self) -> dict:
        d = asdict(self)
        d["lrp"] = {k: (dict(v) if k == "overrides" else v) for k, v in asdict(self.lrp).items()}
        return d


@dataclass
class PruneResult:
    """A finished schedule: the pruned model (virtual layer removed), its curve and timings."""

    model: torch.nn.Module
    curve: list[dict]
    timings: dict[str, float]
    method: str


#: the measurements of a curve entry that depend only on the deployable network and the data
#: (what :func:`_unpruned_entry` shares between the methods of one run directory)
_MEASURED = ("acc", "val_acc", "wm_relevance_share", "wm_relevance_share_by_subgroup")


def _evaluate(model: torch.nn.Module, data: PairData, cfg: PruneConfig, device, image_size: int, keep: bool = False,
              filters: int | None = None, measured: dict | None = None) -> dict:
    """One curve entry, measured on the deployable network: without the virtual layer (the paper
    removes it at the end), or with the ablation for a method that keeps it (``keep``, or a model
    that carries a :class:`~cnp.virtual_layer.KeptAblation`). The other variant is reported beside
    it: ``acc_virtual_layer`` (virtual layer active) or ``acc_ablation_removed``.

    ``measured``: the :data:`_MEASURED` values of this same deployable network, measured before
    on the same data with the same settings (a plain network: not ``keep``); they are taken as
    they are, and only ``acc_virtual_layer`` is measured (one pass over the test split with the
    virtual layer active) when the model carries an enabled one."""
    vl, kept = get_virtual_layer(model), get_kept_ablation(model)
    site = vl if vl is not None else kept
    keep = keep or (vl is None and kept is not None)
    if measured is not None and keep:
        raise CNPError("measurements of the plain network cannot stand for a network that keeps its ablation")
    was = site.enabled if site is not None else None
    if site is not None:
        site.enabled = keep  # the deployable network
    acc_vl = acc_removed = None
    extra_macs, extra_params = _kept_extra(model, vl if keep else None, image_size)
    try:
        if measured is not None:
            acc, shares, val_acc = measured["acc"], dict(measured["wm_relevance_share_by_subgroup"]), measured["val_acc"]
            shares["all"] = measured["wm_relevance_share"]
            if site is not None and was:
                site.enabled = True
                acc_vl = subgroup_accuracy(model, data["test"], device=device)
                site.enabled = False
        else:
            if site is not None and (was or keep):  # with and without the site, sharing the layers below it
                plain, with_site = subgroup_accuracy_with_site(model, site, data["test"], device=device)
                acc, acc_vl, acc_removed = (with_site, None, plain) if keep else (plain, with_site, None)
            else:
                acc = subgroup_accuracy(model, data["test"], device=device)
            # wm_share_images = 0 explains no image: NaN shares, no LRP pass
            shares = wm_relevance_shares(model, data["test"], cfg.lrp, device=device,
                                         max_images=max(cfg.wm_share_images, 0))
            val_acc = subgroup_accuracy(model, data["val"], device=device)
        entry = {
            "acc": acc,
            "val_acc": val_acc,
            "wm_relevance_share": shares.pop("all"),
            "wm_relevance_share_by_subgroup": shares,
            "params": count_params(model) + extra_params,
            "macs": count_macs(model, image_size) + extra_macs,
            "filters": int(sum(model.conv_widths)) if filters is None else int(filters),
        }
    finally:
        if site is not None:
            site.enabled = was
    if acc_vl is not None:
        entry["acc_virtual_layer"] = acc_vl
    if acc_removed is not None:
        entry["acc_ablation_removed"] = acc_removed
    return entry


def _unpruned_entry(model: torch.nn.Module, data: PairData, cfg: PruneConfig, device, image_size: int, keep: bool,
                    filters: int, ckpt: Path | None, model_hash: str) -> dict:
    """The schedule's step-0 entry: :func:`_evaluate` on the unpruned network.

    Every method of a run directory starts from the same network, so its :data:`_MEASURED` values
    are the same for all that deploy it plain (all but the keeping methods): the first method
    measures them and leaves them beside its checkpoint (``unpruned_eval.pt``, keyed by the
    network's weights, the test and validation data, the LRP rules, the number of explained
    images, the memory format, the device type and torch's version); the others read them back.
    The values are those a fresh measurement gives, to the bit (the same passes on the same
    batches), so only the time is saved: one evaluation of the unpruned network per method.
    """
    if keep or ckpt is None:
        return _evaluate(model, data, cfg, device, image_size, keep=keep, filters=filters)
    path = ckpt.with_name(UNPRUNED_EVALUATION)
    key = _unpruned_key(model_hash, data, cfg, device)
    blob = _held_unpruned(path, key)
    if blob is not None:
        return _evaluate(model, data, cfg, device, image_size, filters=filters, measured=blob["measured"])
    entry = _evaluate(model, data, cfg, device, image_size, filters=filters)
    atomic_torch_save(path, {"key": key, "measured": {k: entry[k] for k in _MEASURED}})
    return entry


#: the file beside the pruning checkpoints that holds the unpruned network's step-0 measurements
UNPRUNED_EVALUATION = "unpruned_eval.pt"


def _model_hash(model: torch.nn.Module) -> str:
    return tensor_hash(*[v for _, v in sorted(model.state_dict().items())])


def _held_unpruned(path: Path, key: str) -> dict | None:
    """The unpruned measurements stored at ``path`` for ``key``; ``None`` when there are none
    (no file, an unreadable one, or one of other inputs)."""
    return load_current(path, what="unpruned evaluation", report=None,
                        check=lambda b: None if isinstance(b, dict) and b.get("key") == key else "belongs to other inputs")


def _unpruned_key(model_hash: str, data: PairData, cfg: PruneConfig, device) -> str:
    return recipe_hash({"model": model_hash, "test": data["test"].fingerprint(), "val": data["val"].fingerprint(),
                        "lrp": cfg.recipe()["lrp"], "wm_share_images": max(cfg.wm_share_images, 0),
                        "memory_format": cfg.memory_format, "device": torch.device(device).type,
                        "torch": torch.__version__})


def record_unpruned_evaluation(model: torch.nn.Module, data: PairData, config: PruneConfig, measured: dict,
                               run_dir: str | Path, device: torch.device | str = "cpu") -> Path:
    """Leave measurements of the unpruned ``model`` where :func:`run_pruning`'s step 0 reads them.

    For a caller that has already evaluated the network the schedule starts from (the pipeline's
    warm-up stage measures the warmed-up model on the same test and validation splits, with the
    same functions and LRP rules): ``measured`` holds ``acc`` and ``val_acc``
    (:func:`cnp.evaluate.subgroup_accuracy` of ``data["test"]`` and ``data["val"]``),
    ``wm_relevance_share`` and ``wm_relevance_share_by_subgroup``
    (:func:`cnp.evaluate.wm_relevance_shares` of ``data["test"]`` with ``config.lrp`` on at most
    ``config.wm_share_images`` images), of ``model`` in ``config.memory_format`` on ``device``.
    The file is keyed like the schedule's own, so it serves only runs of this network, data and
    settings; one that holds measurements of the same inputs already is left as it is. Returns
    its path (``run_dir/unpruned_eval.pt``).
    """
    missing = [k for k in _MEASURED if k not in measured]
    if missing:
        raise CNPError(f"measured lacks {missing}: record the test and validation accuracy and the watermark shares")
    net = set_memory_format(copy.deepcopy(model).to(device).eval(), config.memory_format)
    remove_virtual_layer(net)
    key = _unpruned_key(_model_hash(net), data, config, device)
    path = Path(run_dir) / UNPRUNED_EVALUATION
    if _held_unpruned(path, key) is None:  # a file of the same inputs is not written again
        atomic_torch_save(path, {"key": key, "measured": {k: measured[k] for k in _MEASURED}})
    return path


def _kept_extra(model: torch.nn.Module, vl: VirtualLayer | None, image_size: int) -> tuple[int, int]:
    """(MACs per image, stored numbers) that the deployed concept correction adds: the kept
    ablation's, or that of the low-rank equivalent of ``vl`` (a keeping method's virtual layer,
    kept at the end); (0, 0) without either."""
    kept = get_kept_ablation(model)
    if kept is None and vl is not None and vl.ablated:
        kept = KeptAblation.from_virtual_layer(vl)
        object.__setattr__(kept, "_host", vl._host)  # a plain reference, as attach_site sets it
    if kept is None:
        return 0, 0
    h = _feature_size(model, kept._host, image_size)
    return kept.extra_macs(h, h), kept.extra_params()


def _feature_size(model: torch.nn.Module, host, image_size: int) -> int:
    """Side of the (square) feature map that ``host`` outputs at ``image_size``."""
    if isinstance(model, VGG):
        h = image_size
        for m in model.features:
            if isinstance(m, torch.nn.MaxPool2d):
                h //= 2
            if m is host:
                return h
        raise CNPError("the concept layer's host is not a layer of model.features")
    name = {m: n for n, m in model.named_modules()}.get(host)
    if name is None:
        raise CNPError("the concept layer's host is not a module of the model")
    return int(layer_output_shape(model, name, image_size)[-1])


def _bf16(cfg: PruneConfig, device) -> bool:
    """Whether the fine-tunes run in bf16 autocast on ``device``."""
    return bool(cfg.amp) and resolve_precision(cfg.precision, device) == "bf16"


def _finetune(model: torch.nn.Module, data: PairData, cfg: PruneConfig, epochs: int, seed_parts, device,
              use_vl: bool, verbose: bool, penalty: ConceptPenalty | None = None) -> None:
    if epochs == 0:
        return
    vl = get_virtual_layer(model)
    was = vl.enabled if vl is not None else None
    if vl is not None:
        vl.enabled = use_vl
    frozen = {id(p) for name in cfg.freeze for p in get_layer(model, name).parameters()}
    params = [p for p in model.parameters() if id(p) not in frozen]
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    opt = make_optimizer(params, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    seed = int(recipe_hash({"ft": [str(s) for s in seed_parts]}, 12), 16) % (2**62)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    try:
        for e in range(epochs):
            train_epoch(model, data["train"], opt, g, cfg.batch_size, device, desc=f"fine-tune {e + 1}/{epochs}",
                        amp=_bf16(cfg, device), verbose=verbose, grad_clip=cfg.grad_clip, penalty=penalty,
                        penalty_weight=penalty.weight if penalty is not None else 0.0)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        if vl is not None:
            vl.enabled = was
        model.eval()


def reidentify_by_overlap(old_U: torch.Tensor, new_U: torch.Tensor, old_ablated, K: int) -> list[int]:
    """The subspaces of ``new_U`` that take over the ablated ones of ``old_U``: the
    ``len(old_ablated)`` blocks with the largest overlap ``sum ||old_k^T new_j||_F^2`` (over the
    old ablated blocks ``old_k``), sorted. Needs no labels."""
    d_k = old_U.shape[1] // K
    old_blocks = [old_U[:, k * d_k:(k + 1) * d_k].double() for k in old_ablated]
    ov = [sum(float((ob.T @ new_U[:, j * d_k:(j + 1) * d_k].double()).pow(2).sum()) for ob in old_blocks)
          for j in range(K)]
    return sorted(sorted(range(K), key=lambda j: -ov[j])[: len(old_ablated)])


def _reidentify_by_ap(model: torch.nn.Module, vl: VirtualLayer, data: PairData, cfg: PruneConfig, n: int,
                      device) -> list[int]:
    """The ``n`` subspaces of ``vl`` with the highest watermark AP of concept relevance R(k) on
    the DRSA images (latent analysis, section 4.3), sorted."""
    from cnp.concepts import concept_relevance, latent_analysis

    vl.set_ablation((), vl.mode)
    scores = concept_relevance(model, vl, data["drsa"], lrp_config=cfg.lrp, device=device)
    ap = latent_analysis(scores, data["drsa"].wm)
    return sorted(sorted(range(vl.K), key=lambda k: -ap[k])[:n])


def _recompute_concepts(model: torch.nn.Module, vl: VirtualLayer, data: PairData, cfg: PruneConfig, seed: int,
                        step: int, device, verbose: bool, fresh: bool = False) -> dict:
    """Refit DRSA and re-identify the ablated subspaces: warm-started from the current U
    (``recompute_steps``; re-identified as ``cfg.reidentify`` says) or, ``fresh``, from a random
    start (``refit_steps``; re-identified by latent analysis).

    When the refit fails - a step left no relevance at the layer on the DRSA images (the contexts
    C are all zeros), or every start diverged (no positive relevance: the warm start's objective
    is 0 and its gradient not finite) - the previous U and ablated set are kept and the entry says
    so (``kept_previous``, ``reason``)."""
    from cnp.concepts import fit_concepts

    old_U, old_ablated = vl.U.detach().clone(), list(vl.ablated)
    vl.enabled = False
    try:
        fit = fit_concepts(model, data["drsa"], K=vl.K, layer=vl.layer_name,
                           steps=cfg.refit_steps if fresh else cfg.recompute_steps,
                           restarts=1, seed=seed + step, init=None if fresh else old_U.cpu(), lrp_config=cfg.lrp,
                           device=device, verbose=False, precision=cfg.drsa_precision)
    except CNPError as exc:
        # no relevance left at the layer on the DRSA images (C all zeros), or every start diverged
        reason = "diverged" if "diverged" in str(exc) else "no relevance" if "all zeros" in str(exc) else None
        if reason is None:
            raise
        if verbose:
            print(f"[cnp] step {step}: DRSA recomputation failed ({reason}); keeping the previous subspaces")
        return {"J": float("nan"), "ablated": sorted(old_ablated), "kept_previous": True, "reason": reason}
    finally:
        vl.enabled = True
    vl.U = fit.U.to(vl.U.device)
    if fresh or cfg.reidentify == "ap":
        new_ablated = _reidentify_by_ap(model, vl, data, cfg, len(old_ablated), device)
    else:
        new_ablated = reidentify_by_overlap(old_U, vl.U.to(old_U), old_ablated, vl.K)
    if vl.mode == "mean":
        vl.fit_mean(model, data["drsa"].images)
    vl.set_ablation(new_ablated, vl.mode)
    return {"J": fit.J, "ablated": sorted(new_ablated), "kept_previous": False, "fresh": bool(fresh),
            "overlap": float(sum((old_U[:, k * vl.d_k:(k + 1) * vl.d_k].double().T
                                  @ vl.U[:, j * vl.d_k:(j + 1) * vl.d_k].to(old_U).double()).pow(2).sum()
                                 for k in old_ablated for j in new_ablated) / (len(old_ablated) * vl.d_k))}


def run_pruning(
    model: torch.nn.Module,
    data: PairData,
    method: str = "cnp",
    config: PruneConfig | None = None,
    *,
    concept_state: dict | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    run_dir: str | Path | None = None,
    verbose: bool = True,
) -> PruneResult:
    """Run the whole schedule for one method.

    Parameters
    ----------
    model : nn.Module
        The warmed-up binary model (not modified; a copy is pruned): the paper's
        :class:`~cnp.models.VGG` or any CNN that Torch-Pruning can trace (torchvision's VGG
        family, ResNets; see :mod:`cnp.pruning.structure`).
    data : PairData
        ``train`` (fine-tuning), ``rank`` (ranking), ``drsa`` (recomputation), ``val``/``test``.
    method : str
        One of :data:`METHODS` (see :data:`METHOD_SPECS`): ``cnp``, ``vanilla``, ``l1``,
        ``random``, or a variant beyond the paper (``cnp-keep``, ``cnp-rr``, ``cnp-recompute``,
        ``cnp-refit``, ``cnp-keep-refit``, ``cnp-rr-refit``, ``cnp-posthoc``, ``vanilla-posthoc``).
    concept_state : dict
        For the concept methods (``cnp``, its variants and ``vanilla-posthoc``): the virtual layer
        (``VirtualLayer.state()``: U, K, ablated, mode, mean, layer).
    run_dir : path, optional
        Where ``prune_<method>.pt`` checkpoints go; a run with the same inputs resumes there. The
        methods of one run directory share the unpruned network's step-0 measurements
        (``unpruned_eval.pt``; :func:`record_unpruned_evaluation`).
    """
    cfg = config or PruneConfig()
    if method not in METHODS:
        raise CNPError(f"unknown pruning method {method!r}; use one of {METHODS}")
    spec = METHOD_SPECS[method]
    if spec.needs_concepts and concept_state is None:
        raise CNPError(f"method {method!r} needs concept_state (the virtual layer: U, K, ablated set)")
    if spec.concept and not concept_state.get("ablated"):
        if spec.keep or spec.penalty:
            raise CNPError(f"method {method!r} needs an ablated set K' (concept_state['ablated'] is empty)")
        warnings.warn("CNP with an empty ablated set K' is vanilla LRP pruning", stacklevel=2)
    recompute = spec.recompute or (spec.concept and cfg.recompute_drsa)
    device = torch.device(device)
    image_size = data.image_size
    model = set_memory_format(copy.deepcopy(model).to(device).eval(), cfg.memory_format)
    remove_virtual_layer(model)
    struct = prunable_structure(model, image_size)
    protect = _protected(struct, cfg.protect)
    for name in cfg.freeze:
        get_layer(model, name)
    if spec.needs_concepts:
        _check_site_protected(struct, concept_state["layer"], protect)
    widths = struct.widths
    n_prunable = sum(w for i, w in enumerate(widths) if i not in protect)
    n_all = sum(widths)
    n_basis = n_all if cfg.rate_of == "all" else n_prunable
    if int(round(cfg.target * n_basis)) > n_prunable - (len(widths) - len(protect)):
        raise CNPError(f"a target of {cfg.target:.0%} of {'all' if cfg.rate_of == 'all' else 'the prunable'} "
                       f"{n_basis} filters cannot be reached: only {n_prunable} filters are prunable "
                       f"(one is kept per layer); lower target or use rate_of='prunable'")
    fresh = spec.refit == "fresh"
    model_hash = _model_hash(model)

    def key_of(m: str) -> str:
        recipe, ms = cfg.recipe(), METHOD_SPECS[m]
        if not ms.penalty:
            recipe.pop("rr_lambda")  # only the penalised fine-tunes depend on it
        if ms.refit != "fresh" and not ms.posthoc:
            recipe.pop("refit_steps")  # only fresh fits depend on it
        return recipe_hash({
            "method": m, "cfg": recipe, "seed": seed, "bf16": _bf16(cfg, device), "model": model_hash,
            "data": {k: s.fingerprint() for k, s in data.splits.items()},
            "concept": None if concept_state is None or not ms.needs_concepts else {
                "U": tensor_hash(concept_state["U"]), "K": concept_state["K"],
                "ablated": list(concept_state["ablated"]), "mode": concept_state["mode"],
                "layer": concept_state["layer"]},
        })

    key = key_of(method)
    ckpt = Path(run_dir) / f"prune_{method}.pt" if run_dir is not None else None
    curve: list[dict] = []
    timings: dict[str, float] = {}
    start_step = 1
    vl = None
    if spec.concept:
        vl = from_state(model, concept_state)
    resumed = _try_resume(ckpt, key, verbose)
    base = None
    if spec.posthoc and (resumed is None or not resumed["done"]) and ckpt is not None and not recompute:
        # cnp-posthoc = cnp's schedule + a last step (vanilla-posthoc: vanilla's): a finished
        # schedule of the same inputs in this run directory is that schedule, bit for bit
        base_method = "cnp" if spec.concept else "vanilla"
        base = _try_resume(ckpt.with_name(f"prune_{base_method}.pt"), key_of(base_method), False)
        if base is not None and base["done"]:
            resumed = {**base, "done": False, "step": cfg.n_steps + 1, "vl": concept_state, "reused": True}
            if verbose:
                print(f"[cnp] {method}: reusing the finished {base_method} schedule of this run directory")
        else:
            base = None
    if resumed is not None:
        remove_virtual_layer(model)
        if isinstance(struct, VGGStructure):
            model = struct.rebuild(resumed["arch"]).to(device)
        else:
            model = struct.rebuild(resumed["arch"], model, torch.zeros(1, 3, image_size, image_size, device=device))
        model.load_state_dict(resumed["state_dict"])
        set_memory_format(model.eval(), cfg.memory_format)
        struct = prunable_structure(model, image_size)
        vl = None
        after_final = not resumed["done"] and resumed["step"] > cfg.n_steps  # cnp-posthoc's last step is left
        if resumed.get("vl") is not None and not after_final:
            vl = from_state(model, resumed["vl"])
        if resumed.get("kept") is not None:
            kept_from_state(model, resumed["kept"])
        curve, timings = [dict(e) for e in resumed["curve"]], dict(resumed["timings"])
        if resumed["done"]:
            return PruneResult(model, curve, timings, method)
        start_step = resumed["step"] + 1
        if after_final:
            return _posthoc(model, data, cfg, method, resumed["vl"], curve, timings, seed, device, image_size, struct,
                            ckpt, key, verbose)

    def tick(stage, t0):
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0

    if not curve:
        t0 = time.perf_counter()
        curve.append({"step": 0, "pruned": 0.0, "pruned_of_all": 0.0, "pruned_of_prunable": 0.0, "stage": "step",
                      **_unpruned_entry(model, data, cfg, device, image_size, spec.keep, sum(struct.widths),
                                        ckpt, model_hash)})
        tick("evaluate", t0)
    removed_total = n_prunable - sum(w for i, w in enumerate(struct.widths) if i not in protect)
    steps = range(start_step, cfg.n_steps + 1)
    for s in progress(steps, desc=f"prune [{method}]", disable=not verbose, initial=start_step - 1,
                      total=cfg.n_steps):
        goal = int(round(min(s * cfg.step, cfg.target) * n_basis))
        n_remove = goal - removed_total
        t0 = time.perf_counter()
        if vl is not None:
            vl.enabled = True
        criterion = spec.criterion
        scores = filter_scores(
            model, criterion, data["rank"],
            generator=torch.Generator().manual_seed(seed * 1000 + s), members=struct.members,
            **({"ranking_data": cfg.ranking_data, "aggregation": cfg.aggregation, "lrp_config": cfg.lrp,
                "device": device} if criterion == "lrp" else {}),
        )
        tick("rank", t0)
        t0 = time.perf_counter()
        chosen = select_filters(scores, n_remove, protect, normalise=criterion != "random",
                                normalisation=cfg.normalisation)
        struct.remove(chosen)
        set_memory_format(model, cfg.memory_format)  # the removal's new weights are NCHW
        removed_total = goal
        tick("remove", t0)
        t0 = time.perf_counter()
        _finetune(model, data, cfg, cfg.epochs_per_step, ("step", seed, s), device,
                  use_vl=cfg.finetune_with_virtual_layer or spec.keep, verbose=verbose,
                  penalty=_penalty(vl, cfg) if spec.penalty else None)
        tick("fine-tune", t0)
        extra = {}
        if vl is not None and recompute:
            t0 = time.perf_counter()
            extra["drsa_recomputed"] = _recompute_concepts(model, vl, data, cfg, seed, s, device, verbose, fresh=fresh)
            tick("drsa-recompute", t0)
        t0 = time.perf_counter()
        entry = {"step": s, "pruned": removed_total / n_basis, "pruned_of_all": removed_total / n_all,
                 "pruned_of_prunable": removed_total / n_prunable, "stage": "step",
                 **_evaluate(model, data, cfg, device, image_size, keep=spec.keep, filters=sum(struct.widths)),
                 **extra}
        tick("evaluate", t0)
        curve.append(entry)
        t0 = time.perf_counter()
        _save(ckpt, key, model, vl, curve, timings, s, done=False, arch=struct.arch)
        if ckpt is not None:
            tick("checkpoint", t0)
    # end of schedule: remove the augmented layers permanently (a keeping method keeps the ablation
    # as its low-rank equivalent), final recovery fine-tune
    penalty = _penalty(vl, cfg) if spec.penalty and vl is not None else None
    kept = None
    final_state = vl.state() if vl is not None else concept_state
    if spec.keep and vl is not None:
        kept = keep_ablation(model)
    remove_virtual_layer(model)
    t0 = time.perf_counter()
    _finetune(model, data, cfg, cfg.final_epochs, ("final", seed), device, use_vl=False, verbose=verbose,
              penalty=penalty)
    tick("fine-tune", t0)
    t0 = time.perf_counter()
    curve.append({"step": cfg.n_steps + 1, "pruned": curve[-1]["pruned"],
                  "pruned_of_all": curve[-1].get("pruned_of_all"),
                  "pruned_of_prunable": curve[-1].get("pruned_of_prunable"), "stage": "final",
                  **_evaluate(model, data, cfg, device, image_size, filters=sum(struct.widths))})
    tick("evaluate", t0)
    if spec.posthoc:
        _save(ckpt, key, model, None, curve, timings, cfg.n_steps + 1, done=False, arch=struct.arch, vl_state=final_state)
        return _posthoc(model, data, cfg, method, final_state, curve, timings, seed, device, image_size, struct, ckpt,
                        key, verbose)
    _save(ckpt, key, model, None, curve, timings, cfg.n_steps + 1, done=True, kept=kept, arch=struct.arch)
    return PruneResult(model, curve, timings, method)


def _posthoc(model, data: PairData, cfg: PruneConfig, method: str, vl_state: dict, curve: list, timings: dict,
             seed: int, device, image_size: int, struct, ckpt, key: str, verbose: bool) -> PruneResult:
    """``cnp-posthoc``'s last step on the finished, fine-tuned network: DRSA fitted afresh at the
    concept layer, the watermark subspace(s) re-identified by latent analysis (as many as were
    ablated), their ablation kept in the deployed network; a second ``final`` entry (the network
    as deployed) follows the recovered one."""
    t0 = time.perf_counter()
    vl = from_state(model, vl_state)
    info = _recompute_concepts(model, vl, data, cfg, seed, cfg.n_steps + 1, device, verbose, fresh=True)
    kept = keep_ablation(model)
    timings["drsa-recompute"] = timings.get("drsa-recompute", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    curve.append({"step": cfg.n_steps + 2, "pruned": curve[-1]["pruned"],
                  "pruned_of_all": curve[-1].get("pruned_of_all"),
                  "pruned_of_prunable": curve[-1].get("pruned_of_prunable"), "stage": "final",
                  **_evaluate(model, data, cfg, device, image_size, filters=sum(struct.widths)),
                  "drsa_recomputed": info})
    timings["evaluate"] = timings.get("evaluate", 0.0) + time.perf_counter() - t0
    _save(ckpt, key, model, None, curve, timings, cfg.n_steps + 2, done=True, kept=kept, arch=struct.arch)
    return PruneResult(model, curve, timings, method)


def _penalty(vl: VirtualLayer, cfg: PruneConfig) -> ConceptPenalty:
    """The concept penalty on ``vl``'s ablated subspaces at its layer."""
    W = torch.cat([vl.blocks()[k] for k in vl.ablated], dim=1)
    return ConceptPenalty(W, vl.layer_name, cfg.rr_lambda)


def _protected(struct, names) -> set[int]:
    """Indices of the protected channel groups (a VGG's convs by name; any model: the group of
    the named layer, or of the conv that feeds it)."""
    if isinstance(struct, VGGStructure):
        # a conv by name, or a layer of the features after it (relu4_3: its conv4_3); anything
        # else (fc6) is refused by protected_indices as "not a convolution"
        feats = {id(m) for m in struct.model.features if not isinstance(m, torch.nn.Conv2d)}
        after = [n for n in names if id(get_layer(struct.model, n)) in feats]
        return protected_indices(struct.model, [n for n in names if n not in after]) | {struct.group_of(n) for n in after}
    return {struct.group_of(n) for n in names}


def _check_site_protected(struct, layer: str, protect: set[int]) -> None:
    """The channels feeding the virtual layer (e.g. conv4_3 for relu4_3) must never be pruned."""
    try:
        idx = struct.group_of(layer)
    except CNPError:
        return
    if idx not in protect:
        raise CNPError(f"the conv feeding the virtual layer at {layer} (group {idx}, {struct.names[idx]}) must be in "
                       f"protect (e.g. protect=('conv4_3',) or the layer itself); pruning it would change the "
                       "subspaces' dimension")


def _save(path: Path | None, key: str, model: torch.nn.Module, vl: VirtualLayer | None, curve, timings, step: int,
          done: bool, kept=None, arch=None, vl_state: dict | None = None) -> None:
    if path is None:
        return
    blob = {
        "key": key, "step": step, "done": done, "arch": arch if arch is not None else model.arch,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vl": vl.state() if vl is not None else vl_state, "curve": curve, "timings": timings,
    }
    if kept is not None:
        blob["kept"] = kept.state()
    atomic_torch_save(path, blob)


def _try_resume(path: Path | None, key: str, verbose: bool) -> dict | None:
    if path is None:
        return None
    blob = load_current(path, what="pruning checkpoint", then="starting over", report=print if verbose else None,
                        check=lambda b: None if isinstance(b, dict) and b.get("key") == key
                        else "belongs to other inputs")
    if blob is None:
        return None
    if verbose and not blob.get("done"):
        print(f"[cnp] resuming {path.name} after step {blob['step']}")
    return blob


__all__ = ["METHODS", "METHOD_SPECS", "RATE_BASES", "UNPRUNED_EVALUATION", "Method", "PruneConfig", "PruneResult",
           "record_unpruned_evaluation", "reidentify_by_overlap", "run_pruning"]
