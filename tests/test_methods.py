"""The pruning methods beyond the paper: kept ablation, concept-penalised fine-tuning, recompute."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cnp.io import CNPError
from cnp.models import count_macs, count_params, get_layer
from cnp.pruning import METHOD_SPECS, METHODS, ConceptPenalty, PruneConfig, run_pruning
from cnp.virtual_layer import (
    KeptAblation,
    get_kept_ablation,
    get_virtual_layer,
    insert_virtual_layer,
    keep_ablation,
)

D = 16  # relu4_3 of the tiny VGG
CFG = PruneConfig(step=0.25, target=0.5, epochs_per_step=1, final_epochs=1, wm_share_images=8)


def _state(U, ablated=(0,), mode="zero", mean=None):
    return {"U": U, "K": 4, "ablated": list(ablated), "mode": mode, "mean_activation": mean, "layer": "relu4_3"}


# ------------------------------------------------------------------------------ registry
def test_registry_names_and_flags():
    assert METHODS[:4] == ("cnp", "vanilla", "l1", "random")
    assert {"cnp-keep", "cnp-rr", "cnp-recompute"} <= set(METHODS)
    assert [m for m in METHODS if METHOD_SPECS[m].paper] == ["cnp", "vanilla"]
    assert METHOD_SPECS["cnp-keep"].keep and not METHOD_SPECS["cnp"].keep
    assert METHOD_SPECS["cnp-rr"].penalty and METHOD_SPECS["cnp-recompute"].recompute
    assert all(METHOD_SPECS[m].concept for m in METHODS if m.startswith("cnp"))
    assert METHOD_SPECS["vanilla-posthoc"].needs_concepts and not METHOD_SPECS["vanilla-posthoc"].concept
    with pytest.raises(CNPError, match="concept_state"):
        run_pruning(nn.Sequential(), None, "vanilla-posthoc", CFG)
    assert all(METHOD_SPECS[m].summary for m in METHODS)


# ------------------------------------------------------------------------- kept ablation
def test_kept_ablation_removes_a_planted_direction_exactly(random_U):
    U = random_U(D, seed=5)
    W = U[:, :4]
    kept = KeptAblation(W)
    g = torch.Generator().manual_seed(0)
    rest = torch.randn(3, D, 2, 2, generator=g)
    rest = rest - torch.einsum("ir,nr...->ni...", W, torch.einsum("ir,ni...->nr...", W, rest))  # orthogonal part
    planted = torch.einsum("ir,nr...->ni...", W, torch.randn(3, 4, 2, 2, generator=g))
    out = kept(rest + 5 * planted)
    assert torch.allclose(out, rest, atol=1e-5)
    assert torch.einsum("ir,ni...->nr...", W, out).abs().max() < 1e-5
    # context transpose: the same projection
    assert torch.allclose(kept.context_backward(rest, rest + planted), rest, atol=1e-5)
    assert kept.extra_macs(6, 6) == 2 * D * 4 * 36 and kept.extra_params() == D * 4


def test_kept_ablation_equals_the_ablated_virtual_layer(tiny_vgg, random_U, tiny_x):
    U = random_U(D, seed=2)
    for mode in ("zero", "mean"):
        model = copy.deepcopy(tiny_vgg)
        mean = torch.randn(D, generator=torch.Generator().manual_seed(1)) if mode == "mean" else None
        vl = insert_virtual_layer(model, U, 4, "relu4_3", ablated=[1, 3], mode=mode, mean_activation=mean)
        with torch.no_grad():
            ref = model(tiny_x)
        kept = keep_ablation(model)
        assert get_virtual_layer(model) is None and get_kept_ablation(model) is kept and kept.r == 8
        with torch.no_grad():
            out = model(tiny_x)
        assert torch.allclose(out, ref, atol=1e-5), mode
        assert vl._host is None
    with pytest.raises(CNPError, match="ablates nothing"):
        KeptAblation.from_virtual_layer(insert_virtual_layer(copy.deepcopy(tiny_vgg), U, 4, "relu4_3"))
    with pytest.raises(CNPError, match="not orthonormal"):
        KeptAblation(torch.ones(D, 2))


def test_cnp_keep_deploys_the_ablation(tiny_vgg, tiny_pair, random_U, tiny_x):
    U = random_U(D, seed=4)
    res = run_pruning(tiny_vgg, tiny_pair, "cnp-keep", CFG, concept_state=_state(U), seed=0, verbose=False)
    kept = get_kept_ablation(res.model)
    assert kept is not None and get_virtual_layer(res.model) is None
    assert torch.allclose(kept.W, U[:, :4], atol=0)
    # every entry measures the deployed network (with the ablation) and reports it removed beside it
    assert all("acc_ablation_removed" in e and "acc_virtual_layer" not in e for e in res.curve)
    # its cost: the pruned convs plus 2 D r multiply-adds per position at relu4_3 (4 x 4 at 32 px)
    extra = 2 * D * 4 * 4 * 4
    last = res.curve[-1]
    kept.enabled = False
    plain_macs = count_macs(res.model, 32)
    assert last["macs"] == plain_macs + extra and last["params"] == count_params(res.model) + D * 4
    assert res.curve[0]["macs"] == count_macs(tiny_vgg, 32) + extra
    # the deployed model really computes the projection: a planted W-direction at relu4_3 is gone
    grabbed = []
    host = get_layer(res.model, "relu4_3")
    after = res.model.features[[i for i, m in enumerate(res.model.features) if m is host][0] + 1]  # pool4
    h = after.register_forward_pre_hook(lambda m, i: grabbed.append(i[0]))
    kept.enabled = True
    with torch.no_grad():
        res.model(tiny_x)
    h.remove()
    assert torch.einsum("ir,ni...->nr...", kept.W, grabbed[0]).abs().max() < 1e-4


def test_cnp_keep_resumes_with_its_ablation(tiny_vgg, tiny_pair, random_U, tmp_path, tiny_x):
    U = random_U(D, seed=4)
    first = run_pruning(tiny_vgg, tiny_pair, "cnp-keep", CFG, concept_state=_state(U), seed=0, run_dir=tmp_path,
                        verbose=False)
    again = run_pruning(tiny_vgg, tiny_pair, "cnp-keep", CFG, concept_state=_state(U), seed=0, run_dir=tmp_path,
                        verbose=False)
    assert get_kept_ablation(again.model) is not None
    with torch.no_grad():
        assert torch.equal(first.model(tiny_x), again.model(tiny_x))
    assert again.curve == first.curve


def test_keep_and_penalty_need_an_ablated_set(tiny_vgg, tiny_pair, random_U):
    for method in ("cnp-keep", "cnp-rr"):
        with pytest.raises(CNPError, match="needs an ablated set"):
            run_pruning(tiny_vgg, tiny_pair, method, CFG, concept_state=_state(random_U(D), ablated=()),
                        verbose=False)
        with pytest.raises(CNPError, match="needs concept_state"):
            run_pruning(tiny_vgg, tiny_pair, method, CFG, verbose=False)


# ----------------------------------------------------------------------- concept penalty
class _Toy(nn.Module):
    """x (n, 4) -> a = x (the penalised layer, an identity) -> logits = a @ M."""

    def __init__(self, M):
        super().__init__()
        self.layer = nn.Identity()
        self.M = M

    def forward(self, x):
        return self.layer(x) @ self.M


def test_penalty_is_the_gradient_share_in_the_subspace():
    # the margin z1 - z0 = a . (M[:, 1] - M[:, 0]) has gradient m = M[:, 1] - M[:, 0] for every image
    M = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]], requires_grad=True)
    x = torch.randn(5, 4, requires_grad=True)
    e = torch.eye(4)
    pen = ConceptPenalty(e[:, 2:], "layer")  # orthogonal to m = (1, 2, 0, 0)
    logits = _Toy(M)(x)
    assert pen.value(logits, x).item() == 0.0
    pen = ConceptPenalty(e[:, :1], "layer")  # the share of |m|^2 along e_0: 1 / 5
    assert pen.value(_Toy(M)(x), x).item() == pytest.approx(0.2)
    # differentiable in the weights above the layer: the gradient turns m away from e_0
    val = pen.value(_Toy(M)(x), x)
    (gM,) = torch.autograd.grad(val, M)
    assert gM[0, 1] > 0 and gM[0, 0] < 0


def test_penalty_on_a_vgg_layer_and_in_training(tiny_vgg, tiny_x, random_U):
    U = random_U(D, seed=7)
    pen = ConceptPenalty(U[:, :4], "relu4_3", weight=2.0)
    logits, val = pen(tiny_vgg, tiny_x)
    assert logits.shape == (3, 2) and 0.0 < val.item() < 1.0
    full = ConceptPenalty(U, "relu4_3")  # the whole space holds all of the gradient
    assert full(tiny_vgg, tiny_x)[1].item() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(CNPError, match=">= 0"):
        ConceptPenalty(U[:, :4], "relu4_3", weight=-1)
    with pytest.raises(CNPError, match="channels"):
        ConceptPenalty(torch.eye(8)[:, :2], "relu4_3")(tiny_vgg, tiny_x)
    with pytest.raises(CNPError, match="binary task"):
        pen.value(torch.zeros(3, 5, requires_grad=True), torch.zeros(3, 16))


def test_penalised_training_lowers_the_share(tiny_vgg, tiny_pair, random_U):
    """Trained with a large weight, the margin's gradient leaves the penalised subspace (measured
    on the training images; the same epochs without the penalty barely move it)."""
    from cnp.images import normalize_images
    from cnp.training import make_optimizer, train_epoch

    U = random_U(D, seed=4)
    x = normalize_images(tiny_pair["train"].images)
    share = {}
    for lam in (0.0, 50.0):
        model = copy.deepcopy(tiny_vgg)
        pen = ConceptPenalty(U[:, :4], "relu4_3", lam)
        opt = make_optimizer(model.parameters(), "sgd", 1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(10):
            train_epoch(model, tiny_pair["train"], opt, g, 8, penalty=pen, penalty_weight=lam, verbose=False)
        share[lam] = pen(model, x)[1].item()
    start = ConceptPenalty(U[:, :4], "relu4_3")(tiny_vgg, x)[1].item()
    assert share[50.0] < 0.6 * share[0.0] and share[50.0] < 0.6 * start


def test_cnp_rr_at_lambda_zero_is_cnp(tiny_vgg, tiny_pair, random_U):
    import dataclasses

    st = _state(random_U(D, seed=4))
    cfg = dataclasses.replace(CFG, rr_lambda=0.0)
    plain = run_pruning(tiny_vgg, tiny_pair, "cnp", cfg, concept_state=st, seed=0, verbose=False)
    zero = run_pruning(tiny_vgg, tiny_pair, "cnp-rr", cfg, concept_state=st, seed=0, verbose=False)
    assert zero.curve == plain.curve
    rr = run_pruning(tiny_vgg, tiny_pair, "cnp-rr", dataclasses.replace(CFG, rr_lambda=50.0), concept_state=st,
                     seed=0, verbose=False)
    assert rr.curve[1:] != plain.curve[1:]  # the penalty changes the fine-tunes


@pytest.mark.parametrize("change", [{"rr_lambda": 3.0}, {"refit_steps": 11}])
def test_method_specific_values_are_keyed_only_for_their_methods(tiny_vgg, tiny_pair, random_U, tmp_path, change):
    """rr_lambda (the penalised fine-tunes) and refit_steps (the fresh fits) do not key cnp."""
    import dataclasses

    st = _state(random_U(D, seed=4))
    run_pruning(tiny_vgg, tiny_pair, "cnp", CFG, concept_state=st, seed=0, run_dir=tmp_path, verbose=False)
    before = (tmp_path / "prune_cnp.pt").stat().st_mtime_ns
    run_pruning(tiny_vgg, tiny_pair, "cnp", dataclasses.replace(CFG, **change), concept_state=st, seed=0,
                run_dir=tmp_path, verbose=False)
    assert (tmp_path / "prune_cnp.pt").stat().st_mtime_ns == before  # reused: cnp does not depend on it


def test_bad_method_values_are_refused():
    with pytest.raises(CNPError, match="rr_lambda"):
        PruneConfig(rr_lambda=-0.5)
    with pytest.raises(CNPError, match="refit_steps"):
        PruneConfig(refit_steps=0)


# ------------------------------------------------------------------------------ recompute
def test_reidentify_follows_a_planted_rotation(random_U):
    """The new basis holds the old ablated block at another position, slightly rotated: the
    overlap re-identification finds it there."""
    from cnp.drsa import random_orthogonal
    from cnp.pruning.schedule import reidentify_by_overlap

    U = random_U(D, seed=1).double()
    d_k = D // 4
    blocks = [U[:, k * d_k:(k + 1) * d_k] for k in range(4)]
    # rotate inside a small angle: mix block 0 with block 1 by 0.2 rad
    c, s = torch.cos(torch.tensor(0.2, dtype=torch.float64)), torch.sin(torch.tensor(0.2, dtype=torch.float64))
    b0, b1 = c * blocks[0] + s * blocks[1], -s * blocks[0] + c * blocks[1]
    Q = random_orthogonal(d_k, seed=3)[0].double()  # a rotation within the block changes nothing
    new = torch.cat([blocks[2], b1, (b0 @ Q), blocks[3]], dim=1)
    assert reidentify_by_overlap(U, new, [0], 4) == [2]
    assert reidentify_by_overlap(U, new, [0, 3], 4) == [2, 3]


def test_cnp_recompute_records_each_refit(tiny_vgg, tiny_pair, random_U, monkeypatch):
    import dataclasses

    import cnp.concepts

    st = _state(random_U(D, seed=4))
    cfg = dataclasses.replace(CFG, recompute_steps=5)
    res = run_pruning(tiny_vgg, tiny_pair, "cnp-recompute", cfg, concept_state=st, seed=0, verbose=False)
    steps = [e for e in res.curve if e["stage"] == "step" and e["step"] > 0]
    assert all("drsa_recomputed" in e for e in steps)
    for e in steps:
        r = e["drsa_recomputed"]
        assert len(r["ablated"]) == 1 and 0.0 <= r["overlap"] <= 1.0 + 1e-6 and r["kept_previous"] is False
    # plain cnp never refits
    assert all("drsa_recomputed" not in e for e in run_pruning(tiny_vgg, tiny_pair, "cnp", cfg, concept_state=st,
                                                               seed=0, verbose=False).curve)

    # a refit whose every start diverges keeps the previous subspaces and says so
    def diverge(*a, **k):
        raise CNPError("every DRSA restart diverged to a non-finite objective.")

    def no_relevance(*a, **k):
        raise CNPError("C is all zeros, so it cannot be normalised; check the layer and the relevance ...")

    for fail, reason, method in ((diverge, "diverged", "cnp-recompute"), (no_relevance, "no relevance", "cnp-refit")):
        monkeypatch.setattr(cnp.concepts, "fit_concepts", fail)
        res = run_pruning(tiny_vgg, tiny_pair, method, cfg, concept_state=st, seed=0, verbose=False)
        refits = [e["drsa_recomputed"] for e in res.curve if "drsa_recomputed" in e]
        assert refits and all(r["kept_previous"] and r["ablated"] == [0] and r["reason"] == reason for r in refits)

    def other(*a, **k):
        raise CNPError("something else")

    monkeypatch.setattr(cnp.concepts, "fit_concepts", other)
    with pytest.raises(CNPError, match="something else"):
        run_pruning(tiny_vgg, tiny_pair, "cnp-refit", cfg, concept_state=st, seed=0, verbose=False)


# ------------------------------------------------------------------- fresh refits, post-hoc
def _plant_refits(monkeypatch, U_new, wm_block: int, calls: list):
    """Every DRSA fit returns ``U_new`` (recording its arguments) and concept relevance R(k) is
    the watermark label in column ``wm_block`` (noise elsewhere): latent analysis must pick it."""
    import cnp.concepts
    from cnp.concepts import ConceptFit

    def fit(model, split, K=4, layer="relu4_3", steps=0, restarts=1, seed=0, init=None, **kw):
        calls.append({"steps": steps, "init": init, "restarts": restarts})
        return ConceptFit(U=U_new.clone(), K=K, J=1.0, history=[1.0], layer=layer)

    def relevance(model, vl, split, **kw):
        g = torch.Generator().manual_seed(len(calls))
        r = 0.01 * torch.rand(len(split.wm), vl.K, generator=g)
        r[:, wm_block] += split.wm.float()
        return r

    monkeypatch.setattr(cnp.concepts, "fit_concepts", fit)
    monkeypatch.setattr(cnp.concepts, "concept_relevance", relevance)


def test_fresh_refits_start_at_random_and_find_the_reencoded_subspace(tiny_vgg, tiny_pair, random_U, monkeypatch):
    """cnp-refit: each refit starts without the previous U and re-identifies K' by latent
    analysis; a watermark planted in block 2 of the refitted basis (it was block 0) is found
    there, where overlap with the previous subspace would not look."""
    import dataclasses

    assert tiny_pair["drsa"].wm.any() and not tiny_pair["drsa"].wm.all()
    U_new = random_U(D, seed=9)
    calls: list = []
    _plant_refits(monkeypatch, U_new, wm_block=2, calls=calls)
    cfg = dataclasses.replace(CFG, refit_steps=7, recompute_steps=5)
    res = run_pruning(tiny_vgg, tiny_pair, "cnp-refit", cfg, concept_state=_state(random_U(D, seed=4)), seed=0,
                      verbose=False)
    refits = [e["drsa_recomputed"] for e in res.curve if "drsa_recomputed" in e]
    assert len(refits) == cfg.n_steps
    assert all(r["ablated"] == [2] and r["fresh"] and not r["kept_previous"] for r in refits)
    assert all(c["init"] is None and c["steps"] == 7 for c in calls)
    # the warm-started method starts from the previous U, with its own step count
    calls.clear()
    run_pruning(tiny_vgg, tiny_pair, "cnp-recompute", cfg, concept_state=_state(random_U(D, seed=4)), seed=0,
                verbose=False)
    assert calls and all(c["init"] is not None and c["steps"] == 5 for c in calls)


def test_keep_refit_deploys_the_last_refits_subspace(tiny_vgg, tiny_pair, random_U, monkeypatch):
    import dataclasses

    U_new = random_U(D, seed=9)
    _plant_refits(monkeypatch, U_new, wm_block=1, calls=[])
    res = run_pruning(tiny_vgg, tiny_pair, "cnp-keep-refit", dataclasses.replace(CFG, refit_steps=3),
                      concept_state=_state(random_U(D, seed=4)), seed=0, verbose=False)
    kept = get_kept_ablation(res.model)
    assert kept is not None and get_virtual_layer(res.model) is None
    d_k = D // 4
    block = U_new[:, d_k:2 * d_k]
    # the kept correction projects out exactly the planted block 1 of the refitted basis
    assert torch.allclose(kept.W @ kept.W.T, block @ block.T, atol=1e-5)


def test_rr_refit_penalises_the_refitted_subspace(tiny_vgg, tiny_pair, random_U, monkeypatch):
    import dataclasses

    import cnp.pruning.schedule as schedule

    U_new = random_U(D, seed=9)
    _plant_refits(monkeypatch, U_new, wm_block=3, calls=[])
    seen = []
    real = schedule._penalty
    monkeypatch.setattr(schedule, "_penalty", lambda vl, cfg: seen.append(real(vl, cfg)) or seen[-1])
    run_pruning(tiny_vgg, tiny_pair, "cnp-rr-refit", dataclasses.replace(CFG, refit_steps=3),
                concept_state=_state(random_U(D, seed=4)), seed=0, verbose=False)
    d_k = D // 4
    first, later = seen[0].W, [p.W for p in seen[1:]]
    assert torch.allclose(first, random_U(D, seed=4)[:, :d_k])  # step 1: the original K'
    assert later and all(torch.allclose(W, U_new[:, 3 * d_k:]) for W in later)  # then the refit's


@pytest.mark.parametrize("method, base", [("cnp-posthoc", "cnp"), ("vanilla-posthoc", "vanilla")])
def test_posthoc_is_its_base_plus_a_kept_ablation_of_a_fresh_fit(tiny_vgg, tiny_pair, random_U, monkeypatch, tmp_path,
                                                                 method, base):
    import dataclasses

    import cnp.pruning.schedule as schedule

    cfg = dataclasses.replace(CFG, refit_steps=4)
    st = _state(random_U(D, seed=4))
    alone = run_pruning(tiny_vgg, tiny_pair, method, cfg, concept_state=st, seed=0, verbose=False)
    cnp_res = run_pruning(tiny_vgg, tiny_pair, base, cfg, concept_state=st if base == "cnp" else None, seed=0,
                          run_dir=tmp_path, verbose=False)
    # the schedule is cnp's, bit for bit; one more final entry: the network as deployed
    assert alone.curve[:-1] == cnp_res.curve
    last = alone.curve[-1]
    assert last["stage"] == "final" and last["step"] == cnp_res.curve[-1]["step"] + 1
    assert last["drsa_recomputed"]["fresh"] and len(last["drsa_recomputed"]["ablated"]) == 1
    assert "acc_ablation_removed" in last and last["acc_ablation_removed"] == cnp_res.curve[-1]["acc"]
    assert get_kept_ablation(alone.model) is not None and get_kept_ablation(cnp_res.model) is None
    # in cnp's run directory it reuses cnp's finished schedule (no fine-tune runs) with the same result
    monkeypatch.setattr(schedule, "_finetune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fine-tuned")))
    reused = run_pruning(tiny_vgg, tiny_pair, method, cfg, concept_state=st, seed=0, run_dir=tmp_path,
                         verbose=False)
    assert reused.curve == alone.curve
    # resumed from the checkpoint it wrote: the same again
    again = run_pruning(tiny_vgg, tiny_pair, method, cfg, concept_state=st, seed=0, run_dir=tmp_path,
                        verbose=False)
    assert again.curve == alone.curve and get_kept_ablation(again.model) is not None


def test_posthoc_resumes_after_the_final_fine_tune(tiny_vgg, tiny_pair, random_U, monkeypatch, tmp_path):
    import dataclasses

    import cnp.pruning.schedule as schedule

    cfg = dataclasses.replace(CFG, refit_steps=4)
    st = _state(random_U(D, seed=4))
    whole = run_pruning(tiny_vgg, tiny_pair, "cnp-posthoc", cfg, concept_state=st, seed=0, verbose=False)
    real = schedule._posthoc

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(schedule, "_posthoc", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pruning(tiny_vgg, tiny_pair, "cnp-posthoc", cfg, concept_state=st, seed=0, run_dir=tmp_path, verbose=False)
    monkeypatch.setattr(schedule, "_posthoc", real)
    monkeypatch.setattr(schedule, "_finetune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fine-tuned")))
    resumed = run_pruning(tiny_vgg, tiny_pair, "cnp-posthoc", cfg, concept_state=st, seed=0, run_dir=tmp_path,
                          verbose=False)
    assert resumed.curve == whole.curve
