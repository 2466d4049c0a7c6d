"""Concepts at the DRSA layer: data for DRSA, concept relevance R(k), latent analysis, heatmaps.

This is the glue of stages 1 and 2 of the paper:

* :func:`collect_activations_contexts` samples activations and LRP contexts at the layer
  (20 random positions per image over the DRSA set), the input of :func:`cnp.drsa.fit`;
* :func:`fit_concepts` runs DRSA and returns the subspaces ``U_k``; ``method='oracle'`` instead
  builds them from the watermark masks (:func:`watermark_oracle_basis`: the first subspace holds
  the directions with the most excess activation energy at watermark positions), a check that
  separates "DRSA does not find the watermark" from "ablating it does not help";
* :func:`concept_relevance` gives every image's concept relevance ``R(k)`` through the virtual
  layer;
* :func:`latent_analysis` scores each subspace by the average precision of ``R(k)`` against
  ground-truth watermark labels and :func:`propose_ablation` turns that into ``K'``;
* :func:`subspace_heatmaps` computes one pixel heatmap per subspace (all K in one backward pass)
  for the human evaluation, and :func:`subspace_mask_share` the share of each subspace's
  relevance on watermark pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cnp import drsa
from cnp.data.splits import Split
from cnp.evaluate import mask_share, pixel_relevance
from cnp.images import normalize_images
from cnp.io import CNPError
from cnp.lrp import LRP, LRPConfig, contexts
from cnp.models import layer_outputs
from cnp.runtime import progress
from cnp.virtual_layer import VirtualLayer


def collect_activations_contexts(
    model: nn.Module, split: Split, layer: str = "relu4_3", target: int = 1,
    n_positions: int = 20, seed: int = 0, batch_size: int = 50, lrp_config: LRPConfig | None = None,
    device: torch.device | str = "cpu", verbose: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations and contexts ``(A, C)``, each (n_images * n_positions, D), at ``layer``.

    Contexts are computed directly (see :mod:`cnp.lrp`), w.r.t. logit ``target``.
    """
    g = torch.Generator().manual_seed(seed)
    As, Cs = [], []
    it = range(0, len(split), batch_size)
    for start in progress(it, desc="contexts", disable=not verbose):
        x = normalize_images(split.images[start:start + batch_size], device)
        a, c, _ = contexts(model, x, layer, target, lrp_config)
        A, C = drsa.sample_positions(a.cpu(), c.cpu(), n_positions=n_positions, generator=g)
        As.append(A)
        Cs.append(C)
    return torch.cat(As), torch.cat(Cs)


def watermark_positions(model: nn.Module, split: Split, layer: str = "relu4_3", cover: float = 0.5,
                        batch_size: int = 50, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Activation vectors at ``layer`` on and off the watermark: ``(on, off)``, each (n, D).

    A feature-map position is *on* when at least ``cover`` of its receptive patch (the image cut
    into the map's grid) lies in the watermark mask, *off* when none of it does; positions in
    between are left out. Images without a watermark give only *off* positions.

    Raises
    ------
    CNPError
        When ``split`` has no position on the watermark (no masks, or no watermarked image).
    """
    on, off = [], []
    starts = range(0, len(split), batch_size)
    batches = (normalize_images(split.images[i:i + batch_size], device) for i in starts)
    for start, a in zip(starts, layer_outputs(model, layer, batches)):
        a = a.float().cpu()                                                  # (B, D, h, w)
        m = split.masks[start:start + batch_size].float()[:, None]          # (B, 1, H, W)
        frac = torch.nn.functional.adaptive_avg_pool2d(m, a.shape[-2:]).flatten()
        a = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
        on.append(a[frac >= cover])
        off.append(a[frac == 0])
    on_t, off_t = torch.cat(on), torch.cat(off)
    if len(on_t) == 0 or len(off_t) == 0:
        raise CNPError(f"the oracle subspace needs feature-map positions on and off the watermark at {layer}; "
                       f"this split has {len(on_t)} on and {len(off_t)} off (no watermark masks, or no "
                       "watermarked image?)")
    return on_t, off_t


def watermark_oracle_basis(on: torch.Tensor, off: torch.Tensor, K: int) -> torch.Tensor:
    """An orthonormal ``(D, D)`` basis whose first subspace (``D / K`` columns) is the watermark's.

    The directions are the eigenvectors of ``E[a a^T | on] - E[a a^T | off]`` (activation vectors
    on and off the watermark, :func:`watermark_positions`; float64), by decreasing eigenvalue:
    the first ``D / K`` span the directions with the most excess activation energy where the
    watermark is; the others, in the same order, fill subspaces 2..K (an arbitrary but
    deterministic partition of the rest). Each column is sign-fixed (:func:`cnp.drsa.fix_signs`).
    Built from ground-truth masks, it is an oracle, not a method the paper proposes.
    """
    if on.dim() != 2 or off.dim() != 2 or on.shape[1] != off.shape[1]:
        raise CNPError(f"on and off must be (n, D) with the same D, got {tuple(on.shape)} and {tuple(off.shape)}")
    D = on.shape[1]
    if not isinstance(K, int) or K < 1 or D % K:
        raise CNPError(f"K must divide D = {D}, got {K!r}")
    a, b = on.to(torch.float64), off.to(torch.float64)
    M = a.T @ a / len(a) - b.T @ b / len(b)
    _, vecs = torch.linalg.eigh((M + M.T) / 2)
    return drsa.fix_signs(vecs.flip(1)).to(on.dtype)


@dataclass
class ConceptFit:
    """Result of :func:`fit_concepts`."""

    U: torch.Tensor
    K: int
    J: float
    history: list[float]
    layer: str
    A: torch.Tensor | None = field(default=None, repr=False)
    C: torch.Tensor | None = field(default=None, repr=False)


def fit_concepts(
    model: nn.Module, split: Split, K: int = 4, layer: str = "relu4_3", steps: int = 500,
    restarts: int = 3, seed: int = 0, n_positions: int = 20, method: str = "drsa",
    lrp_config: LRPConfig | None = None, device: torch.device | str = "cpu", init: torch.Tensor | None = None,
    checkpoint=None, keep_data: bool = False, verbose: bool = True, precision: str = "auto",
) -> ConceptFit:
    """Learn K concept subspaces at ``layer`` from the positive images of ``split``.

    ``method='drsa'`` (the paper), ``'prca'`` (baseline: PRCA eigenbasis cut into K blocks) or
    ``'oracle'`` (:func:`watermark_oracle_basis` from the split's watermark masks: subspace 0 is
    the watermark's; no relevance is used, ``J`` is NaN). ``precision``: DRSA's GEMMs
    (:func:`cnp.drsa.fit`; ``auto``: bf16 where the device computes it natively).
    """
    if method == "oracle":
        on, off = watermark_positions(model, split, layer, device=device)
        U = watermark_oracle_basis(on, off, K)
        return ConceptFit(U=U, K=K, J=float("nan"), history=[], layer=layer)
    A, C = collect_activations_contexts(model, split, layer, 1, n_positions, seed, lrp_config=lrp_config,
                                        device=device, verbose=verbose)
    An, Cn = drsa.normalize(A, C)
    if method == "prca":
        U = drsa.prca(An, Cn)
        J = float(drsa.objective(An, Cn, U, K))
        return ConceptFit(U=U, K=K, J=J, history=[J], layer=layer,
                          A=A if keep_data else None, C=C if keep_data else None)
    if method != "drsa":
        raise CNPError(f"unknown subspace method {method!r}; use 'drsa', 'prca' or 'oracle'")
    res = drsa.fit(An.to(device), Cn.to(device), K, steps, init=init, restarts=restarts, seed=seed,
                   progress=verbose, checkpoint=checkpoint, precision=precision)
    return ConceptFit(U=res.U.cpu(), K=K, J=float(res.J), history=[float(v) for v in res.history],
                      layer=layer, A=A if keep_data else None, C=C if keep_data else None)


def concept_relevance(model: nn.Module, vl: VirtualLayer, split: Split, target: int = 1,
                   batch_size: int = 64, lrp_config: LRPConfig | None = None,
                   device: torch.device | str = "cpu", verbose: bool = False) -> torch.Tensor:
    """Concept relevance ``R(k)`` of every image of ``split``: (n, K), through the virtual layer."""
    lrp = LRP(model, lrp_config)
    out = []
    was = vl.enabled
    vl.enabled = True
    try:
        for start in progress(range(0, len(split), batch_size), desc="R(k)", disable=not verbose):
            x = normalize_images(split.images[start:start + batch_size], device)
            lrp.attribute(x, target, input_relevance=False)
            out.append(vl.last_concept_relevance.cpu())
    finally:
        vl.enabled = was
    return torch.cat(out)


def latent_analysis(scores: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Average precision of each subspace's score ``R(k)`` against binary attribute labels.

    Raises
    ------
    CNPError
        When the labels are all 0 or all 1 (AP is undefined).
    """
    from sklearn.metrics import average_precision_score

    y = labels.cpu().numpy().astype(int)
    if y.min() == y.max():
        raise CNPError("latent analysis needs images with and without the attribute (e.g. watermark); "
                       "the labels given are all the same")
    s = scores.cpu().double().numpy()
    return [float(average_precision_score(y, s[:, k])) for k in range(s.shape[1])]


def propose_ablation(ap: list[float], threshold: float = 0.85, max_ablate: int | None = 1) -> list[int]:
    """``K'`` from latent analysis: the subspaces whose AP reaches ``threshold``, best first.

    At most ``max_ablate`` (None: no limit) and never all of them; if none reaches the
    threshold, the single best subspace is proposed (check it with the heatmaps).
    """
    order = np.argsort(ap)[::-1].tolist()
    chosen = [k for k in order if ap[k] >= threshold]
    if not chosen:
        chosen = order[:1]
    if max_ablate is not None:
        chosen = chosen[:max_ablate]
    return sorted(chosen[: len(ap) - 1])


def subspace_heatmaps(model: nn.Module, vl: VirtualLayer, x: torch.Tensor, target: int = 1,
                      lrp_config: LRPConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel heatmaps of each subspace and the overall heatmap, in one backward pass.

    Each image is repeated K + 1 times: replica k back-propagates only the relevance of
    subspace k from the virtual layer to the pixels, the last replica all (kept) subspaces.

    Returns
    -------
    per_subspace : torch.Tensor
        (n, K, H, W)
    overall : torch.Tensor
        (n, H, W)
    """
    n, K = x.shape[0], vl.K
    xr = x.repeat_interleave(K + 1, dim=0)
    blocks = torch.cat([torch.eye(K), torch.ones(1, K)]).repeat(n, 1).to(x.device)
    was_enabled, prev = vl.enabled, vl.backward_blocks
    vl.enabled, vl.backward_blocks = True, blocks
    try:
        out = LRP(model, lrp_config).attribute(xr, target)
    finally:
        vl.enabled, vl.backward_blocks = was_enabled, prev
    maps = pixel_relevance(out.input_relevance).view(n, K + 1, *x.shape[2:])
    return maps[:, :K], maps[:, K]


def subspace_mask_share(model: nn.Module, vl: VirtualLayer, split: Split, masks: torch.Tensor | None = None,
                        target: int = 1, batch_size: int = 12, max_images: int | None = 200,
                        lrp_config: LRPConfig | None = None, device="cpu") -> tuple[list[float], float]:
    """Share of positive relevance on masked pixels (default: watermark masks), per subspace and overall.

    Averaged over the images that have a non-empty mask (at most ``max_images``). Each batch runs
    LRP on ``batch_size`` x (K + 1) images (see :func:`subspace_heatmaps`): 12 x 5 = 60 at K = 4,
    the size of the other LRP batches; 32 made this the peak of a run's memory (+0.6 GB).
    """
    masks = split.masks if masks is None else masks
    idx = torch.nonzero(masks.flatten(1).any(1)).flatten()
    if max_images is not None:
        idx = idx[:max_images]
    if idx.numel() == 0:
        return [float("nan")] * vl.K, float("nan")
    per, overall = [], []
    for start in range(0, idx.numel(), batch_size):
        b = idx[start:start + batch_size]
        x = normalize_images(split.images[b], device)
        maps_k, maps = subspace_heatmaps(model, vl, x, target, lrp_config)
        m = masks[b].to(maps.device)
        per.append(mask_share(maps_k, m[:, None]).cpu())
        overall.append(mask_share(maps, m).cpu())
    per_t = torch.cat(per).mean(0)
    return [float(v) for v in per_t], float(torch.cat(overall).mean())
