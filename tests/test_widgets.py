"""The live ablation explorer and the watermark labeller: logic without a browser, UI headless."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import TINY_D
from fakes import PAPER_WNIDS, make_fake_imagenet

from cnp.data.imagenet import read_label_csv
from cnp.io import CNPError
from cnp.training import predict_logits
from cnp.virtual_layer import insert_virtual_layer
from cnp.widgets import AblationExplorer, WatermarkLabeler, ablation_widget, labeler_widget

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def explorer(make_tiny_vgg, random_U, tiny_pair):
    model = make_tiny_vgg(seed=0)
    vl = insert_virtual_layer(model, random_U(TINY_D, seed=3), 4, layer="relu4_3")
    test = tiny_pair["test"]
    return AblationExplorer(model, vl, test.images[:2], c0w1=test.subset(test.subgroup_index("c0w1")),
                            c1w0=test.subset(test.subgroup_index("c1w0")), mean_images=tiny_pair["drsa"].images)


def test_update_shapes_and_numbers(explorer, tiny_pair):
    r = explorer.update([], "zero")
    n, H = 2, tiny_pair.image_size
    assert r["subspaces"].shape == (n, 4, H, H) and r["overall"].shape == (n, H, H)
    assert r["p_positive"].shape == (n,) and np.all((r["p_positive"] >= 0) & (r["p_positive"] <= 1))
    assert set(r["acc"]) == {"c0w1", "c1w0"} and all(0 <= v <= 1 for v in r["acc"].values())
    # nothing ablated: the virtual layer is the identity, so p(positive) is the plain model's
    with torch.no_grad():
        explorer.vl.enabled = False
        p_plain = predict_logits(explorer.model, explorer.images).softmax(1)[:, 1].numpy()
        explorer.vl.enabled = True
    np.testing.assert_allclose(r["p_positive"], p_plain, atol=1e-5)
    # accuracy matches a direct evaluation of the c0w1 set (label 0)
    c0w1 = tiny_pair["test"].subset(tiny_pair["test"].subgroup_index("c0w1"))
    with torch.no_grad():
        acc = float((predict_logits(explorer.model, c0w1.images).argmax(1) == 0).float().mean())
    assert r["acc"]["c0w1"] == pytest.approx(acc)


def test_ablated_subspace_gets_no_relevance_and_output_changes(explorer):
    base = explorer.update([], "zero")
    r = explorer.update([1], "zero")
    assert r["ablated"] == [1] and r["mode"] == "zero"
    assert np.abs(r["subspaces"][:, 1]).max() == 0.0
    assert np.abs(r["subspaces"][:, 0]).max() > 0
    assert not np.allclose(r["p_positive"], base["p_positive"])
    # the layer really is ablated for the model while the setting is active
    assert explorer.vl.ablated == (1,)


def test_cache_mean_mode_and_errors(explorer):
    first = explorer.update([2], "zero")
    again = explorer.update((2,), "zero")
    assert again["seconds"] == 0.0 and np.array_equal(first["overall"], again["overall"])
    assert not explorer.vl._has_mean
    m = explorer.update([2], "mean")
    assert explorer.vl._has_mean and m["mode"] == "mean"
    assert not np.allclose(m["p_positive"], first["p_positive"])
    with pytest.raises(CNPError, match="keep at least one"):
        explorer.update([0, 1, 2, 3])
    with pytest.raises(CNPError, match="outside"):
        explorer.update([7])
    with pytest.raises(CNPError, match="mode"):
        explorer.update([1], "half")
    rows = explorer.compare([([], "zero"), ([2], "mean")])
    assert [r["K'"] for r in rows] == ["{}", "{2}"] and rows[1]["mode"] == "mean"


def test_explorer_without_eval_sets_and_mean_images(make_tiny_vgg, random_U, tiny_pair):
    model = make_tiny_vgg(seed=1)
    vl = insert_virtual_layer(model, random_U(TINY_D, seed=4), 4, layer="relu4_3")
    ex = AblationExplorer(model, vl, tiny_pair["test"].images[:1])
    r = ex.update([0])
    assert np.isnan(r["acc"]["c0w1"]) and np.isnan(r["acc"]["c1w0"])
    with pytest.raises(CNPError, match="mean_images"):
        ex.update([0], "mean")
    with pytest.raises(CNPError, match="at least one image"):
        AblationExplorer(model, vl, tiny_pair["test"].images[:0])


def test_ablation_widget_headless(explorer, monkeypatch):
    import ipywidgets

    monkeypatch.setenv("CNP_STATIC_WIDGETS", "0")   # the live widget (a sweep would set 1)

    box = ablation_widget(explorer, initial=[3])
    assert isinstance(box, ipywidgets.VBox)
    sliders = [c for c in box.children[0].children if isinstance(c, ipywidgets.FloatSlider)]
    paper, none = [c for c in box.children[1].children if isinstance(c, ipywidgets.Button)]
    status = box.children[2]
    assert [s.value for s in sliders] == [1.0, 1.0, 1.0, 0.0]
    assert "K' = {3}" in status.value
    sliders[0].value = 0.0  # a slide to 0: the callback recomputes with U_0 ablated too
    assert "K' = {0, 3}" in status.value and ((0, 3), "zero", (0.0, 1.0, 1.0, 0.0)) in explorer._cache
    sliders[1].value = 0.5  # an intermediate strength is named in the status line
    assert "K' = {0, 3}, strengths U_1 0.50" in status.value
    none.click()
    assert [s.value for s in sliders] == [1.0] * 4 and "K' = {}" in status.value
    paper.click()           # the paper's binary setting, one click away
    assert [s.value for s in sliders] == [1.0, 1.0, 1.0, 0.0] and "K' = {3}," in status.value
    for s in sliders:
        s.value = 0.0       # all four ablated: the error is shown, nothing raises
    assert "keep at least one" in status.value


def test_status_line_rounds_probabilities(explorer):
    from cnp.widgets import format_status

    res = explorer.update([1], "zero")
    res["p_positive"] = np.array([0.9819999933242798, 0.5], dtype=np.float32)
    line = format_status({**res, "seconds": 0.5})
    assert "p(positive) of the images [0.982, 0.500]" in line and "0.98199" not in line


def test_strengths_in_the_explorer(explorer):
    """Strength 0 equals the binary ablation; strength 1 everywhere equals no ablation."""
    off = explorer.update([2], "zero")
    slid = explorer.update([], "zero", strengths=[1, 1, 0, 1])
    assert np.allclose(off["p_positive"], slid["p_positive"], atol=1e-6)
    assert np.allclose(explorer.update([], "zero")["p_positive"],
                       explorer.update([], "zero", strengths=[1, 1, 1, 1])["p_positive"])
    half = explorer.update([], "zero", strengths=[1, 1, 0.5, 1])
    assert not np.allclose(half["p_positive"], off["p_positive"])
    with pytest.raises(CNPError, match=r"\[0, 1\]"):
        explorer.update([], "zero", strengths=[1, 1, 2, 1])


# ---------------------------------------------------------------------------- labeller
@pytest.fixture
def imagenet_root(tmp_path):
    return make_fake_imagenet(tmp_path / "imagenet", PAPER_WNIDS[:2], n_train=3, n_val=1, size=24)


def test_labeler_writes_the_label_csv_and_resumes(imagenet_root, tmp_path):
    out = tmp_path / "labels" / "carton-dugong.csv"
    lab = WatermarkLabeler.for_pair("carton-dugong", imagenet_root, out_csv=out)
    assert lab.progress() == (0, 8)  # 3 train + 1 val per class
    first = lab.current()
    assert first.startswith("train/") and lab.image_bytes().startswith(PNG_MAGIC)
    lab.label(True)
    lab.label(0)
    skipped = lab.current()
    assert lab.skip() != skipped
    lab.label(1)
    labels = read_label_csv(out, imagenet_root)  # the reader the manifests use accepts it
    assert labels[first] == 1 and len(labels) == 3 and skipped not in labels
    # a new labeller resumes at the first unlabelled file, keeping the labels
    again = WatermarkLabeler.for_pair("carton-dugong", imagenet_root, out_csv=out)
    assert again.current() == skipped and again.progress() == (3, 8)
    assert again.back() == lab.files[1]
    again.label(1)  # relabel
    assert read_label_csv(out, imagenet_root)[lab.files[1]] == 1
    with pytest.raises(CNPError, match="not among"):
        again.label(1, file="train/nope.JPEG")


def test_labeler_done_limit_and_errors(imagenet_root, tmp_path):
    lab = WatermarkLabeler.for_pair("carton-dugong", imagenet_root, out_csv=tmp_path / "l.csv",
                                    splits=("train",), limit=1)
    assert lab.progress() == (0, 2)
    lab.label(1)
    lab.label(0)
    assert lab.done and lab.current() is None and lab.image_bytes() == b""
    with pytest.raises(CNPError, match="every file"):
        lab.label(1)
    with pytest.raises(CNPError, match="no image files"):
        WatermarkLabeler(imagenet_root, [], tmp_path / "x.csv")
    with pytest.raises(CNPError):
        WatermarkLabeler.for_pair("nosuchpair", imagenet_root, out_csv=tmp_path / "x.csv")


def test_labeler_widget_headless_clicks(imagenet_root, tmp_path, monkeypatch):
    import ipywidgets

    monkeypatch.setenv("CNP_STATIC_WIDGETS", "0")

    out = tmp_path / "w.csv"
    lab = WatermarkLabeler.for_pair("carton-dugong", imagenet_root, out_csv=out, splits=("train",))
    box = labeler_widget(lab)
    info, img, buttons = box.children
    assert isinstance(img, ipywidgets.Image) and bytes(img.value).startswith(PNG_MAGIC)
    by_name = {b.description: b for b in buttons.children}
    by_name["watermark"].click()
    by_name["clean"].click()
    by_name["skip"].click()
    by_name["back"].click()
    assert read_label_csv(out, imagenet_root) == {lab.files[0]: 1, lab.files[1]: 0}
    assert "labelled 2 / 6" in info.value and lab.current() == lab.files[2]


def test_static_widgets_in_batch_runs(explorer, imagenet_root, tmp_path, monkeypatch):
    """With CNP_STATIC_WIDGETS (set by the sweep) the widgets become static output: the ablation
    widget is the heatmap figure of its initial setting, the labeller a progress line; unset or
    0, they are ipywidgets."""
    import ipywidgets
    from IPython.display import HTML
    from matplotlib.figure import Figure

    from cnp import sweep
    from cnp.widgets import static_widgets

    lab = WatermarkLabeler.for_pair("carton-dugong", imagenet_root, out_csv=tmp_path / "w.csv", splits=("train",))
    monkeypatch.setenv("CNP_STATIC_WIDGETS", "0")
    assert not static_widgets() and isinstance(ablation_widget(explorer, initial=[3]), ipywidgets.VBox)
    monkeypatch.setenv("CNP_STATIC_WIDGETS", "1")
    fig = ablation_widget(explorer, initial=[1], mode="zero")
    assert isinstance(fig, Figure) and ((1,), "zero", (1.0, 0.0, 1.0, 1.0)) in explorer._cache
    html = labeler_widget(lab)
    assert isinstance(html, HTML) and "labelled 0 / 6" in html.data
    monkeypatch.delenv("CNP_STATIC_WIDGETS")
    monkeypatch.setattr(os, "environ", dict(os.environ))   # _set_thread_env writes several variables
    sweep._set_thread_env(1)      # what every sweep run does before its notebooks
    assert static_widgets()


def test_labeler_lists_a_folder_layout_pair(tmp_path):
    import cnp

    manifest = cnp.example_folder(tmp_path / "pair", smoke=True, image_format="png")
    lab = WatermarkLabeler.for_pair(str(manifest), None, out_csv=tmp_path / "l.csv", limit=3)
    assert lab.progress() == (0, 6)  # 3 files of each class folder
    assert len({f.split("/")[0] for f in lab.files}) == 2 and lab.image_bytes().startswith(PNG_MAGIC)
    lab.label(True)
    assert read_label_csv(tmp_path / "l.csv", manifest.parent)[lab.files[0]] == 1
