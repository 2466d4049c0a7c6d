"""The public API on models other than the paper's VGG: torchvision's vgg16, vgg16_bn, resnet18/50.

Random weights, tiny images (32 px) and a few random images with a planted square "watermark":
these tests check that every stage runs and keeps its guarantees on each architecture (LRP
conservation through canonizers, contexts at a named layer, channel groups removed together,
removal equal to masking, the DRSA layer's channels protected, export without cnp), not what the
method achieves (see the documented runs for that).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from torch import nn

import cnp
from cnp.io import CNPError
from cnp.lrp import LRP, contexts
from cnp.models import count_macs
from cnp.pruning.structure import GraphStructure, VGGStructure, prunable_structure

S = 32
ARCHS = [("vgg16", "features.22"), ("vgg16_bn", "features.32"), ("resnet50", "layer3"), ("resnet18", "layer3")]


def _split(n: int, seed: int) -> cnp.Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 2
    wm = (torch.arange(n) // 2) % 2 == 0
    m = torch.zeros(n, S, S, dtype=torch.bool)
    m[wm, :8, :8] = True
    x[wm, :, :8, :8] = 255
    return cnp.as_split(x, y, wm, m)


@pytest.fixture(scope="module")
def data() -> cnp.PairData:
    return cnp.pair_data(_split(16, 1), _split(8, 2), val=_split(8, 3))


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():  # non-trivial BatchNorm statistics, so that merging them matters
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.uniform_(-0.1, 0.1, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.uniform_(-0.1, 0.1, generator=g)
    return m


def test_public_names_resolve_and_are_documented():
    for name in cnp.__all__:
        obj = getattr(cnp, name)
        if callable(obj):
            assert obj.__doc__ and obj.__doc__.strip(), name
    assert "prune" in dir(cnp) and "warm_up" in cnp.__doc__
    with pytest.raises(AttributeError):
        cnp.no_such_name  # noqa: B018


def test_as_split_from_tensors_dataset_and_loader():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=g)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    wm = torch.tensor([1, 0, 0, 1, 0, 0]).bool()
    a = cnp.as_split(x, y, wm)
    ds = torch.utils.data.TensorDataset(x, y, wm)
    b = cnp.as_split(ds)
    c = cnp.as_split(torch.utils.data.DataLoader(ds, batch_size=4))
    d = cnp.as_split([{"image": x[i], "label": int(y[i]), "watermark": bool(wm[i])} for i in range(6)])
    for s in (b, c, d):
        assert torch.equal(s.images, a.images) and torch.equal(s.labels, a.labels) and torch.equal(s.wm, a.wm)
    assert a.images.dtype == torch.uint8 and not a.meta["masks_known"]
    with pytest.raises(CNPError, match="unnormalised"):
        cnp.as_split((x - 0.5) / 0.2, y)
    with pytest.raises(CNPError, match="labels must be 0"):
        cnp.as_split(x, y + 1)
    with pytest.raises(CNPError, match="5 labels for 6 images"):
        cnp.as_split(x, y[:5])
    with pytest.raises(CNPError, match="same image size"):
        cnp.pair_data(a, cnp.as_split(torch.rand(2, 3, 4, 4), torch.tensor([0, 1])))


@pytest.mark.parametrize("name,layer", ARCHS)
def test_lrp_conserves_and_gives_contexts_at_a_named_layer(name, layer):
    m = _model(name)
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = m(x)
    out = LRP(m).attribute(x, 1, filters=True)
    a, c, att = contexts(m, x, layer)
    tol = 1e-3 * float(out.target_logit.abs().max()) + 1e-5
    assert torch.allclose(out.input_relevance.sum((1, 2, 3)), out.target_logit, atol=tol)
    # the relevance arriving at the layer, a * c, sums to the logit: contexts reached it through
    # every branch that reads it (a ResNet stage output feeds conv1 and the downsample conv)
    assert torch.allclose((a * c).sum((1, 2, 3)), att.target_logit, atol=tol)
    assert set(out.filter_relevance) == {n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)}
    with torch.no_grad():  # canonizers are reverted after the pass
        assert torch.equal(m(x), before)


def test_a_layer_read_by_a_residual_skip_is_refused():
    m = _model("resnet18")
    with pytest.raises(CNPError, match="residual skip"):
        contexts(m, torch.randn(1, 3, S, S), "layer3.0")
    with pytest.raises(CNPError, match="unknown layer name"):
        contexts(m, torch.randn(1, 3, S, S), "relu4_3")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg11_bn"])
def test_removal_equals_masking_and_groups_are_coupled(name):
    m = _model(name)
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    sa, sb = prunable_structure(a, S), prunable_structure(b, S)
    assert isinstance(sa, GraphStructure)
    g = torch.Generator().manual_seed(0)
    chosen = {gi: torch.randperm(w, generator=g)[: w // 3] for gi, w in enumerate(sa.widths) if gi % 2 == 0}
    sa.mask(chosen)
    sb.remove(chosen)
    x = torch.randn(2, 3, S, S, generator=g)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert torch.allclose(ya, yb, atol=1e-4 * float(ya.abs().max()) + 1e-6)
    assert sb.widths == [w - len(chosen.get(i, ())) for i, w in enumerate(sa.widths)]
    if name.startswith("resnet"):
        # a stage's residual channels are one group: its conv2/conv3 outputs and the downsample conv
        stage = sa.members[sa.group_of("layer3")]
        assert any("downsample" in n for n in stage) and len(stage) >= 3
    # the pruned model is rebuilt from the recorded widths (resuming a schedule)
    r = sb.rebuild(sb.arch, _model(name), torch.zeros(1, 3, S, S))
    r.load_state_dict(b.state_dict())
    with torch.no_grad():
        assert torch.equal(r(x), yb)


def test_torch_pruning_removal_equals_the_vgg_surgery(tiny_vgg):
    from cnp.pruning.surgery import remove_filters

    a, b = copy.deepcopy(tiny_vgg), copy.deepcopy(tiny_vgg)
    sb = VGGStructure(b, 32)
    g = torch.Generator().manual_seed(3)
    chosen = {ci: torch.randperm(w, generator=g)[: w // 4] for ci, w in enumerate(sb.widths) if ci != 9}
    remove_filters(a, chosen)
    sb.remove(chosen)
    assert a.arch == b.arch
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("name,layer", ARCHS[:3])
def test_the_pipeline_runs_on_torchvision_architectures(name, layer, data, tmp_path):
    warnings.filterwarnings("ignore", category=UserWarning)
    warm = cnp.warm_up(_model(name), data, epochs=1, verbose=False).model
    assert warm(torch.zeros(1, 3, S, S)).shape == (1, 2)
    fit = cnp.fit_concepts(warm, data["drsa"], K=4, layer=layer, steps=2, restarts=1, n_positions=4, verbose=False)
    vl = cnp.insert_virtual_layer(warm, fit.U, 4, layer=layer)
    scores = cnp.concept_relevance(warm, vl, data["val"].positives())
    assert scores.shape == (int((data["val"].labels == 1).sum()), 4)
    vl.set_ablation([0])
    state = vl.state()
    cnp.remove_virtual_layer(warm)
    D = fit.U.shape[0]
    res = cnp.prune(warm, data, "cnp", layer=layer, concept_state=state, target=0.1, step=0.1, epochs_per_step=1,
                    final_epochs=0, wm_share_images=4, verbose=False, run_dir=tmp_path)
    filters = [e["filters"] for e in res.curve]
    assert filters[1] < filters[0] and res.curve[-1]["macs"] < res.curve[0]["macs"]
    assert set(res.curve[-1]["acc"]) >= {"overall", "c0w0", "c0w1", "c1w0", "c1w1"}
    # the channels feeding the DRSA layer were not pruned: the subspaces still fit
    a, _, _ = contexts(res.model, torch.zeros(1, 3, S, S), layer)
    assert a.shape[1] == D
    # resuming the finished schedule returns the same numbers
    again = cnp.prune(warm, data, "cnp", layer=layer, concept_state=state, target=0.1, step=0.1, epochs_per_step=1,
                      final_epochs=0, wm_share_images=4, verbose=False, run_dir=tmp_path)
    assert again.curve == res.curve
    with torch.no_grad():
        x = torch.randn(2, 3, S, S)
        assert torch.equal(again.model(x), res.model(x))


_LOAD_WITHOUT_CNP = """
import builtins, sys
real = builtins.__import__
def guard(name, *a, **k):
    if name == "cnp" or name.startswith(("cnp.", "torchvision")):
        raise ImportError("blocked " + name)
    return real(name, *a, **k)
builtins.__import__ = guard
import torch
m = torch.export.load(sys.argv[1]).module()
x = torch.load(sys.argv[2])
torch.save(m(x), sys.argv[3])
"""


def test_export_loads_without_cnp_and_keeps_the_kept_ablation(tiny_vgg, random_U, tmp_path):
    from cnp.virtual_layer import insert_virtual_layer, keep_ablation, remove_virtual_layer

    model = copy.deepcopy(tiny_vgg)
    insert_virtual_layer(model, random_U(16), 4, ablated=[1])
    keep_ablation(model)
    remove_virtual_layer(model)
    out = cnp.export_model(model, tmp_path / "net", image_size=32)
    info = cnp.read_export_info(tmp_path / "net")
    assert info["kept_ablation"] and info["macs_concept_correction"] > 0
    assert info["macs"] == count_macs(model, 32) + info["macs_concept_correction"]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "load.py"
    script.write_text(_LOAD_WITHOUT_CNP)
    subprocess.run([sys.executable, str(script), str(out["program"]), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(torch.load(tmp_path / "y.pt"), expected, atol=1e-5)
    assert torch.allclose(cnp.load_exported(out["program"])(x[:1]), expected[:1], atol=1e-5)
    blob = torch.load(out["state"], weights_only=True)
    assert blob["arch"] == model.arch and set(blob["state_dict"]) == set(model.state_dict())
    assert not list(tmp_path.glob("*.tmp*"))


def test_torchvision_weights_by_enum_name_or_file_offline(tmp_path, monkeypatch):
    from torchvision.models import ResNet18_Weights

    from cnp.models import load_torchvision_model

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(CNPError, match="allow_download=True"):
        load_torchvision_model("resnet18", "IMAGENET1K_V1")
    with pytest.raises(CNPError, match="unknown weights 'NOPE'.*IMAGENET1K_V1"):
        load_torchvision_model("resnet18", "NOPE")
    with pytest.raises(CNPError, match="unknown torchvision classification model"):
        load_torchvision_model("resnet19")
    # a file in the hub cache under torchvision's name must carry torchvision's hash prefix
    fake = _model("resnet18")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    with pytest.raises(CNPError, match="SHA-256"):
        load_torchvision_model("resnet18", ResNet18_Weights.IMAGENET1K_V1)
    # your own weights file
    torch.save(fake.state_dict(), tmp_path / "mine.pt")
    mine = load_torchvision_model("resnet18", weights_path=tmp_path / "mine.pt", num_classes=10)
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), fake.state_dict().values()))
    with pytest.raises(CNPError, match="does not hold resnet18 weights"):
        load_torchvision_model("resnet18", weights_path=tmp_path / "mine.pt")  # 1000 classes: head mismatch


@pytest.mark.slow
def test_resnet18_pretrained_on_the_embedded_corpus_runs_the_whole_pipeline(tmp_path):
    """Smoke size: ResNet-18 pretrained on the corpus, DRSA at layer3, ablation, ranking,
    Torch-Pruning removal, fine-tuning and evaluation, through the notebooks' pipeline."""
    from cnp.pipeline import make_params, open_run, run_all, warm_model

    m = run_all(verbose=False, arch="resnet18", layer="layer3", smoke=True, run_dir=str(tmp_path / "run"), K=4)
    assert m["params"]["arch"] == "resnet18" and m["drsa"]["layer"] == "layer3" and m["drsa"]["d_k"] == 64
    for method in ("cnp", "vanilla"):
        curve = m["curves"][method]
        assert curve[-1]["filters"] < curve[0]["filters"] and curve[-1]["macs"] < curve[0]["macs"]
        assert set(curve[-1]["acc"]) >= {"c0w0", "c0w1", "c1w0", "c1w1", "overall"}
    assert len(m["drsa"]["ablated"]) == 1
    warm = warm_model(open_run(make_params(arch="resnet18", layer="layer3", smoke=True,
                                           run_dir=str(tmp_path / "run"), K=4)))
    assert isinstance(warm, torchvision.models.ResNet) and warm.fc.out_features == 2


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path, monkeypatch):
    """The README's API example, on the embedded benchmark exported as a folder (smoke sizes) with a
    random ResNet-18 in place of the ImageNet weights, and shorter DRSA and schedule settings."""
    import re
    from pathlib import Path

    from cnp.models import tag_torchvision

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(import cnp\n.*?)```", text, re.S).group(1)
    assert "cnp.prune(" in block and "cnp.export_model(" in block
    cnp.example_folder(tmp_path / "my_pair", smoke=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cnp, "backbone", lambda arch, **kw: tag_torchvision(_model("resnet18"), "resnet18"))
    block = block.replace('K=4, layer="layer3")', 'K=4, layer="layer3", steps=3, restarts=1, n_positions=4, verbose=False)', 1)
    block = block.replace('concept_state=state)', 'concept_state=state, target=0.4, step=0.4, epochs_per_step=1, '
                                                  'final_epochs=0, wm_share_images=4, verbose=False)')
    block = block.replace("cnp.warm_up(model, data)", "cnp.warm_up(model, data, epochs=1, verbose=False)")
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    assert set(scope["runs"]) == {"cnp", "vanilla"}
    assert (tmp_path / "pruned.pt2").is_file() and (tmp_path / "pruned.json").is_file()
