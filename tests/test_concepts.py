"""Tests of cnp.concepts: DRSA data and fit on the tiny net, concept scores, latent analysis,
the ablation proposal, per-subspace heatmaps and their mask share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from cnp.concepts import (
    collect_activations_contexts,
    concept_relevance,
    fit_concepts,
    latent_analysis,
    propose_ablation,
    subspace_mask_share,
    watermark_oracle_basis,
    watermark_positions,
)
from cnp.data.splits import Split
from cnp.images import normalize_images
from cnp.io import CNPError
from cnp.lrp import LRP
from cnp.virtual_layer import check_orthonormal, insert_virtual_layer

D = 16


# ---------------------------------------------------------------------------- latent analysis
def test_latent_analysis_hand_example():
    """labels 1,0,1,0 ranked by scores .9,.8,.7,.1: precision 1 at the first positive, 2/3 at
    the second, AP = (1 + 2/3) / 2; the reversed score ranks the positives 2nd and 4th: AP =
    (1/2 + 2/4) / 2 = 1/2."""
    labels = torch.tensor([1, 0, 1, 0])
    s = torch.tensor([0.9, 0.8, 0.7, 0.1])
    ap = latent_analysis(torch.stack([s, -s], 1), labels)
    assert ap == pytest.approx([(1 + 2 / 3) / 2, 0.5])


def test_latent_analysis_matches_sklearn_on_a_planted_example():
    g = torch.Generator().manual_seed(0)
    n = 60
    wm = (torch.rand(n, generator=g) < 0.4).long()
    wm[:2] = torch.tensor([0, 1])
    noise = torch.randn(n, 4, generator=g)
    scores = noise.clone()
    scores[:, 2] = 3.0 * wm + 0.1 * noise[:, 2]   # the planted watermark subspace: perfect AP
    scores[:, 0] = 1.5 * wm + noise[:, 0]          # partly predictive
    ap = latent_analysis(scores, wm.bool())
    expected = [average_precision_score(wm.numpy(), scores[:, k].double().numpy()) for k in range(4)]
    assert ap == pytest.approx(expected, abs=1e-12)
    assert ap[2] == pytest.approx(1.0)
    assert int(np.argmax(ap)) == 2
    assert ap[0] > max(ap[1], ap[3])
    assert propose_ablation(ap, threshold=0.85) == [2]


@pytest.mark.parametrize("labels", [torch.zeros(5), torch.ones(5)])
def test_latent_analysis_needs_both_classes(labels):
    with pytest.raises(CNPError, match="all the same"):
        latent_analysis(torch.randn(5, 4), labels)


# ---------------------------------------------------------------------------- proposal
@pytest.mark.parametrize("ap, kwargs, expected", [
    ([0.5, 0.9, 0.95, 0.3], {}, [2]),                                      # best above threshold
    ([0.5, 0.9, 0.95, 0.3], {"max_ablate": None}, [1, 2]),                 # all above threshold
    ([0.5, 0.9, 0.95, 0.3], {"max_ablate": 2, "threshold": 0.92}, [2]),    # threshold respected
    ([0.5, 0.6, 0.55, 0.3], {"max_ablate": None}, [1]),                    # none: the single best
    ([0.9, 0.95, 0.99, 0.92], {"max_ablate": None}, [1, 2, 3]),            # never all K
    ([0.9, 0.95, 0.99, 0.92], {"max_ablate": 4, "threshold": 0.0}, [1, 2, 3]),
    ([0.9, 0.95, 0.99, 0.92], {"max_ablate": 2}, [1, 2]),                  # the two best
    ([0.9, 0.95], {"max_ablate": None}, [1]),
])
def test_propose_ablation(ap, kwargs, expected):
    got = propose_ablation(ap, **kwargs)
    assert got == expected
    assert len(got) < len(ap)
    assert all(isinstance(k, int) for k in got)


# ---------------------------------------------------------------------------- DRSA on the tiny net
def test_collect_activations_contexts_conserves(tiny_vgg, tiny_pair):
    """With every position taken (4 x 4 = 16 <= n_positions) the rows of image i sum A * C to its
    positive logit (alpha1beta0 conserves on the tiny net)."""
    split = tiny_pair["drsa"]
    A, C = collect_activations_contexts(tiny_vgg, split, n_positions=20, batch_size=4, verbose=False)
    n = len(split)
    assert A.shape == C.shape == (n * 16, D)
    assert (A >= 0).all()
    logits = LRP(tiny_vgg).attribute(normalize_images(split.images), 1).target_logit
    per_image = (A * C).view(n, 16, D).sum((1, 2))
    assert torch.allclose(per_image, logits, atol=1e-4 * float(logits.abs().max()))
    A2, C2 = collect_activations_contexts(tiny_vgg, split, n_positions=5, seed=1, verbose=False)
    assert A2.shape == (n * 5, D)
    A3, _ = collect_activations_contexts(tiny_vgg, split, n_positions=5, seed=1, verbose=False)
    assert torch.equal(A2, A3)  # the positions are drawn from the seed


def test_fit_concepts_end_to_end(tiny_vgg, tiny_pair):
    fit = fit_concepts(tiny_vgg, tiny_pair["drsa"], K=4, steps=5, restarts=1, seed=0, verbose=False,
                       keep_data=True)
    assert fit.U.shape == (D, D) and fit.K == 4 and fit.layer == "relu4_3"
    check_orthonormal(fit.U, tol=1e-4)
    assert np.isfinite(fit.J) and fit.J > 0
    assert fit.A.shape == fit.C.shape == (len(tiny_pair["drsa"]) * 16, D)
    assert len(fit.history) >= 1 and all(np.isfinite(fit.history))
    prca = fit_concepts(tiny_vgg, tiny_pair["drsa"], K=4, method="prca", verbose=False)
    check_orthonormal(prca.U, tol=1e-4)
    # the fitted U plugs into the virtual layer, which then splits the logit into K concepts
    vl = insert_virtual_layer(tiny_vgg, fit.U, fit.K)
    x = normalize_images(tiny_pair["drsa"].images)
    out = LRP(tiny_vgg).attribute(x, 1)
    assert torch.allclose(vl.last_concept_relevance.sum(1), out.target_logit,
                          atol=1e-4 * float(out.target_logit.abs().max()))


def test_fit_concepts_rejects_unknown_methods(tiny_vgg, tiny_pair):
    with pytest.raises(CNPError, match="unknown subspace method"):
        fit_concepts(tiny_vgg, tiny_pair["drsa"], K=4, steps=1, method="pca", verbose=False)


# ---------------------------------------------------------------------------- concept scores
def test_concept_relevance(tiny_vgg, tiny_pair, random_U):
    split = tiny_pair["test"]
    vl = insert_virtual_layer(tiny_vgg, random_U(D), 4)
    vl.enabled = False
    scores = concept_relevance(tiny_vgg, vl, split, batch_size=5)
    assert not vl.enabled  # restored
    assert scores.shape == (len(split), 4)
    logits = LRP(tiny_vgg).attribute(normalize_images(split.images), 1).target_logit  # bypassed
    assert torch.allclose(scores.sum(1), logits, atol=1e-4 * float(logits.abs().max()))
    vl.set_ablation([2])
    ablated = concept_relevance(tiny_vgg, vl, split, batch_size=5)
    assert (ablated[:, 2] == 0).all()
    assert not torch.allclose(ablated[:, [0, 1, 3]], scores[:, [0, 1, 3]], atol=1e-4)


# ---------------------------------------------------------------------------- mask share
def test_subspace_mask_share_in_unit_interval(tiny_vgg, tiny_pair, random_U):
    split = tiny_pair["test"]
    assert split.masks.flatten(1).any(1).sum() > 0
    vl = insert_virtual_layer(tiny_vgg, random_U(D), 4, ablated=[1])
    per, overall = subspace_mask_share(tiny_vgg, vl, split, batch_size=4)
    assert len(per) == 4
    for v in per + [overall]:
        assert 0.0 <= v <= 1.0
    assert per[1] == 0.0  # the ablated subspace has no relevance at all
    assert overall > 0.0
    # full masks: every positive bit of relevance is on the mask
    full = torch.ones_like(split.masks)
    per_full, overall_full = subspace_mask_share(tiny_vgg, vl, split, masks=full, max_images=3)
    assert overall_full == pytest.approx(1.0)
    assert [per_full[k] == pytest.approx(1.0) for k in (0, 2, 3)] == [True] * 3


def test_subspace_mask_share_without_masks(tiny_vgg, random_U, make_images):
    split = Split(images=make_images(3), labels=torch.ones(3, dtype=torch.long), wm=torch.zeros(3, dtype=torch.bool),
                  masks=torch.zeros(3, 32, 32, dtype=torch.bool))
    vl = insert_virtual_layer(tiny_vgg, random_U(D), 4)
    per, overall = subspace_mask_share(tiny_vgg, vl, split)
    assert all(np.isnan(per)) and np.isnan(overall)


# ---------------------------------------------------------------------------- oracle subspace
def test_watermark_oracle_basis_recovers_a_planted_subspace():
    """Activations on the watermark carry extra energy along a known 3-dim subspace Q: the first
    block of the oracle basis (D / K = 3 columns) spans Q, and the basis is orthonormal."""
    g = torch.Generator().manual_seed(0)
    Dp, K = 12, 4
    Q, _ = torch.linalg.qr(torch.randn(Dp, 3, generator=g, dtype=torch.float64))
    off = torch.randn(4000, Dp, generator=g, dtype=torch.float64)
    on = torch.randn(4000, Dp, generator=g, dtype=torch.float64) + 3 * torch.randn(4000, 3, generator=g,
                                                                                   dtype=torch.float64) @ Q.T
    U = watermark_oracle_basis(on, off, K)
    check_orthonormal(U, tol=1e-8)
    captured = float((Q.T @ U[:, :3]).pow(2).sum())        # 3 when the block spans Q exactly
    assert captured > 2.9
    assert float((Q.T @ U[:, 3:]).pow(2).sum()) < 0.1      # the other blocks hold little of it
    with pytest.raises(CNPError, match="K must divide D"):
        watermark_oracle_basis(on, off, 5)
    with pytest.raises(CNPError, match="same D"):
        watermark_oracle_basis(on, off[:, :5], 4)


def test_watermark_positions_follow_the_masks(tiny_vgg, make_images):
    """A mask over the whole image makes every feature-map position 'on', none makes them 'off',
    a mask over the left half splits the map's columns; the vectors are the layer's activations."""
    from cnp.models import get_layer

    imgs = make_images(3)
    full = torch.ones(3, 32, 32, dtype=torch.bool)
    half = torch.zeros(3, 32, 32, dtype=torch.bool)
    half[:, :, :16] = True
    none = torch.zeros(3, 32, 32, dtype=torch.bool)
    grabbed = []
    hook = get_layer(tiny_vgg, "relu4_3").register_forward_hook(lambda _m, _i, o: grabbed.append(o.detach().clone()))
    with torch.no_grad():
        tiny_vgg(normalize_images(imgs))
    hook.remove()
    a = grabbed[0]                                            # (3, D, h, w)
    h, w = a.shape[-2:]
    vecs = a.permute(0, 2, 3, 1).reshape(-1, D)

    def split(masks):
        return Split(images=imgs, labels=torch.ones(3, dtype=torch.long), wm=masks.flatten(1).any(1), masks=masks)

    both = torch.cat([split(full).masks, split(none).masks])
    on, off = watermark_positions(tiny_vgg, Split(images=torch.cat([imgs, imgs]), labels=torch.ones(6, dtype=torch.long),
                                                  wm=both.flatten(1).any(1), masks=both), batch_size=2)
    assert torch.allclose(on, vecs) and torch.allclose(off, vecs)
    on, off = watermark_positions(tiny_vgg, split(half))
    assert on.shape == off.shape == (3 * h * w // 2, D)
    left = a[..., : w // 2].permute(0, 2, 3, 1).reshape(-1, D)
    assert torch.allclose(on, left)
    with pytest.raises(CNPError, match="positions on and off the watermark"):
        watermark_positions(tiny_vgg, split(none))


def test_fit_concepts_oracle(tiny_vgg, tiny_pair):
    """method='oracle' builds an orthonormal basis from the DRSA split's masks (no DRSA, J NaN)
    that plugs into the virtual layer like a DRSA fit."""
    fit = fit_concepts(tiny_vgg, tiny_pair["drsa"], K=4, method="oracle", verbose=False)
    assert fit.U.shape == (D, D) and np.isnan(fit.J) and fit.history == []
    check_orthonormal(fit.U, tol=1e-4)
    on, off = watermark_positions(tiny_vgg, tiny_pair["drsa"])
    assert torch.allclose(fit.U, watermark_oracle_basis(on, off, 4))
    vl = insert_virtual_layer(tiny_vgg, fit.U, fit.K)
    x = normalize_images(tiny_pair["drsa"].images)
    out = LRP(tiny_vgg).attribute(x, 1)
    assert torch.allclose(vl.last_concept_relevance.sum(1), out.target_logit,
                          atol=1e-4 * float(out.target_logit.abs().max()))
