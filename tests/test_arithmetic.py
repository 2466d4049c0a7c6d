"""The arithmetic settings: channels_last convolutions, bf16 fine-tunes where native, the ZPlus
rule without its all-zero term; what each keeps exactly and how the caches see them."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_images
from zennit.rules import ZPlus

import cnp.lrp as lrp_mod
import cnp.runtime as runtime
from cnp.io import CNPError
from cnp.lrp import LRP, LRPConfig, NonNegativeZPlus
from cnp.runtime import resolve_precision, set_memory_format


def _normalised(n: int = 6, size: int = 32) -> torch.Tensor:
    from cnp.images import normalize_images

    return normalize_images(random_images(n, size=size))


def _relevance(model, x, rule_cls, monkeypatch):
    monkeypatch.setattr(lrp_mod, "NonNegativeZPlus", rule_cls)
    out = LRP(model, LRPConfig()).attribute(x, 1)
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_nonnegative_zplus_equals_zennit_zplus_to_the_bit(make_tiny_vgg, monkeypatch, memory_format):
    model = set_memory_format(make_tiny_vgg(seed=3, bias_std=0.1), memory_format)
    x = _normalised()
    fast = _relevance(model, x, NonNegativeZPlus, monkeypatch)
    ref = _relevance(model, x, ZPlus, monkeypatch)
    assert torch.equal(fast.input_relevance, ref.input_relevance)
    assert fast.filter_relevance.keys() == ref.filter_relevance.keys()
    for k in ref.filter_relevance:
        assert torch.equal(fast.filter_relevance[k], ref.filter_relevance[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_stabiliser_equals_zenniths_to_the_bit(dtype):
    """``z + eps * s`` as :func:`zennit.core.stabilize` computes it, on the values where a shortcut
    could differ: signed zeros, subnormals, values near +-eps, infinities, NaN; and a rule copied by
    a composite keeps the fast path."""
    from zennit.core import stabilize

    from cnp.lrp import _shift_away_from_zero

    tiny = torch.finfo(dtype).tiny
    special = torch.tensor([0.0, -0.0, tiny / 4, -tiny / 4, 1e-6, -1e-6, 5e-7, -5e-7, 1.0, -3.5, 1e30,
                            float("inf"), float("-inf")], dtype=dtype)
    z = torch.cat([special, torch.randn(10000, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 1e-5])
    for eps in (1e-6, 0.25, 1e-9):
        got, ref = _shift_away_from_zero(z, eps), stabilize(z, eps)
        assert got.dtype == ref.dtype and torch.equal(got.view(-1), ref.view(-1)), eps
        assert torch.equal(torch.signbit(got), torch.signbit(ref))
    nan = torch.tensor([float("nan")], dtype=dtype)
    assert torch.isnan(_shift_away_from_zero(nan, 1e-6)).all()
    rule = NonNegativeZPlus(stabilizer=1e-3)
    assert rule.copy()._epsilon == 1e-3 and NonNegativeZPlus(stabilizer=lambda t: t).copy()._epsilon is None


def test_nonnegative_zplus_skips_the_zero_term_and_keeps_both_for_negative_inputs():
    """One modified pass for an input >= 0 (two for ZPlus); an input with a negative entry takes
    ZPlus's own two passes, with the same relevance as ZPlus."""
    from zennit.composites import LayerMapComposite

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    calls = {"n": 0}
    plain = conv._conv_forward

    def counted(*args):  # every convolution, the module's own forward and the rule's passes
        calls["n"] += 1
        return plain(*args)

    conv._conv_forward = counted

    def relevance(rule, x):
        calls["n"] = 0
        comp = LayerMapComposite([(torch.nn.Conv2d, rule)])
        x = x.clone().requires_grad_()
        with comp.context(conv) as m:
            out = m(x)
            (g,) = torch.autograd.grad(out, x, torch.ones_like(out))
        return g, calls["n"]

    pos = torch.rand(2, 3, 5, 5)
    mixed = torch.randn(2, 3, 5, 5)
    g_fast, n_fast = relevance(NonNegativeZPlus(), pos)
    g_ref, n_ref = relevance(ZPlus(), pos)
    assert torch.equal(g_fast, g_ref) and (n_fast, n_ref) == (2, 3)  # the forward itself + its passes
    g_fast, n_fast = relevance(NonNegativeZPlus(), mixed)
    g_ref, n_ref = relevance(ZPlus(), mixed)
    assert torch.equal(g_fast, g_ref) and n_fast == n_ref == 3


def test_set_memory_format_converts_the_conv_weights_and_refuses_unknown_formats(tiny_vgg):
    model = set_memory_format(copy.deepcopy(tiny_vgg), "channels_last")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not convs[1].weight.is_contiguous()
    set_memory_format(model, "contiguous")
    assert all(c.weight.is_contiguous() for c in convs)
    x = _normalised()
    # the layout changes the kernels, not the function: same logits up to float rounding
    torch.testing.assert_close(set_memory_format(model, "channels_last")(x), tiny_vgg(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(CNPError, match="memory_format must be one of"):
        set_memory_format(model, "nhwc")


def test_precision_resolves_by_the_device(monkeypatch):
    monkeypatch.setattr(runtime, "bf16_native", lambda device: True)
    # auto and bf16: bf16 wherever native (CUDA, a CPU with AVX512-BF16 or AMX); fp32: everywhere
    assert [resolve_precision(p, "cpu") for p in ("auto", "bf16", "fp32")] == ["bf16", "bf16", "fp32"]
    assert [resolve_precision(p, "cuda") for p in ("auto", "bf16", "fp32")] == ["bf16", "bf16", "fp32"]
    monkeypatch.setattr(runtime, "bf16_native", lambda device: False)  # emulated bf16 is never used
    assert [resolve_precision(p, "cpu") for p in ("auto", "bf16", "fp32")] == ["fp32", "fp32", "fp32"]
    with pytest.raises(CNPError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")
    from cnp.pruning import PruneConfig
    from cnp.pruning.schedule import _bf16

    monkeypatch.setattr(runtime, "bf16_native", lambda device: True)
    assert _bf16(PruneConfig(), "cpu") and _bf16(PruneConfig(precision="bf16"), "cpu")
    assert not _bf16(PruneConfig(precision="fp32"), "cpu")
    assert not _bf16(PruneConfig(precision="bf16", amp=False), "cpu")
    monkeypatch.setattr(runtime, "bf16_native", lambda device: False)
    assert not _bf16(PruneConfig(), "cpu") and not _bf16(PruneConfig(precision="bf16"), "cpu")
    with pytest.raises(CNPError, match="precision must be one of"):
        PruneConfig(precision="half")


def _one_epoch(model, amp: bool) -> torch.Tensor:
    from cnp.data.splits import Split
    from cnp.training import make_optimizer, train_epoch

    model = copy.deepcopy(model)
    imgs = random_images(32, size=32)
    split = Split(imgs, torch.arange(32) % 2, torch.zeros(32, dtype=torch.bool),
                  torch.zeros(32, 32, 32, dtype=torch.bool), name="train")
    opt = make_optimizer(model.parameters(), lr=1e-2)
    train_epoch(model, split, opt, torch.Generator().manual_seed(0), batch_size=32, amp=amp, verbose=False)  # one step
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_amp_trains_in_bf16_autocast_with_the_same_gradient_step(tiny_vgg):
    fp32 = _one_epoch(tiny_vgg, amp=False)
    assert torch.equal(_one_epoch(tiny_vgg, amp=False), fp32)  # deterministic
    bf16 = _one_epoch(tiny_vgg, amp=True)
    assert not torch.equal(bf16, fp32)  # autocast ran: other rounding ...
    init = torch.cat([p.detach().flatten() for p in tiny_vgg.parameters()])
    cos = torch.nn.functional.cosine_similarity(bf16 - init, fp32 - init, dim=0)
    assert cos > 0.95  # ... the same gradient step (0.994 measured on this tiny VGG)


def test_schedule_keeps_channels_last_after_every_removal(tiny_vgg, tiny_pair):
    from cnp.pruning import PruneConfig, run_pruning

    cfg = PruneConfig(step=0.4, target=0.8, epochs_per_step=1, final_epochs=0, rate_of="prunable",
                      protect=(), wm_share_images=0, memory_format="channels_last", amp=False)
    res = run_pruning(tiny_vgg, tiny_pair, "vanilla", cfg, seed=0)
    convs = [m for m in res.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(c.out_channels for c in convs) < sum(m.out_channels for m in tiny_vgg.modules()
                                                      if isinstance(m, torch.nn.Conv2d))
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs if c.in_channels > 1)
    with pytest.raises(CNPError, match="memory_format must be one of"):
        PruneConfig(memory_format="nhwc")


def test_arithmetic_parameters_are_validated_and_keyed(monkeypatch):
    from cnp.pipeline import _stage_key, make_params

    with pytest.raises(CNPError, match="memory_format must be one of"):
        make_params(memory_format="nhwc")
    with pytest.raises(CNPError, match="precision must be one of"):
        make_params(precision="bf16x")
    old = make_params(pair="carton-dugong", seed=0, smoke=True, memory_format="contiguous", precision="fp32")
    monkeypatch.setattr("cnp.pipeline.resolve_precision", lambda precision, device: "bf16" if precision == "bf16" else "fp32")
    new = make_params(pair="carton-dugong", seed=0, smoke=True, precision="bf16")
    fmt = make_params(pair="carton-dugong", seed=0, smoke=True)
    for stage in ("warmup", "augment", "ablate", "prune", "evaluate"):
        assert _stage_key(fmt, stage) != _stage_key(old, stage), stage   # memory_format: every stage
        # precision: only the fine-tunes of the prune stage (and what reads it)
        assert (_stage_key(new, stage) != _stage_key(fmt, stage)) == (stage in ("prune", "evaluate")), stage
    # where precision resolves to fp32 (auto on the CPU, bf16 without native bf16) the key is
    # that of precision="fp32"
    monkeypatch.setattr("cnp.pipeline.resolve_precision", lambda precision, device: "fp32")
    assert _stage_key(new, "prune") == _stage_key(fmt, "prune")


def test_the_bf16_drsa_arithmetic_version_is_keyed(monkeypatch):
    """Where DRSA resolves to bf16, the version of the bf16 path's arithmetic is in the keys from
    the augment stage on (results of an earlier bf16 arithmetic are recomputed); where it resolves
    to fp32, the version is in no key. DRSA checkpoints carry it the same way."""
    from cnp import drsa
    from cnp.pipeline import _stage_key, make_params

    p = make_params(pair="carton-dugong", seed=0, smoke=True)
    for resolved in ("bf16", "fp32"):
        monkeypatch.setattr("cnp.pipeline.drsa_precision", lambda params, device, r=resolved: r)
        monkeypatch.setattr("cnp.pipeline.BF16_ARITHMETIC", 2)
        before = {stage: _stage_key(p, stage) for stage in ("warmup", "augment", "prune")}
        monkeypatch.setattr("cnp.pipeline.BF16_ARITHMETIC", 3)
        after = {stage: _stage_key(p, stage) for stage in ("warmup", "augment", "prune")}
        assert before["warmup"] == after["warmup"]
        for stage in ("augment", "prune"):
            assert (before[stage] != after[stage]) == (resolved == "bf16"), (resolved, stage)
    A = torch.randn(8, 4)
    kw = dict(K=2, steps=3, restarts=1, seed=0, lr=1.0, orth="eigh", ns_iters=5, dtype=torch.float32)
    assert drsa._checkpoint_meta(A, A, None, precision="bf16", **kw)["bf16_arithmetic"] == drsa.BF16_ARITHMETIC
    assert "bf16_arithmetic" not in drsa._checkpoint_meta(A, A, None, precision="fp32", **kw)


def test_tensor_hash_ignores_the_memory_format():
    """A channels_last tensor hashes like its NCHW copy, also a (n, c, 1, 1) weight (which counts
    as contiguous although its last stride is c), and the hash of a plain tensor is unchanged."""
    import hashlib

    from cnp.io import tensor_hash

    for shape in [(64, 3, 1, 1), (8, 4, 3, 3)]:
        w = torch.randn(*shape)
        cl = w.contiguous(memory_format=torch.channels_last)
        assert tensor_hash(cl) == tensor_hash(w) == tensor_hash(w.clone())
    assert tensor_hash(torch.tensor(3)) == tensor_hash(torch.tensor(3))
    assert tensor_hash(torch.tensor(3)) != tensor_hash(torch.tensor(4))
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    ref = hashlib.sha256(str(((2, 3), "torch.float32")).encode() + x.numpy().tobytes()).hexdigest()[:16]
    assert tensor_hash(x) == ref  # the bytes hashed are the values' own, as before


def test_export_of_a_channels_last_model_is_nchw_and_quiet(tmp_path):
    """A pruned model comes out of the schedule in channels_last; its export is NCHW, with no
    warning from torch.export's packaging about the weights' strides."""
    import warnings

    import torchvision

    import cnp

    m = set_memory_format(torchvision.models.resnet18(num_classes=2).eval(), "channels_last")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cnp.export_model(m, tmp_path / "m", image_size=32)
    assert not [w for w in caught if "tensor" in str(w.message).lower()], [str(w.message) for w in caught]
    state = torch.load(next(tmp_path.glob("m*.state.pt")), weights_only=False)
    weights = state["state_dict"] if "state_dict" in state else state
    assert all(v.is_contiguous() and (v.ndim < 4 or v.stride(-1) == 1) for v in weights.values() if torch.is_tensor(v))
