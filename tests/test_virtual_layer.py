"""Tests of cnp.virtual_layer: identity, ablation (zero / mean), bypass, removal, LRP through it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cnp.concepts import subspace_heatmaps
from cnp.io import CNPError
from cnp.lrp import LRP, contexts
from cnp.models import full_vgg16
from cnp.virtual_layer import (
    VirtualLayer,
    bypass,
    check_orthonormal,
    from_state,
    get_virtual_layer,
    insert_virtual_layer,
    remove_virtual_layer,
)

D = 16  # channels at relu4_3 of the tiny VGG


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def _relu43_output(model, x):
    """Raw output of relu4_3 (a), captured with the virtual layer (if any) bypassed."""
    store = []
    h = model.features[22].register_forward_hook(lambda m, i, o: store.append(o.detach().clone()))
    try:
        with bypass(model), torch.no_grad():
            model(x)
    finally:
        h.remove()
    return store[0]


def _logits_from_relu43(model, x, replacement):
    """Logits of ``model`` (no virtual layer) with relu4_3's output replaced by ``replacement(a)``."""
    h = model.features[22].register_forward_hook(lambda m, i, o: replacement(o))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        h.remove()


def _block(U, k, d_k):
    return U[:, k * d_k:(k + 1) * d_k]


# ---------------------------------------------------------------------------- identity
@pytest.mark.parametrize("K", [1, 2, 4, 16])
def test_identity_when_nothing_is_ablated(tiny_vgg, tiny_x, random_U, K):
    before = _logits(tiny_vgg, tiny_x)
    vl = insert_virtual_layer(tiny_vgg, random_U(D), K)
    assert vl.d_k == D // K and vl.layer_name == "features.22"
    after = _logits(tiny_vgg, tiny_x)
    assert float((after - before).abs().max()) <= 1e-5 * float(before.abs().max())
    # not vacuous: ablating one subspace changes the logits
    if K > 1:
        vl.set_ablation([0])
        assert float((_logits(tiny_vgg, tiny_x) - before).abs().max()) > 1e-3 * float(before.abs().max())


def test_identity_on_a_full_size_vgg16(init_vgg, random_U):
    """full_vgg16(2), He-initialised (so logits are O(1) and differ per image), 64 px, batch 2."""
    model = init_vgg(full_vgg16(2), seed=0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = _logits(model, x)
    assert float(before.abs().max()) > 0.1 and not torch.allclose(before[0], before[1])
    vl = insert_virtual_layer(model, random_U(512, seed=5), K=4)
    after = _logits(model, x)
    assert float((after - before).abs().max()) <= 1e-5 * float(before.abs().max())
    vl.set_ablation([2])
    assert not torch.allclose(_logits(model, x), before, atol=1e-3)


# ---------------------------------------------------------------------------- ablation
@pytest.mark.parametrize("ablated", [[0], [1, 3], [0, 1, 2]])
def test_zero_ablation_is_the_kept_projection(tiny_vgg, tiny_x, random_U, ablated):
    U = random_U(D).double()
    reference = copy.deepcopy(tiny_vgg)
    vl = insert_virtual_layer(tiny_vgg, U.float(), 4, ablated=ablated)
    kept = [k for k in range(4) if k not in ablated]
    assert vl.keep_mask.tolist() == [0.0 if k in ablated else 1.0 for k in range(4)]

    def manual(a):  # sum_{k kept} U_k U_k^T a, in float64
        P = sum(_block(U, k, 4) @ _block(U, k, 4).T for k in kept)
        return torch.einsum("ij,njhw->nihw", P, a.double()).float()

    a = _relu43_output(tiny_vgg, tiny_x)
    assert torch.allclose(vl(a), manual(a), atol=1e-6)
    expected = _logits_from_relu43(reference, tiny_x, manual)
    assert torch.allclose(_logits(tiny_vgg, tiny_x), expected, atol=1e-5)
    assert not torch.allclose(expected, _logits(reference, tiny_x), atol=1e-4)


def test_mean_ablation_adds_the_mean_of_the_ablated_subspace(tiny_vgg, tiny_x, random_U, make_images):
    U = random_U(D)
    images = make_images(5, 32, seed=7)
    reference = copy.deepcopy(tiny_vgg)
    vl = insert_virtual_layer(tiny_vgg, U, 4)
    mean = vl.fit_mean(tiny_vgg, images, batch_size=2)  # uint8 images, two batches
    from cnp.images import normalize_images

    a_all = _relu43_output(tiny_vgg, normalize_images(images))
    assert torch.allclose(mean, a_all.mean((0, 2, 3)), atol=1e-6)
    assert vl.enabled  # fit_mean restores the layer

    vl.set_ablation([1], mode="mean")
    U1 = _block(U, 1, 4)

    def manual(a):
        out = a - torch.einsum("ij,njhw->nihw", U1 @ U1.T, a)  # zero the ablated subspace
        return out + (U1 @ (U1.T @ mean)).view(1, D, 1, 1)      # and put back its mean

    a = _relu43_output(tiny_vgg, tiny_x)
    out = vl(a)
    assert torch.allclose(out, manual(a), atol=1e-5)
    # the ablated coordinates are the same constant (U_1^T mean) everywhere; the kept ones are a's
    h = torch.einsum("ij,njhw->nihw", U.T, out)
    h_a = torch.einsum("ij,njhw->nihw", U.T, a)
    assert torch.allclose(h[:, 4:8], (U1.T @ mean).view(1, 4, 1, 1).expand_as(h[:, 4:8]), atol=1e-5)
    assert torch.allclose(h[:, [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]],
                          h_a[:, [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]], atol=1e-5)
    assert torch.allclose(_logits(tiny_vgg, tiny_x), _logits_from_relu43(reference, tiny_x, manual), atol=1e-5)
    # zero mode differs from mean mode
    vl.set_ablation([1], mode="zero")
    assert not torch.allclose(vl(a), out, atol=1e-4)


# ---------------------------------------------------------------------------- bypass / removal
def test_bypass_gives_exactly_the_original_logits(tiny_vgg, tiny_x, random_U):
    before = _logits(tiny_vgg, tiny_x)
    vl = insert_virtual_layer(tiny_vgg, random_U(D), 4, ablated=[2])
    ablated = _logits(tiny_vgg, tiny_x)
    with bypass(tiny_vgg) as got:
        assert got is vl and not vl.enabled
        assert torch.equal(_logits(tiny_vgg, tiny_x), before)
    assert vl.enabled
    assert torch.equal(_logits(tiny_vgg, tiny_x), ablated)
    with bypass(tiny_vgg, active=False):
        assert torch.equal(_logits(tiny_vgg, tiny_x), ablated)
    vl.enabled = False  # a bypass inside a disabled layer keeps it disabled afterwards
    with bypass(tiny_vgg):
        pass
    assert not vl.enabled
    remove_virtual_layer(tiny_vgg)
    with bypass(tiny_vgg) as got:  # no virtual layer: a no-op
        assert got is None


def test_remove_restores_the_original_network(tiny_vgg, tiny_x, random_U):
    keys = list(tiny_vgg.state_dict())
    names = [n for n, _ in tiny_vgg.named_modules()]
    before = _logits(tiny_vgg, tiny_x)
    vl = insert_virtual_layer(tiny_vgg, random_U(D), 4, ablated=[0, 3])
    assert list(tiny_vgg.state_dict()) == keys  # U is not a persistent buffer
    assert get_virtual_layer(tiny_vgg) is vl
    out = remove_virtual_layer(tiny_vgg)
    assert out is tiny_vgg
    assert get_virtual_layer(tiny_vgg) is None
    assert list(tiny_vgg.state_dict()) == keys
    assert [n for n, _ in tiny_vgg.named_modules()] == names
    assert not tiny_vgg.features[22]._forward_hooks
    assert torch.equal(_logits(tiny_vgg, tiny_x), before)
    remove_virtual_layer(tiny_vgg)  # removing twice is harmless
    insert_virtual_layer(tiny_vgg, random_U(D), 4)  # and a new one can be inserted


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_state_round_trip(tiny_vgg, tiny_x, random_U, make_images, mode):
    reference = copy.deepcopy(tiny_vgg)
    vl = insert_virtual_layer(tiny_vgg, random_U(D), 4)
    if mode == "mean":
        vl.fit_mean(tiny_vgg, make_images(3))
    vl.set_ablation([3], mode)
    st = vl.state()
    assert st["layer"] == "features.22" and st["K"] == 4 and st["ablated"] == [3] and st["mode"] == mode
    assert (st["mean_activation"] is None) == (mode == "zero")
    vl2 = from_state(reference, st)
    assert vl2.ablated == (3,) and vl2.mode == mode
    assert torch.equal(vl2.U, vl.U)
    assert torch.equal(_logits(reference, tiny_x), _logits(tiny_vgg, tiny_x))


# ---------------------------------------------------------------------------- LRP through the layer
def test_concept_relevance_conserves_the_logit_in_zero_mode(tiny_vgg, tiny_x, random_U):
    vl = insert_virtual_layer(tiny_vgg, random_U(D), 4)
    vl.keep_tensors = True
    out = LRP(tiny_vgg).attribute(tiny_x, 1, filters=True)
    logit = out.target_logit
    Rk = vl.last_concept_relevance
    assert Rk.shape == (3, 4)
    tol = 1e-4 * float(logit.abs().max())
    assert torch.allclose(Rk.sum(1), logit, atol=tol)
    assert torch.allclose(vl.last_output_relevance, logit, atol=tol)
    assert torch.allclose(vl.last_layer_relevance, logit, atol=tol)
    assert torch.allclose(out.input_relevance.sum((1, 2, 3)), logit, atol=tol)
    # R(k) recomputed from the recorded a and c: sum over positions and block k of h_j (U^T c)_j
    h = torch.einsum("ji,njhw->nihw", vl.U, vl.last_a)
    g = torch.einsum("ji,njhw->nihw", vl.U, vl.last_c)
    manual = (h * g).sum((2, 3)).view(3, 4, 4).sum(2)
    assert torch.allclose(Rk, manual, atol=1e-6)
    assert (Rk.abs() > 1e-4).all()  # every subspace carries some relevance here


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablated_subspaces_get_no_relevance(tiny_vgg, tiny_x, random_U, make_images, mode):
    U = random_U(D)
    vl = insert_virtual_layer(tiny_vgg, U, 4)
    if mode == "mean":
        vl.fit_mean(tiny_vgg, make_images(4))
    vl.set_ablation([1, 2], mode)
    vl.keep_tensors = True
    # relevance arriving at relu4_3's own output (the input a of the virtual layer)
    grads = []

    def grab(m, i, o):
        if o.requires_grad:  # (LRP also runs a no-grad forward to find the call order)
            o.register_hook(lambda g: grads.append(g.detach().clone()))

    h = tiny_vgg.features[22].register_forward_hook(grab)
    try:
        out = LRP(tiny_vgg).attribute(tiny_x, 1, filters=True)
    finally:
        h.remove()
    R_a = grads[0]
    a, c_out = vl.last_a, vl.last_c
    Rk = vl.last_concept_relevance
    assert (Rk[:, [1, 2]] == 0).all()
    # relevance at a is a * c_in with c_in = sum_{k kept} U_k U_k^T c_out ...
    c_in = vl.context_backward(a, c_out)
    scale = float(R_a.abs().max())
    assert torch.allclose(R_a, a * c_in, atol=1e-6 * scale)
    # ... so the context at a has no component in the ablated subspaces
    for k in (1, 2):
        proj = torch.einsum("ji,njhw->nihw", _block(U, k, 4), c_in)
        assert float(proj.abs().max()) < 1e-6 * float(c_in.abs().max())
    # conservation: what reaches a is the kept concepts; the conv below sees the same
    assert torch.allclose(R_a.sum((1, 2, 3)), Rk.sum(1), atol=1e-5)
    assert torch.allclose(out.filter_relevance["features.21"].sum(1), Rk.sum(1), atol=1e-5)
    # sum_k R(k) + residue = relevance arriving at the layer output = the logit
    residue = (vl.offset().view(1, D, 1, 1) * c_out).sum((1, 2, 3))
    if mode == "zero":
        assert (residue == 0).all()
    tol = 1e-4 * float(out.target_logit.abs().max())
    assert torch.allclose(Rk.sum(1) + residue, vl.last_output_relevance, atol=tol)
    assert torch.allclose(vl.last_output_relevance, out.target_logit, atol=tol)


def test_subspace_heatmaps_add_up(tiny_vgg, tiny_x, random_U, monkeypatch):
    vl = insert_virtual_layer(tiny_vgg, random_U(D), 4, ablated=[3])
    calls = []
    original = LRP.attribute

    def counting(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LRP, "attribute", counting)
    per, overall = subspace_heatmaps(tiny_vgg, vl, tiny_x, target=1)
    monkeypatch.undo()
    assert calls == [3 * 5]  # one LRP pass over the K + 1 replicas
    assert per.shape == (3, 4, 32, 32) and overall.shape == (3, 32, 32)
    scale = float(overall.abs().max())
    assert torch.allclose(per.sum(1), overall, atol=1e-5 * scale)
    assert (per[:, 3] == 0).all()  # the ablated subspace
    # each heatmap carries that subspace's relevance R(k) down to the pixels
    out = LRP(tiny_vgg).attribute(tiny_x, 1)
    assert torch.allclose(per.sum((2, 3)), vl.last_concept_relevance, atol=1e-4 * float(out.target_logit.abs().max()))
    assert torch.allclose(overall.sum((1, 2)), out.target_logit, atol=1e-4 * float(out.target_logit.abs().max()))
    assert torch.allclose(overall, out.input_relevance.sum(1), atol=1e-5 * scale)
    assert vl.backward_blocks is None and vl.enabled  # state restored


# ---------------------------------------------------------------------------- errors
def test_bad_inputs_raise(tiny_vgg, tiny_x, random_U):
    U = random_U(D)
    with pytest.raises(CNPError, match="K \\* d_k must equal D"):
        VirtualLayer(U, 3)
    with pytest.raises(CNPError, match="positive integer"):
        VirtualLayer(U, 0)
    with pytest.raises(CNPError, match="square"):
        VirtualLayer(U[:, :8], 2)
    bad = U.clone()
    bad[:, 0] *= 1.5
    with pytest.raises(CNPError, match="not orthonormal"):
        check_orthonormal(bad)
    with pytest.raises(CNPError, match="not orthonormal"):
        VirtualLayer(bad, 4)
    with pytest.raises(CNPError, match="unknown layer name"):
        insert_virtual_layer(tiny_vgg, U, 4, layer="relu4_4")
    assert get_virtual_layer(tiny_vgg) is None
    vl = VirtualLayer(U, 4)
    for bad_k in ([4], [-1], [0, 7]):
        with pytest.raises(CNPError, match="outside 0..3"):
            vl.set_ablation(bad_k)
    with pytest.raises(CNPError, match="every subspace"):
        vl.set_ablation([0, 1, 2, 3])
    with pytest.raises(CNPError, match="fit_mean"):
        vl.set_ablation([0], mode="mean")
    with pytest.raises(CNPError, match="unknown ablation mode"):
        vl.set_ablation([0], mode="scale")
    assert vl.ablated == () and vl.mode == "zero"  # failed calls change nothing
    with pytest.raises(CNPError, match="before fit_mean"):
        vl.fit_mean(tiny_vgg, tiny_x)
    # a basis of the wrong size is caught on the first forward pass
    insert_virtual_layer(tiny_vgg, random_U(8), 2)
    with pytest.raises(CNPError, match="expects 8 channels"):
        _logits(tiny_vgg, tiny_x)
    with pytest.raises(CNPError, match="already has"):
        insert_virtual_layer(tiny_vgg, U, 4)


@pytest.mark.parametrize("kwargs", [{"ablated": [4]}, {"ablated": [0, 1, 2, 3]}, {"ablated": [0], "mode": "mean"}])
def test_rejected_insert_leaves_the_model_unchanged(tiny_vgg, random_U, kwargs):
    with pytest.raises(CNPError):
        insert_virtual_layer(tiny_vgg, random_U(D), 4, **kwargs)
    assert get_virtual_layer(tiny_vgg) is None


def test_contexts_on_an_augmented_model(tiny_vgg, tiny_x, random_U):
    insert_virtual_layer(tiny_vgg, random_U(D), 4)  # nothing ablated: the same function
    try:
        a, c, att = contexts(tiny_vgg, tiny_x)
    except CNPError:
        return  # refusing explicitly would be fine too
    tol = 1e-4 * float(att.target_logit.abs().max())
    assert torch.allclose(att.input_relevance.sum((1, 2, 3)), att.target_logit, atol=tol)
    assert torch.allclose((a * c).sum((1, 2, 3)), att.target_logit, atol=tol)


def test_virtual_layer_is_a_module_of_the_model(tiny_vgg, random_U):
    vl = insert_virtual_layer(tiny_vgg, random_U(D), 4)
    assert isinstance(vl, nn.Module)
    assert any(m is vl for m in tiny_vgg.modules())
    tiny_vgg.to(torch.float64)
    assert vl.U.dtype == torch.float64  # buffers follow the model
    tiny_vgg.to(torch.float32)
    assert "ablated=[]" in repr(vl) and "K=4" in repr(vl)


# ------------------------------------------------------------------------------ strengths
def test_strengths_one_is_the_identity_and_zero_ablates(tiny_vgg, random_U, tiny_x):
    """s = 1 everywhere is the identity (the un-ablated layer, bit for bit); s_k = 0 equals
    ablating U_k, in zero and mean mode; an intermediate strength blends linearly."""
    import copy

    from cnp.virtual_layer import insert_virtual_layer

    U = random_U(16, seed=3)
    model = copy.deepcopy(tiny_vgg)
    vl = insert_virtual_layer(model, U, 4, "relu4_3")
    a = torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    ref = vl(a)
    assert torch.equal(vl.set_strengths([1, 1, 1, 1])(a), ref)
    mean = torch.randn(16, generator=torch.Generator().manual_seed(1))
    vl.mean_activation, vl._has_mean = mean, True
    for mode in ("zero", "mean"):
        vl.set_ablation([2], mode).set_strengths(None)
        ablated = vl(a)
        vl.set_ablation([], mode).set_strengths([1, 1, 0, 1])
        assert torch.allclose(vl(a), ablated, atol=1e-6), mode
        vl.set_strengths([1, 1, 0.25, 1])
        half = vl(a)
        vl.set_strengths(None)
        full = vl(a)
        assert torch.allclose(half, 0.25 * full + 0.75 * ablated, atol=1e-5), mode
    # the network with every strength 1 equals the network without the layer
    vl.set_ablation([], "zero").set_strengths(None)
    with torch.no_grad():
        out = model(tiny_x)
        vl.enabled = False
        assert torch.allclose(out, model(tiny_x), atol=1e-5)
    with pytest.raises(CNPError, match="one value per subspace"):
        vl.set_strengths([1, 1])
    with pytest.raises(CNPError, match=r"\[0, 1\]"):
        vl.set_strengths([1, 1, 1.5, 1])


def test_strengths_travel_with_the_state_and_weight_concept_relevance(tiny_vgg, random_U, tiny_x):
    import copy

    from cnp.lrp import LRP
    from cnp.virtual_layer import from_state, insert_virtual_layer, remove_virtual_layer

    model = copy.deepcopy(tiny_vgg)
    vl = insert_virtual_layer(model, random_U(16, seed=3), 4, "relu4_3").set_strengths([1, 0.5, 1, 0])
    st = vl.state()
    assert st["strengths"].tolist() == [1, 0.5, 1, 0]
    remove_virtual_layer(model)
    vl2 = from_state(model, st)
    assert vl2.strengths.tolist() == [1, 0.5, 1, 0]
    LRP(model).attribute(tiny_x, 1, input_relevance=False)
    assert vl2.last_concept_relevance[:, 3].abs().max() == 0   # strength 0: no relevance through U_3
