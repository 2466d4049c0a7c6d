"""Subgroup evaluation: accuracy per c/w subgroup and the share of relevance on watermark pixels.

Subgroups follow the paper: ``c0w0, c0w1, c1w0, c1w1`` (c = class, 1 = positive; w = watermark
present). ``c0w1`` (negative images that carry a watermark) is the OOD subgroup, where a
watermark-reliant model fails.
"""

from __future__ import annotations

import torch
from torch import nn

from cnp.data.splits import SUBGROUPS, Split, subgroup_name
from cnp.images import normalize_images
from cnp.lrp import LRP, LRPConfig
from cnp.training import PREDICT_BATCH, predict_logits


def _accuracy(logits: torch.Tensor, split: Split) -> dict[str, float]:
    correct = (logits.argmax(1) == split.labels).float()
    out = {"overall": float(correct.mean()) if len(split) else float("nan")}
    for g in SUBGROUPS:
        idx = split.subgroup_index(g)
        out[g] = float(correct[idx].mean()) if idx.numel() else float("nan")
    return out


def subgroup_accuracy(model: nn.Module, split: Split, device: torch.device | str = "cpu",
                      batch_size: int = PREDICT_BATCH) -> dict[str, float]:
    """Accuracy overall (all images of ``split``) and per subgroup (NaN for an empty subgroup)."""
    return _accuracy(predict_logits(model, split.device_images(device), batch_size=batch_size, device=device),
                     split)


@torch.no_grad()
def subgroup_accuracy_with_site(model: nn.Module, site: nn.Module, split: Split,
                                device: torch.device | str = "cpu",
                                batch_size: int = PREDICT_BATCH) -> tuple[dict[str, float], dict[str, float]]:
    """:func:`subgroup_accuracy` with ``site`` bypassed and with it active, in one pass.

    ``site`` is a context site attached to a :class:`cnp.models.VGG` (the virtual concept layer):
    the layers up to the one it follows run once per batch and the layers above it twice (on
    ``a`` and on ``site(a)``). The same operations on the same batches as two separate
    evaluations, so the same numbers; the site's ``enabled`` flag is left as it was.
    """
    from cnp.models import VGG

    host = getattr(site, "_host", None)
    pos = None
    if isinstance(model, VGG) and host is not None:
        pos = next((i for i, m in enumerate(model.features) if m is host), None)
    was = site.enabled
    try:
        if pos is None or len(split) == 0:  # not a VGG feature layer: two plain evaluations
            site.enabled = False
            plain = subgroup_accuracy(model, split, device, batch_size)
            site.enabled = True
            return plain, subgroup_accuracy(model, split, device, batch_size)
        site.enabled = False
        model.eval()
        below, above = model.features[:pos + 1], model.features[pos + 1:]

        def top(h: torch.Tensor) -> torch.Tensor:  # VGG.forward from the site's layer on
            return model.classifier(torch.flatten(model.avgpool(above(h)), 1)).float()

        images = split.device_images(device)
        plain, with_site = [], []
        for start in range(0, images.shape[0], batch_size):
            h = below(normalize_images(images[start:start + batch_size], device))
            plain.append(top(h))
            with_site.append(top(site(h)))
    finally:
        site.enabled = was
    return _accuracy(torch.cat(plain).cpu(), split), _accuracy(torch.cat(with_site).cpu(), split)


def pixel_relevance(input_relevance: torch.Tensor) -> torch.Tensor:
    """Pixel heatmap from input relevance (n, 3, H, W) -> (n, H, W) (sum over channels)."""
    return input_relevance.sum(1)


def mask_share(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-image share of *positive* relevance that falls on ``masks`` pixels.

    ``heatmaps`` (..., H, W), ``masks`` broadcastable bool (..., H, W). Images without positive
    relevance get 0.
    """
    pos = heatmaps.clamp(min=0)
    on = (pos * masks.to(pos.dtype)).flatten(-2).sum(-1)
    tot = pos.flatten(-2).sum(-1)
    return torch.where(tot > 0, on / tot.clamp(min=1e-12), torch.zeros_like(tot))


#: the watermarked subgroups :func:`wm_relevance_shares` reports (class 0, class 1)
WM_SUBGROUPS: tuple[str, ...] = tuple(subgroup_name(c, True) for c in (0, 1))


def _share_index(split: Split, max_images: int | None) -> torch.Tensor:
    """The images a watermark share is measured on: the watermarked ones, at most ``max_images``, in order."""
    idx = torch.nonzero(split.wm).flatten()
    return idx if max_images is None else idx[:max_images]


def wm_area_fraction(split: Split, max_images: int | None = 400) -> float:
    """Mean fraction of image pixels inside the watermark mask, over the images that
    :func:`wm_relevance_share` explains (the watermarked images of ``split``, at most
    ``max_images``, in order).

    The share of relevance that a model with no preference for the watermark puts on its pixels:
    a heatmap spread evenly over the image has exactly this share, so ``share - area`` is the
    excess relevance that the watermark attracts.
    """
    idx = _share_index(split, max_images)
    if idx.numel() == 0:
        return float("nan")
    return float(split.masks[idx].float().mean())


def wm_relevance_shares(model: nn.Module, split: Split, lrp_config: LRPConfig | None = None,
                        target: int = 1, device: torch.device | str = "cpu", batch_size: int = 64,
                        max_images: int | None = 400) -> dict[str, float]:
    """Share of positive-logit relevance on watermark pixels: over all explained images and per
    watermarked subgroup, from one LRP pass.

    LRP (the paper's rules unless ``lrp_config`` says otherwise) explains the positive logit
    of every watermarked image of ``split`` (both classes; at most ``max_images``, taken in
    order); each image's share of positive pixel relevance inside the watermark mask is
    averaged over all of them (``"all"``, what :func:`wm_relevance_share` returns) and over those
    of each watermarked subgroup: ``"c0w1"`` (the OOD subgroup: negatives that carry a
    watermark) and ``"c1w1"`` (watermarked positives, the images of the paper's Figure 1). A
    subgroup without an explained image gives NaN, as does ``"all"`` when ``split`` has no
    watermarked image. A virtual concept layer attached to ``model`` is used as it is (enabled or
    bypassed).
    """
    idx = _share_index(split, max_images)
    if idx.numel() == 0:
        return {"all": float("nan"), **{g: float("nan") for g in WM_SUBGROUPS}}
    lrp = LRP(model, lrp_config)
    shares = []
    # images and masks are indexed where the model runs (Split.on_device: held there once on an
    # accelerator, the split's own tensors on the CPU); the shares are gathered there
    dev = torch.device(device)
    images, masks, idx_dev = split.device_images(dev), split.on_device("masks", dev), idx.to(dev)
    for start in range(0, idx.numel(), batch_size):
        b = idx_dev[start:start + batch_size]
        out = lrp.attribute(normalize_images(images[b]), target)
        shares.append(mask_share(pixel_relevance(out.input_relevance), masks[b]))
    shares = torch.cat(shares).cpu()
    labels = split.labels[idx]
    result = {"all": float(shares.mean())}
    for c, g in enumerate(WM_SUBGROUPS):
        sel = labels == c
        result[g] = float(shares[sel].mean()) if bool(sel.any()) else float("nan")
    return result


def wm_relevance_share(model: nn.Module, split: Split, lrp_config: LRPConfig | None = None,
                       target: int = 1, device: torch.device | str = "cpu", batch_size: int = 64,
                       max_images: int | None = 400) -> float:
    """Mean share of positive-logit relevance on watermark pixels, over the watermarked images.

    LRP (the paper's rules unless ``lrp_config`` says otherwise) explains the positive logit
    of every watermarked image of ``split`` (both classes; at most ``max_images``, taken in
    order); the share of positive pixel relevance inside the watermark mask is averaged.
    A virtual concept layer attached to ``model`` is used as it is (enabled or bypassed).
    :func:`wm_relevance_shares` gives the same number and its split by subgroup.
    """
    return wm_relevance_shares(model, split, lrp_config, target, device, batch_size, max_images)["all"]
