"""Tests of cnp.models: torchvision layout and names, widths, parameter/MAC counts, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnp.io import CNPError, atomic_torch_save
from cnp.models import (
    VGG,
    block_widths_to_conv_widths,
    conv_index,
    count_macs,
    count_params,
    full_vgg16,
    get_layer,
    load_model,
    paper_name,
    qualified_name,
    save_model,
    vgg_from_arch,
)

#: torchvision's VGG-16 (1000 classes): parameters and multiply-accumulates at 224 px.
VGG16_PARAMS = 138_357_544
# convs: 15,346,630,656 MACs (sum over layers of H*W*Cin*Cout*9); fc: 25088*4096 + 4096*4096
# + 4096*1000 = 123,633,664 MACs.
VGG16_MACS_224 = 15_470_264_320


def test_block_widths_expand_to_13_convs():
    assert block_widths_to_conv_widths((64, 128, 256, 512, 512)) == (
        [64] * 2 + [128] * 2 + [256] * 3 + [512] * 3 + [512] * 3)
    assert block_widths_to_conv_widths((4, 8, 8, 16, 16)) == [4, 4, 8, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16]
    with pytest.raises(CNPError, match="5 blocks"):
        block_widths_to_conv_widths((64, 128, 256, 512))


def test_vgg_rejects_bad_widths():
    with pytest.raises(CNPError):
        VGG([8] * 12)
    with pytest.raises(CNPError):
        VGG([8] * 12 + [0])


def test_full_vgg16_has_torchvision_layout():
    """Same state-dict keys and shapes as torchvision's vgg16 (built on the meta device: no memory)."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        ours = full_vgg16(1000)
        theirs = torchvision.models.vgg16(weights=None)
    ours_sd = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_sd = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_sd == theirs_sd
    assert count_params(ours) == VGG16_PARAMS
    # conv4_3 and its ReLU where torchvision has them; ReLUs are not in-place
    assert isinstance(ours.features[21], nn.Conv2d) and ours.features[21].out_channels == 512
    assert isinstance(ours.features[22], nn.ReLU) and not ours.features[22].inplace
    assert all(not m.inplace for m in ours.modules() if isinstance(m, nn.ReLU))


@pytest.mark.parametrize("paper, qualified", [
    ("conv1_1", "features.0"), ("relu1_1", "features.1"), ("pool1", "features.4"),
    ("conv4_3", "features.21"), ("relu4_3", "features.22"), ("pool4", "features.23"),
    ("conv5_1", "features.24"), ("conv5_3", "features.28"), ("pool5", "features.30"),
    ("fc6", "classifier.0"), ("fc8", "classifier.6"), ("avgpool", "avgpool"),
])
def test_layer_names(paper, qualified, tiny_vgg):
    assert qualified_name(paper) == qualified
    assert qualified_name(qualified) == qualified
    assert paper_name(qualified) == paper
    assert get_layer(tiny_vgg, paper) is get_layer(tiny_vgg, qualified)
    assert get_layer(tiny_vgg, paper) is dict(tiny_vgg.named_modules())[qualified]


def test_unknown_layer_names_raise(tiny_vgg):
    for bad in ("conv4_4", "features.99", "relu", ""):
        with pytest.raises(CNPError, match="unknown layer name"):
            qualified_name(bad)
        with pytest.raises(CNPError):
            get_layer(tiny_vgg, bad)
    # a valid VGG name that this model does not have
    with pytest.raises(CNPError, match="does not exist"):
        get_layer(nn.Sequential(nn.Conv2d(3, 4, 3)), "conv4_3")


def test_conv_index(tiny_vgg):
    assert conv_index(tiny_vgg, "conv1_1") == 0
    assert conv_index(tiny_vgg, "conv4_3") == 9
    assert conv_index(tiny_vgg, "features.28") == 12
    assert tiny_vgg.convs[conv_index(tiny_vgg, "conv3_2")] is tiny_vgg.features[12]
    with pytest.raises(CNPError, match="not a convolution"):
        conv_index(tiny_vgg, "relu4_3")


def test_count_params_tiny(tiny_vgg):
    widths, c_in, expected = tiny_vgg.conv_widths, 3, 0
    for w in widths:
        expected += c_in * w * 9 + w
        c_in = w
    expected += (16 * 1 * 1) * 16 + 16 + 16 * 16 + 16 + 16 * 2 + 2
    assert count_params(tiny_vgg) == expected


def test_count_macs_full_vgg16():
    with torch.device("meta"):
        model = full_vgg16(1000)
    assert count_macs(model, 224) == VGG16_MACS_224


@pytest.mark.parametrize("pool_size, size", [(1, 32), (2, 64)])
def test_count_macs_matches_measured_shapes(make_tiny_vgg, pool_size, size):
    """MACs from the real output shapes of every conv / linear layer (forward hooks)."""
    model = make_tiny_vgg(pool_size=pool_size)
    measured = []

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            measured.append(out[0].numel() * mod.in_channels * 9)
        else:
            measured.append(mod.in_features * mod.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    assert count_macs(model, size) == sum(measured)


def test_arch_round_trip(make_tiny_vgg):
    model = make_tiny_vgg(pool_size=2, hidden=12)
    clone = vgg_from_arch(model.arch)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(clone.eval()(x), model(x))
    with pytest.raises(CNPError, match="not a VGG architecture"):
        vgg_from_arch({"conv_widths": [4] * 13, "bogus": 1})


def test_save_load_round_trip(tmp_path, make_tiny_vgg):
    from cnp.pruning.surgery import remove_filters

    model = make_tiny_vgg(bias_std=0.1)
    remove_filters(model, {0: [1], 12: [0, 5]})  # a pruned (non-uniform) architecture
    path = save_model(model, tmp_path / "m.pt", note="hello", step=3)
    loaded, extra = load_model(path)
    assert extra == {"note": "hello", "step": 3}
    assert loaded.conv_widths == model.conv_widths
    assert loaded.arch == model.arch
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_load_model_rejects_other_files(tmp_path):
    atomic_torch_save(tmp_path / "other.pt", {"weights": torch.zeros(2)})
    with pytest.raises(CNPError, match="not a cnp model checkpoint"):
        load_model(tmp_path / "other.pt")


def test_layer_outputs_hooks_once_and_cleans_up(tiny_vgg):
    """layer_outputs yields the layer's output for each batch (the same as running the features up
    to that layer), leaves no hook behind and restores the training flag, also when abandoned."""
    from cnp.models import get_layer, layer_outputs, qualified_name

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)]
    idx = int(qualified_name("relu4_3").split(".")[-1])
    tiny_vgg.train()
    outs = list(layer_outputs(tiny_vgg, "relu4_3", xs))
    assert tiny_vgg.training
    with torch.no_grad():
        want = [tiny_vgg.eval().features[: idx + 1](x) for x in xs]
    assert [tuple(o.shape) for o in outs] == [tuple(w.shape) for w in want]
    assert all(torch.allclose(o, w) for o, w in zip(outs, want))
    assert not get_layer(tiny_vgg, "relu4_3")._forward_hooks
    tiny_vgg.train()
    it = layer_outputs(tiny_vgg, "relu4_3", xs)
    next(it)
    assert not tiny_vgg.training
    it.close()                                   # abandoned after one batch
    assert tiny_vgg.training and not get_layer(tiny_vgg, "relu4_3")._forward_hooks
