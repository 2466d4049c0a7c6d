"""cnp.evaluate: the watermark share of relevance, overall and per watermarked subgroup."""

import math

import pytest
import torch

from cnp.evaluate import mask_share, pixel_relevance, wm_relevance_share, wm_relevance_shares
from cnp.images import normalize_images
from cnp.lrp import LRP


def test_wm_relevance_shares_split_by_subgroup(tiny_vgg, tiny_pair):
    """Each subgroup's share is the mean of its own images' shares (computed here image by image
    with LRP), "all" is the mean over every explained image and equals wm_relevance_share, and the
    two subgroup means weighted by their counts give "all" back."""
    split = tiny_pair["test"]
    idx = torch.nonzero(split.wm).flatten()
    labels = split.labels[idx]
    assert bool((labels == 0).any()) and bool((labels == 1).any())  # both subgroups present
    lrp = LRP(tiny_vgg)
    per = torch.cat([mask_share(pixel_relevance(lrp.attribute(normalize_images(split.images[i:i + 1]), 1)
                                                 .input_relevance), split.masks[i:i + 1]) for i in idx.tolist()])
    assert float(per.std()) > 0  # the images differ, so a wrong grouping would show
    got = wm_relevance_shares(tiny_vgg, split, batch_size=2, max_images=None)
    assert set(got) == {"all", "c0w1", "c1w1"}
    assert got["c0w1"] == pytest.approx(float(per[labels == 0].mean()), rel=1e-5)
    assert got["c1w1"] == pytest.approx(float(per[labels == 1].mean()), rel=1e-5)
    assert got["all"] == pytest.approx(float(per.mean()), rel=1e-5)
    n0, n1 = int((labels == 0).sum()), int((labels == 1).sum())
    assert got["all"] == pytest.approx((n0 * got["c0w1"] + n1 * got["c1w1"]) / (n0 + n1), rel=1e-5)
    assert wm_relevance_share(tiny_vgg, split, batch_size=2, max_images=None) == got["all"]


def test_wm_relevance_shares_missing_subgroup_and_no_images(tiny_vgg, tiny_pair):
    """A subgroup without an explained image gives NaN; no watermarked image at all (or
    max_images=0) gives NaN everywhere."""
    split = tiny_pair["test"]
    first = int(torch.nonzero(split.wm).flatten()[0])
    one = wm_relevance_shares(tiny_vgg, split, max_images=1)
    present = f"c{int(split.labels[first])}w1"
    absent = "c1w1" if present == "c0w1" else "c0w1"
    assert 0.0 <= one[present] <= 1.0 and one["all"] == one[present]
    assert math.isnan(one[absent])
    none = wm_relevance_shares(tiny_vgg, split, max_images=0)
    assert all(math.isnan(v) for v in none.values())
    clean = split.subset(torch.nonzero(~split.wm).flatten(), "clean")
    assert all(math.isnan(v) for v in wm_relevance_shares(tiny_vgg, clean).values())
