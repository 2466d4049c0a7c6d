"""The paper's stages as functions of their inputs: each takes what it needs and returns what it made.

================================  ===============================================  ===========
stage                             computes                                         notebook
================================  ===============================================  ===========
:func:`warm_up`                   a new 2-way head on the frozen backbone;         01_warmup
                                  accuracy per subgroup
:func:`augment`                   DRSA's subspaces U_k at the layer l; the         02_augment
                                  virtual layer leaves the logits unchanged
:func:`ablate`                    latent analysis (AP of R(k) against the          03_ablate
                                  watermark), shares, heatmaps, K'
:func:`cnp.pruning.run_pruning`   the iterative schedule of one method             04_prune
:func:`metrics`                   a run's results as ``metrics.json`` holds them   05_evaluate
================================  ===============================================  ===========

None of them reads or writes files except the checkpoints they are given, sets seeds or threads,
or knows about run directories: :mod:`cnp.pipeline` calls them and caches what they return.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnp.concepts import (
    concept_relevance,
    fit_concepts,
    latent_analysis,
    propose_ablation,
    subspace_heatmaps,
    subspace_mask_share,
)
from cnp.data.splits import PairData, Split
from cnp.evaluate import pixel_relevance, wm_area_fraction, wm_relevance_shares
from cnp.images import normalize_images
from cnp.io import CNPError
from cnp.lrp import LRP, LRPConfig
from cnp.models import VGG, get_layer, layer_output_shape
from cnp.params import ConceptParams, WarmupParams
from cnp.virtual_layer import VirtualLayer, insert_virtual_layer, remove_virtual_layer
from cnp.warmup import warmup


# ============================================================================ warm-up
def warm_up(backbone: torch.nn.Module, data: PairData, cfg: WarmupParams, *, seed: int,
            device: torch.device, verbose: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The warm-up (section 4.1): the trained model and its accuracies, history and split sizes."""
    res = warmup(backbone, data, epochs=cfg.warmup_epochs, lr=cfg.warmup_lr, seed=seed, head=cfg.warmup_head,
                 device=device, verbose=verbose)
    return res.model, {"acc": res.test_acc, "val_acc": res.val_acc, "loss_history": res.history,
                       "data": {k: {"n": len(s), **s.counts()} for k, s in data.splits.items()}}


def watermark_shares(model: torch.nn.Module, test: Split, lrp_config: LRPConfig, *, n_images: int,
                     device: torch.device) -> dict[str, Any]:
    """The share of the positive logit's relevance on watermark pixels (overall and per
    watermarked subgroup) and the watermark's share of the pixels, on ``n_images`` test images."""
    shares = wm_relevance_shares(model, test, lrp_config, device=device, max_images=n_images)
    return {"wm_relevance_share": shares.pop("all"), "wm_relevance_share_by_subgroup": shares,
            "wm_area_fraction": wm_area_fraction(test, n_images), "wm_share_images": n_images}


# ============================================================================ augment
def layer_width(model: torch.nn.Module, layer: str, image_size: int = 224) -> int:
    """Channels D at the output of ``layer``."""
    host = get_layer(model, layer)
    if isinstance(model, VGG):
        width = None
        for m in model.features:
            if isinstance(m, torch.nn.Conv2d):
                width = m.out_channels
            if m is host:
                return int(width)
        raise CNPError(f"layer {layer!r} is not in the model's features")
    shape = layer_output_shape(model, layer, image_size)
    if len(shape) != 4:
        raise CNPError(f"layer {layer!r} does not output a (n, D, H, W) feature map")
    return int(shape[1])


@dataclass
class Concepts:
    """DRSA's result at one layer: the basis U (D, D), K blocks of D / K columns, the objective J."""

    U: torch.Tensor
    K: int
    layer: str
    J: float
    history: list[float]

    def state(self) -> dict[str, Any]:
        return {"U": self.U.cpu(), "K": self.K, "J": self.J, "history": self.history, "layer": self.layer}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Concepts:
        return cls(U=state["U"], K=int(state["K"]), layer=state["layer"], J=state["J"], history=state["history"])


def augment(model: torch.nn.Module, drsa_split: Split, test: Split, cfg: ConceptParams, *, drsa_layer: str,
            seed: int, lrp_config: LRPConfig, precision: str, device: torch.device,
            checkpoint: Path | None = None, verbose: bool = True) -> tuple[Concepts, dict[str, Any]]:
    """DRSA (section 4.2) at ``drsa_layer``: the subspaces, and the virtual layer's identity check.

    Raises
    ------
    CNPError
        When K does not divide the layer's width D.
    """
    D = layer_width(model, drsa_layer, drsa_split.image_size)
    if D % cfg.K:
        raise CNPError(f"K * d_k must equal D = {D} at {cfg.layer}: K={cfg.K} does not divide it (d_k = D / K; "
                       f"valid K: {[k for k in range(1, D + 1) if D % k == 0]})")
    fit = fit_concepts(model, drsa_split, K=cfg.K, layer=drsa_layer, steps=cfg.drsa_steps,
                       restarts=cfg.drsa_restarts, seed=seed, n_positions=cfg.n_positions,
                       method=cfg.subspace_method, lrp_config=lrp_config, device=device,
                       checkpoint=checkpoint, verbose=verbose, precision=precision)
    xb = normalize_images(test.images[:16], device)
    with torch.no_grad():
        before = model(xb)
        insert_virtual_layer(model, fit.U.to(device), cfg.K, layer=drsa_layer)
        after = model(xb)
        remove_virtual_layer(model)
    identity_error = float((after - before).abs().max() / before.abs().max().clamp(min=1e-12))
    concepts = Concepts(U=fit.U.cpu(), K=cfg.K, layer=drsa_layer, J=fit.J, history=fit.history)
    return concepts, {
        "layer": cfg.layer, "drsa_layer": drsa_layer, "K": cfg.K, "d_k": D // cfg.K, "D": D, "J": fit.J,
        "J_history": fit.history[:: max(1, len(fit.history) // 100)], "identity_error": identity_error,
    }


def with_virtual_layer(model: torch.nn.Module, concepts: Concepts, *, ablated=(), mode: str = "zero",
                       mean_images: torch.Tensor | None = None,
                       device: torch.device | str = "cpu") -> tuple[torch.nn.Module, VirtualLayer]:
    """``model`` with the virtual concept layer of ``concepts`` and the ablated set ``ablated``
    (``mode="mean"`` needs ``mean_images``, whose mean coordinates replace the ablated ones)."""
    vl = insert_virtual_layer(model, concepts.U.to(device), concepts.K, layer=concepts.layer)
    if mode == "mean":
        if mean_images is None:
            raise CNPError("ablation mode 'mean' needs images to take the mean over (mean_images)")
        vl.fit_mean(model, mean_images)
    vl.set_ablation(ablated, mode)
    return model, vl


# ============================================================================ ablate
def ablate(model: torch.nn.Module, vl: VirtualLayer, data: PairData, cfg: ConceptParams, *,
           lrp_config: LRPConfig, n_share_images: int, n_heatmaps: int,
           device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """Latent analysis and the choice of K' (section 4.3); heatmaps of the example images.

    Returns the heatmaps (images, masks, per-subspace and overall relevance maps) and the
    summary (AP per subspace, shares, K').
    """
    # latent analysis on positive images with and without watermark (balanced: val positives)
    la_split = data["val"].positives()
    if la_split.wm.all() or not la_split.wm.any():
        la_split = data["drsa"]
    scores = concept_relevance(model, vl, la_split, lrp_config=lrp_config, device=device)
    try:
        ap = latent_analysis(scores, la_split.wm)
    except CNPError:
        ap = [float("nan")] * cfg.K
    per_share, overall_share = subspace_mask_share(model, vl, data["test"].positives(), lrp_config=lrp_config,
                                                   device=device, max_images=n_share_images)
    part_share = None
    if cfg.ablate == "auto":
        ablated = propose_ablation(ap, threshold=cfg.ap_threshold, max_ablate=cfg.max_ablate)
    elif cfg.ablate.startswith("mask:"):
        # a stand-in for the human evaluation of the heatmaps: the subspace whose heatmaps put
        # the largest share of relevance on a named part (e.g. the ball of the Figure 1 demo),
        # measured on the validation positives (the test set is only evaluated)
        part = cfg.ablate[5:]
        pos = data["val"].positives()
        if part not in pos.extra_masks:
            raise CNPError(f"ablate={cfg.ablate!r}: this data set has no '{part}' masks "
                           f"(available: {sorted(pos.extra_masks) or 'none'})")
        part_share, _ = subspace_mask_share(model, vl, pos, masks=pos.extra_masks[part], lrp_config=lrp_config,
                                            device=device, max_images=n_share_images)
        ablated = [int(torch.tensor(part_share).argmax())]
    else:
        ablated = sorted({int(v) for v in cfg.ablate.split(",") if v.strip()})
    # heatmap examples for the figures (positives with a watermark first)
    test = data["test"]
    order = torch.cat([test.subgroup_index("c1w1"), test.subgroup_index("c1w0")])[:n_heatmaps]
    x = normalize_images(test.images[order], device)
    maps_k, maps = subspace_heatmaps(model, vl, x, lrp_config=lrp_config)
    heatmaps = {"index": order, "images": test.images[order], "masks": test.masks[order],
                "subspaces": maps_k.cpu(), "overall": maps.cpu(),
                "extra_masks": {k: v[order] for k, v in test.extra_masks.items()}}
    return heatmaps, {
        "ap_watermark": ap, "wm_relevance_share": per_share, "overall_wm_relevance_share": overall_share,
        "ablated": ablated, "ablation_mode": cfg.ablation_mode, "latent_analysis_split": la_split.name,
        "mean_concept_relevance": scores.mean(0).tolist(), "part_relevance_share": part_share,
    }


# ============================================================================ prune
def pruned_heatmaps(model: torch.nn.Module, images: torch.Tensor, lrp_config: LRPConfig,
                    device: torch.device) -> torch.Tensor:
    """Overall LRP heatmaps of a pruned model for the positive logit (``images`` in [0, 1])."""
    out = LRP(model, lrp_config).attribute(normalize_images(images, device), 1)
    return pixel_relevance(out.input_relevance).cpu()


# ============================================================================ evaluate
#: The fields of a schedule entry that ``metrics.json`` carries (the method-specific ones where present).
CURVE_FIELDS = ("pruned", "pruned_of_all", "pruned_of_prunable", "acc", "wm_relevance_share",
                "wm_relevance_share_by_subgroup", "params", "macs", "stage", "val_acc", "filters", "step",
                "acc_virtual_layer", "acc_ablation_removed", "drsa_recomputed")


def metrics(params: dict[str, Any], warm: dict, aug: dict, abl: dict, pr: dict,
            compute: dict[str, Any]) -> dict[str, Any]:
    """A run's ``metrics.json`` from the stages' summaries (``params``: :meth:`Params.to_dict`)."""
    timings = {"warmup": warm.get("seconds", 0.0), "augment": aug.get("seconds", 0.0),
               "ablate": abl.get("seconds", 0.0)}
    for m, t in pr["timings"].items():
        timings[f"prune:{m}"] = float(sum(t.values()))
    return {
        "pair": params["pair"], "seed": params["seed"], "dataset": params["dataset"], "params": params,
        "unpruned": {"acc": warm["acc"], "wm_relevance_share": warm["wm_relevance_share"],
                     "wm_relevance_share_by_subgroup": warm["wm_relevance_share_by_subgroup"],
                     "wm_area_fraction": warm["wm_area_fraction"]},
        "drsa": {"layer": params["layer"], "K": params["K"], "d_k": aug["d_k"], "J": aug["J"],
                 "ap_watermark": abl["ap_watermark"], "wm_relevance_share": abl["wm_relevance_share"],
                 "ablated": abl["ablated"]},
        "curves": {m: [{k: e[k] for k in CURVE_FIELDS if k in e} for e in c] for m, c in pr["curves"].items()},
        "timings_s": timings,
        "compute": compute,
    }


__all__ = ["CURVE_FIELDS", "Concepts", "ablate", "augment", "layer_width", "metrics", "pruned_heatmaps",
           "warm_up", "watermark_shares", "with_virtual_layer"]
