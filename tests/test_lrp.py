"""Tests of cnp.lrp: conservation, a hand-computed alpha1beta0 example, contexts, rules and errors.

Conservation premise. Every rule is built with ``zero_params='bias'``: biases take no
relevance and the whole logit is redistributed. LRP-alpha1beta0 divides by
``z+_j = sum_i (x_i w_ij)^+`` (positive contributions only). A unit that is *active only thanks to
its bias* (all ``x_i w_ij <= 0`` but ``z_j = sum_i x_i w_ij + b_j > 0``) receives relevance from
above but has ``z+_j = 0``: its relevance is divided by the stabiliser and vanishes (see
``test_alpha1beta0_loses_relevance_of_bias_driven_units``). With *zero biases* (the tiny VGG of
``conftest.py``) an active unit has ``z_j = sum_i x_i w_ij > 0``, hence ``z+_j > 0``, and an inactive
unit receives no relevance (it enters the layer above with ``x = 0``), so relevance is conserved
at every layer up to the 1e-6 stabiliser. The last layer is scaled so the logits are O(1), which
keeps the stabiliser's relative error small.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnp.io import CNPError
from cnp.lrp import LRP, ContextSite, LRPConfig, attach_site, contexts
from cnp.models import qualified_name

CONVS = [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp(min=1e-3)).max())


# ---------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("cfg", [
    LRPConfig(),                                                    # the paper: alpha1beta0 + zbox
    LRPConfig(first_layer="flat"),
    LRPConfig(first_layer="same"),
    LRPConfig(variant="epsilon", epsilon=1e-9, first_layer="same"),  # LRP-0 in effect
    LRPConfig(variant="epsilon", epsilon=1e-9),
], ids=["a1b0-zbox", "a1b0-flat", "a1b0-same", "eps0-same", "eps0-zbox"])
def test_conservation_at_every_conv_and_input(tiny_vgg, tiny_x, cfg):
    out = LRP(tiny_vgg, cfg).attribute(tiny_x, target=1, filters=True)
    logit = out.target_logit
    assert logit.abs().min() > 0.3, "premise: logits are O(1)"
    assert torch.allclose(logit, out.logits[:, 1])
    assert sorted(out.filter_relevance) == sorted(CONVS)
    for name in CONVS:
        total = out.filter_relevance[name].sum(1)
        assert _rel_err(total, logit) < 1e-4, (name, total, logit)
    assert _rel_err(out.input_relevance.sum((1, 2, 3)), logit) < 1e-4


def test_conservation_for_the_negative_logit(tiny_vgg, tiny_x):
    out = LRP(tiny_vgg).attribute(tiny_x, target=0, filters=True)
    assert (out.target_logit < 0).all()  # the head favours class 1 on these inputs
    assert _rel_err(out.input_relevance.sum((1, 2, 3)), out.target_logit) < 1e-4
    assert _rel_err(out.filter_relevance["features.21"].sum(1), out.target_logit) < 1e-4


def test_per_sample_targets(tiny_vgg, tiny_x):
    target = torch.tensor([0, 1, 0])
    out = LRP(tiny_vgg).attribute(tiny_x, target=target)
    assert torch.allclose(out.target_logit, out.logits[torch.arange(3), target])
    assert _rel_err(out.input_relevance.sum((1, 2, 3)), out.target_logit) < 1e-4


def test_zero_bias_keeps_relevance_out_of_biases(make_tiny_vgg, tiny_x):
    """With biases, zero_bias=True still conserves; zero_bias=False lets biases absorb relevance."""
    model = make_tiny_vgg(bias_std=0.2, seed=2)
    kept = LRP(model, LRPConfig(zero_bias=True)).attribute(tiny_x, 1)
    leaky = LRP(model, LRPConfig(zero_bias=False)).attribute(tiny_x, 1)
    assert _rel_err(kept.input_relevance.sum((1, 2, 3)), kept.target_logit) < 1e-3
    assert _rel_err(leaky.input_relevance.sum((1, 2, 3)), leaky.target_logit) > 1e-2


# ---------------------------------------------------------------------------- hand-computed
def _two_layer_net() -> nn.Module:
    """x (3) -> conv1x1 (2) -> ReLU -> conv1x1 (2 logits) -> flatten; weights chosen by hand."""
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.Flatten())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0, -1.0], [0.5, 1.0, 2.0]]).view(2, 3, 1, 1))
        net[0].bias.copy_(torch.tensor([1.0, -0.25]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]).view(2, 2, 1, 1))
        net[2].bias.copy_(torch.tensor([0.1, -0.2]))
    return net.eval()


def test_hand_computed_alpha1beta0():
    """Pencil and paper, x = (2, -1, 0.5).

    Layer 1 pre-activations: h0 = 2 - 2 - 0.5 + 1 = 0.5, h1 = 1 - 1 + 1 - 0.25 = 0.75 (both active).
    Logits: y0 = 0.5 - 0.75 + 0.1 = -0.15, y1 = 2*0.5 + 0.75 - 0.2 = 1.55.

    Explain y1 = 1.55. Layer 2, positive contributions h0*2 = 1, h1*1 = 0.75, z+ = 1.75:
      R(h0) = 1.55 * 1/1.75 = 6.2/7 = 0.885714,  R(h1) = 1.55 * 0.75/1.75 = 4.65/7 = 0.664286.
    Layer 1 (alpha1beta0 counts x+ w+ and x- w- as positive):
      h0: x0*1 = 2 (+), x1*2 = -2 (x- w+: negative), x2*(-1) = -0.5 (x+ w-: negative): z+ = 2,
          so all of R(h0) goes to x0.
      h1: x0*0.5 = 1 (+), x1*1 = -1 (-), x2*2 = 1 (+): z+ = 2, R(h1) split 1/2, 1/2 to x0, x2.
      R(x) = (6.2/7 + 2.325/7, 0, 2.325/7) = (1.217857, 0, 0.332143), sum 1.55.

    Explain y0 = -0.15. Layer 2: h0*1 = 0.5 (+), h1*(-1) = -0.75 (-): z+ = 0.5, so
      R(h) = (-0.15, 0); layer 1 gives all of R(h0) to x0: R(x) = (-0.15, 0, 0).

    Flat first layer (y1): R(x_i) = sum_j R(h_j) / 3 = 1.55 / 3 each.
    """
    net = _two_layer_net()
    x = torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1)
    cfg = LRPConfig(first_layer="same")

    out = LRP(net, cfg).attribute(x, target=1, filters=True)
    assert torch.allclose(out.logits, torch.tensor([[-0.15, 1.55]]), atol=1e-6)
    assert torch.allclose(out.filter_relevance["2"], torch.tensor([[0.0, 1.55]]), atol=1e-5)
    assert torch.allclose(out.filter_relevance["0"], torch.tensor([[6.2 / 7, 4.65 / 7]]), atol=1e-5)
    assert torch.allclose(out.input_relevance.flatten(), torch.tensor([8.525 / 7, 0.0, 2.325 / 7]), atol=1e-5)

    out0 = LRP(net, cfg).attribute(x, target=0, filters=True)
    assert torch.allclose(out0.filter_relevance["0"], torch.tensor([[-0.15, 0.0]]), atol=1e-5)
    assert torch.allclose(out0.input_relevance.flatten(), torch.tensor([-0.15, 0.0, 0.0]), atol=1e-5)

    flat = LRP(net, LRPConfig(first_layer="flat")).attribute(x, target=1)
    assert torch.allclose(flat.input_relevance.flatten(), torch.full((3,), 1.55 / 3), atol=1e-5)


def test_alpha1beta0_loses_relevance_of_bias_driven_units():
    """x = 1, hidden = relu(-1 * x + 2) = 1 (active only through its bias), logit = hidden = 1.

    The hidden unit gets R = 1 but has no positive contribution (z+ = 0): alpha1beta0 divides by
    the stabiliser only and the input gets 0 - relevance is lost, never inflated.
    """
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU(), nn.Conv2d(1, 1, 1), nn.Flatten())
    with torch.no_grad():
        net[0].weight.fill_(-1.0)
        net[0].bias.fill_(2.0)
        net[2].weight.fill_(1.0)
        net[2].bias.fill_(0.0)
    out = LRP(net, LRPConfig(first_layer="same")).attribute(torch.ones(1, 1, 1, 1), target=0, filters=True)
    assert float(out.target_logit) == pytest.approx(1.0)
    assert float(out.filter_relevance["0"].sum()) == pytest.approx(1.0)
    assert torch.isfinite(out.input_relevance).all()
    assert float(out.input_relevance.abs().sum()) < 1e-5


# ---------------------------------------------------------------------------- filter maps
def test_filter_relevance_is_the_spatial_sum_of_the_map(tiny_vgg, tiny_x):
    names = ["conv1_1", "conv4_3", "conv5_2", "conv5_3"]
    out = LRP(tiny_vgg).attribute(tiny_x, 1, filters=True, layers=names, input_relevance=False)
    assert out.input_relevance is None
    mixed = False
    for n in names:
        q = qualified_name(n)
        R = out.layer_relevance[q]
        assert R.shape[:2] == (3, tiny_vgg.features[int(q.split('.')[1])].out_channels)
        assert torch.allclose(out.filter_relevance[q], R.sum((2, 3)), atol=1e-6)
        assert torch.allclose(out.filter_relevance_abs[q], R.abs().sum((2, 3)), atol=1e-6)
        mixed |= bool((out.filter_relevance_abs[q] > out.filter_relevance[q].abs() + 1e-6).any())
    assert mixed, "some filter has relevance of both signs over its positions"


def test_attribute_leaves_the_model_as_it_was(make_tiny_vgg, tiny_x):
    model = make_tiny_vgg(dropout=0.5)
    model.train()
    with torch.no_grad():
        before = model.eval()(tiny_x)
    model.train()
    LRP(model).attribute(tiny_x, 1, filters=True, layers=["relu4_3"])
    contexts(model, tiny_x)
    assert model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    assert not hasattr(model, "cnp_context_probe")
    with torch.no_grad():
        assert torch.equal(model.eval()(tiny_x), before)


# ---------------------------------------------------------------------------- contexts
@pytest.mark.parametrize("variant", ["alpha1beta0", "gamma", "epsilon"])
def test_contexts_agree_with_relevance_over_activation(tiny_vgg, tiny_x, variant):
    cfg = LRPConfig(variant=variant)
    a, c, att = contexts(tiny_vgg, tiny_x, "relu4_3", 1, cfg)
    R = LRP(tiny_vgg, cfg).attribute(tiny_x, 1, layers=["relu4_3"]).layer_relevance["features.22"]
    assert a.shape == c.shape == R.shape == (3, 16, 4, 4)
    pos = a > 0
    assert pos.any() and (~pos).any()
    scale = float(R.abs().max())
    assert float((c[pos] * a[pos] - R[pos]).abs().max()) < 1e-5 * scale
    assert torch.allclose(c[pos], R[pos] / a[pos], rtol=1e-4, atol=1e-6 * scale / float(a[pos].min()))
    assert torch.allclose(a * c, R, atol=1e-6 * scale)
    # the relevance at the layer is the whole logit (up to this rule's own conservation)
    if variant != "epsilon":
        assert _rel_err((a * c).sum((1, 2, 3)), att.target_logit) < 1e-4


def test_contexts_are_nonzero_where_activation_is_zero(tiny_vgg, tiny_x):
    """c is computed directly, so it exists where a = 0 (where R = 0 and R / a is undefined)."""
    a, c, _ = contexts(tiny_vgg, tiny_x, "relu4_3", 1)
    R = LRP(tiny_vgg).attribute(tiny_x, 1, layers=["relu4_3"]).layer_relevance["features.22"]
    zero = a == 0
    assert zero.any()
    assert (R[zero] == 0).all()
    assert int((c[zero] != 0).sum()) > 0
    # a mixing basis sees it: (U^T c) differs from (U^T (R / a with 0 where a = 0))
    c_from_R = torch.where(a > 0, R / a.clamp(min=1e-30), torch.zeros_like(R))
    assert float((c - c_from_R).abs().max()) > 1e-3 * float(c.abs().max())


def test_contexts_match_an_explicit_alpha1beta0_backward(tiny_vgg, tiny_x):
    """c at relu4_3, computed by hand from the relevance at conv5_1's output R5: alpha1beta0
    at conv5_1 (inputs x = maxpool(a) >= 0, zero bias) gives the context W+^T (R5 / z+) at x, with
    z+ = conv(x, W+) + stabiliser; max pooling routes it to the winning position of each window.
    Positions with a = 0 take the positive branch too (post-ReLU inputs are >= 0)."""
    import torch.nn.functional as F

    a, c, _ = contexts(tiny_vgg, tiny_x, "relu4_3", 1)
    R5 = LRP(tiny_vgg).attribute(tiny_x, 1, layers=["conv5_1"]).layer_relevance["features.24"]
    w_pos = tiny_vgg.features[24].weight.detach().clamp(min=0)
    a_ = a.clone().double().requires_grad_(True)
    xp = F.max_pool2d(a_, 2, 2)
    zp = F.conv2d(xp, w_pos.double(), padding=1)
    ctx_x = torch.autograd.grad(zp, xp, grad_outputs=R5.double() / (zp.detach() + 1e-6), retain_graph=True)[0]
    c_ref = torch.autograd.grad(xp, a_, grad_outputs=ctx_x)[0].float()
    zero = a == 0
    assert (c_ref[zero] != 0).any()
    assert torch.allclose(c, c_ref, rtol=1e-4, atol=1e-6 * float(c_ref.abs().max()))


def test_contexts_only_after_the_activation(tiny_vgg, tiny_x):
    with pytest.raises(CNPError, match="ReLU follows"):
        contexts(tiny_vgg, tiny_x, "conv4_3")
    # the first ruled layer downstream (conv5_1) must give contexts: Flat cannot
    with pytest.raises(CNPError, match="alpha-beta, epsilon or gamma"):
        contexts(tiny_vgg, tiny_x, "relu4_3", config=LRPConfig(overrides={"conv5_1": "flat"}))
    assert not hasattr(tiny_vgg, "cnp_context_probe")  # the probe is removed on error too


# ---------------------------------------------------------------------------- rules
def test_overrides_change_the_rule_of_that_layer_only(tiny_vgg, tiny_x):
    """Overriding conv5_3 with epsilon: relevance at conv5_3's output (computed above it) is
    unchanged; relevance at conv5_2's output equals the one of the all-epsilon variant (only
    conv5_3 and the head lie above it) and differs from plain alpha1beta0."""
    base = LRP(tiny_vgg, LRPConfig()).attribute(tiny_x, 1, filters=True)
    over = LRP(tiny_vgg, LRPConfig(overrides={"conv5_3": "epsilon:0.1"})).attribute(tiny_x, 1, filters=True)
    eps = LRP(tiny_vgg, LRPConfig(variant="epsilon", epsilon=0.1)).attribute(tiny_x, 1, filters=True)
    c53, c52 = "features.28", "features.26"
    assert torch.allclose(over.filter_relevance[c53], base.filter_relevance[c53])
    assert torch.allclose(over.filter_relevance[c52], eps.filter_relevance[c52], atol=1e-6)
    assert not torch.allclose(over.filter_relevance[c52], base.filter_relevance[c52], atol=1e-4)
    # qualified names work the same; overriding with the default rule changes nothing
    q = LRP(tiny_vgg, LRPConfig(overrides={"features.28": "epsilon:0.1"})).attribute(tiny_x, 1)
    assert torch.equal(q.input_relevance, over.input_relevance)
    same = LRP(tiny_vgg, LRPConfig(overrides={"conv5_3": "alpha1beta0"})).attribute(tiny_x, 1)
    assert torch.allclose(same.input_relevance, base.input_relevance)


def test_first_layer_rule_only_changes_the_input_relevance(tiny_vgg, tiny_x):
    outs = {fl: LRP(tiny_vgg, LRPConfig(first_layer=fl)).attribute(tiny_x, 1, filters=True)
            for fl in ("zbox", "flat", "same")}
    for fl in ("flat", "same"):
        assert torch.allclose(outs[fl].filter_relevance["features.0"], outs["zbox"].filter_relevance["features.0"])
        assert not torch.allclose(outs[fl].input_relevance, outs["zbox"].input_relevance, atol=1e-4)


@pytest.mark.parametrize("cfg", [LRPConfig(variant="gamma"), LRPConfig(variant="gamma", gamma=1.0),
                                 LRPConfig(variant="epsilon"), LRPConfig(variant="epsilon", epsilon=10.0),
                                 LRPConfig(overrides={"conv5_3": "alpha2beta1", "conv5_2": "gamma:0.5",
                                                      "conv1_2": "zplus", "conv2_1": "norm"})],
                         ids=["gamma", "gamma1", "eps", "eps10", "mixed-overrides"])
def test_other_variants_run_and_are_finite(tiny_vgg, tiny_x, cfg):
    out = LRP(tiny_vgg, cfg).attribute(tiny_x, 1, filters=True)
    assert torch.isfinite(out.input_relevance).all()
    assert all(torch.isfinite(v).all() for v in out.filter_relevance.values())
    ref = LRP(tiny_vgg).attribute(tiny_x, 1).input_relevance
    assert not torch.allclose(out.input_relevance, ref, atol=1e-5)  # the rule was used


def test_epsilon_absorbs_relevance(tiny_vgg, tiny_x):
    """A large epsilon absorbs relevance (|sum R| shrinks), gamma conserves like alpha1beta0."""
    big = LRP(tiny_vgg, LRPConfig(variant="epsilon", epsilon=10.0, first_layer="same")).attribute(tiny_x, 1)
    assert (big.input_relevance.sum((1, 2, 3)).abs() < 0.5 * big.target_logit.abs()).all()
    gam = LRP(tiny_vgg, LRPConfig(variant="gamma")).attribute(tiny_x, 1)
    assert _rel_err(gam.input_relevance.sum((1, 2, 3)), gam.target_logit) < 1e-4


def test_bad_configs_raise(tiny_vgg, tiny_x):
    with pytest.raises(CNPError, match="unknown LRP variant"):
        LRPConfig(variant="alpha2beta1")
    with pytest.raises(CNPError, match="first_layer"):
        LRPConfig(first_layer="epsilon")
    with pytest.raises(CNPError, match="unknown LRP rule spec"):
        LRPConfig(overrides={"conv5_3": "lrp0"})
    with pytest.raises(CNPError, match="bad number"):
        LRPConfig(overrides={"conv5_3": "epsilon:small"})
    with pytest.raises(CNPError, match="unknown layer name"):
        LRP(tiny_vgg, LRPConfig(overrides={"conv6_1": "flat"}))
    with pytest.raises(CNPError, match="unknown layer name"):
        LRP(tiny_vgg).attribute(tiny_x, 1, layers=["relu9"])
    with pytest.raises(CNPError, match="unknown layer name"):
        contexts(tiny_vgg, tiny_x, "relu4_4")


# ---------------------------------------------------------------------------- sites
def test_probe_site_records_and_conserves(tiny_vgg, tiny_x):
    a, c, _ = contexts(tiny_vgg, tiny_x)
    probe = ContextSite()
    probe.keep_tensors = True
    attach_site(tiny_vgg, "relu4_3", probe)
    assert probe.layer_name == "features.22"
    with torch.no_grad():
        assert torch.equal(tiny_vgg(tiny_x), LRP(tiny_vgg).attribute(tiny_x, 1).logits)
    out = LRP(tiny_vgg).attribute(tiny_x, 1)
    assert _rel_err(probe.last_layer_relevance, out.target_logit) < 1e-4
    assert torch.allclose(probe.last_output_relevance, probe.last_layer_relevance, atol=1e-6)
    assert torch.equal(probe.last_a, a) and torch.allclose(probe.last_c, c, atol=1e-7)
    with pytest.raises(CNPError, match="already has"):
        attach_site(tiny_vgg, "relu4_3", ContextSite())
    probe.detach_from(tiny_vgg)
    assert not hasattr(tiny_vgg, ContextSite.site_attr)
    assert not tiny_vgg.features[22]._forward_hooks


def test_pass_override_on_a_channel_changing_conv_is_a_config_error(tiny_vgg, tiny_x):
    with pytest.raises(CNPError):
        LRP(tiny_vgg, LRPConfig(overrides={"conv2_1": "pass"})).attribute(tiny_x, 1)


def test_layer_relevance_with_a_site_attached_is_relevance(tiny_vgg, tiny_x):
    R = LRP(tiny_vgg).attribute(tiny_x, 1, layers=["relu4_3"]).layer_relevance["features.22"]
    attach_site(tiny_vgg, "relu4_3", ContextSite())  # identity: the network is unchanged
    R_site = LRP(tiny_vgg).attribute(tiny_x, 1, layers=["relu4_3"]).layer_relevance["features.22"]
    assert torch.allclose(R_site.sum((1, 2, 3)), R.sum((1, 2, 3)), rtol=1e-4)
    assert torch.allclose(R_site, R, atol=1e-6)


def test_attaching_a_site_does_not_change_the_state_dict(tiny_vgg):
    keys = list(tiny_vgg.state_dict())
    attach_site(tiny_vgg, "fc7", ContextSite())  # a host with parameters
    assert list(tiny_vgg.state_dict()) == keys
    assert len(list(tiny_vgg.named_modules(remove_duplicate=False))) == len(list(tiny_vgg.named_modules()))


class _CountConvGrads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the transposed convolutions (``aten.convolution_backward``) run inside the mode."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cfg", [LRPConfig(), LRPConfig(variant="epsilon"), LRPConfig(variant="gamma")],
                         ids=["a1b0", "epsilon", "gamma"])
def test_layers_under_a_rule_skip_their_own_gradient_with_the_same_relevance(make_tiny_vgg, tiny_x, random_U,
                                                                            monkeypatch, cfg):
    """zennit replaces the gradient that autograd computes through a ruled layer by the rule's
    relevance; LRP never computes that gradient (one transposed convolution less per conv) and
    gives the same relevance, filter sums, concept relevance and logits, to the bit."""
    import cnp.lrp as lrp_mod
    from cnp.virtual_layer import insert_virtual_layer

    model = make_tiny_vgg(seed=5, bias_std=0.1)
    vl = insert_virtual_layer(model, random_U(16), 4)
    vl.set_ablation([1], "zero")
    seen = []   # a caller's hook on a ruled layer still sees the tensor the relevance flows through

    def grab(m, i, o):
        if o.requires_grad:
            o.register_hook(lambda g: seen.append(g.clone()))

    handle = model.features[22].register_forward_hook(grab)

    def run():
        seen.clear()
        with _CountConvGrads() as count:
            out = LRP(model, cfg).attribute(tiny_x, 1, filters=True)
        return out, vl.last_concept_relevance.clone(), seen[0], count.n

    fast, c_fast, a_fast, n_fast = run()
    monkeypatch.setattr(lrp_mod, "_rule_only_backward", lambda *args: None)   # zennit's own way
    ref, c_ref, a_ref, n_ref = run()
    handle.remove()
    assert n_ref - n_fast == len(CONVS), (n_fast, n_ref)
    assert torch.equal(fast.input_relevance, ref.input_relevance) and torch.equal(fast.logits, ref.logits)
    assert all(torch.equal(fast.filter_relevance[k], ref.filter_relevance[k]) for k in ref.filter_relevance)
    assert torch.equal(c_fast, c_ref) and torch.equal(a_fast, a_ref)
