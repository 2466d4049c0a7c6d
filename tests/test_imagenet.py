"""The ImageNet path on a fake ImageNet folder: manifests, splits, cache, labels, bad input, weights."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import make_fake_imagenet, make_fake_vgg16_weights
from netguard import refuse_in_process

import cnp.data.imagenet as imn
from cnp.data.splits import SUBGROUPS, PairData
from cnp.data.watermark import WatermarkStyle
from cnp.io import CNPError
from cnp.models import load_torchvision_vgg16

CARTON, DUGONG = "n02971356", "n02074367"
SIZES = {"train": 12, "drsa": 8, "rank": 4, "val": 3, "test": 3}
IMG = 32


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    """Any attempt to open a network connection fails the test; caches stay in tmp_path."""
    refuse_in_process(monkeypatch)
    monkeypatch.setenv("CNP_PROGRESS", "0")
    monkeypatch.setenv("CNP_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    return make_fake_imagenet(root, [CARTON, DUGONG], n_train=30, n_val=4, size=40, seed=1)


def build(root, tmp_path, seed=0, **kw):
    kw.setdefault("sizes", SIZES)
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("image_size", IMG)
    kw.setdefault("overlay", "cnp")
    kw.setdefault("progress", False)
    return imn.build_pair("carton-dugong", root, seed, **kw)


def files(split) -> list[str]:
    return list(split.meta["files"])


# ------------------------------------------------------------------------ manifests
@pytest.mark.parametrize("pair, pos, neg", [
    ("carton-dugong", ("carton", CARTON, 478), ("dugong", DUGONG, 149)),
    ("crate-packet", ("crate", "n03127925", 519), ("packet", "n03871628", 692)),
    ("basketball", ("basketball", "n02802426", 430), ("dugong", DUGONG, 149)),
])
def test_packaged_manifests(pair, pos, neg):
    man = imn.load_manifest(pair)
    assert man.pair == pair and pair in imn.known_pairs()
    assert (man.positive.name, man.positive.wnid, man.positive.index) == pos
    assert (man.negative.name, man.negative.wnid, man.negative.index) == neg
    assert man.sizes == {"train": 650, "drsa": 500, "rank": 500, "val": 150, "test": 150}
    assert (man.resize, man.crop) == (256, 224)
    assert man.path == (imn.MANIFEST_DIR / f"{pair}.json").resolve()
    # an explicit path works too
    assert imn.load_manifest(man.path).raw == man.raw


def test_unknown_pair_lists_known_pairs(tmp_path):
    with pytest.raises(CNPError, match="unknown pair 'cat-dog'.*carton-dugong.*crate-packet"):
        imn.load_manifest("cat-dog")
    with pytest.raises(CNPError, match="unknown pair"):
        imn.build_pair("cat-dog", tmp_path)


def test_bad_manifest_fields(tmp_path):
    raw = json.loads((imn.MANIFEST_DIR / "carton-dugong.json").read_text())
    bad = dict(raw, positive={"name": "carton", "wnid": "2971356", "index": 478})
    with pytest.raises(CNPError, match="wnid"):
        imn.manifest_from_dict(bad)
    bad = dict(raw, selection={"rule": "something-else"})
    with pytest.raises(CNPError, match="selection.rule"):
        imn.manifest_from_dict(bad)
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(CNPError, match="could not read the manifest"):
        imn.load_manifest(p)


def test_manifest_schema_2_fields(tmp_path):
    raw = json.loads((imn.MANIFEST_DIR / "carton-dugong.json").read_text())
    assert raw["schema"] == 1 and imn.manifest_from_dict(raw).layout == "imagenet"   # schema 1 still reads
    no_index = dict(raw, schema=2, positive={"name": "carton", "wnid": CARTON})
    assert imn.manifest_from_dict(no_index).positive.index is None                  # the index is optional
    folder = dict(raw, schema=2, layout="folder", pair="cats-dogs",
                  positive={"name": "cat", "folder": "cats"}, negative={"name": "dog", "folder": "dogs"},
                  watermark={"masks": "beside"}, root=".", splits="splits.csv", extra_masks={"ball": "m_ball"})
    man = imn.manifest_from_dict(folder, tmp_path / "cats-dogs.json")
    assert (man.positive.key, man.positive.wnid, man.masks, man.mask_dir()) == ("cats", None, "beside", "beside")
    assert man.root_dir() == tmp_path.resolve() and man.splits_file() == (tmp_path / "splits.csv").resolve()
    assert man.extra_mask_dirs() == {"ball": (tmp_path / "m_ball").resolve()}
    for bad, pattern in [
        (dict(folder, positive={"name": "cat"}), "'positive.folder' must name the class's folder"),
        (dict(folder, positive={"name": "cat", "folder": "../x"}), "'positive.folder'"),
        (dict(raw, positive={"name": "carton", "wnid": CARTON, "folder": "cartons"}), "must equal the wnid"),
        (dict(raw, layout="flat"), "'layout' must be one of"),
        (dict(raw, pair="a/b"), "'pair' 'a/b' must be a name without '/'"),
        (dict(raw, schema=3), "reads schemas 1, 2"),
        (dict(folder, watermark={"masks": "beside", "mask_suffix": ".png"}), "cannot tell masks beside the images"),
    ]:
        with pytest.raises(CNPError, match=pattern):
            imn.manifest_from_dict(bad)
    for key, value in (("root", "../up"), ("splits", "/abs/splits.csv")):
        escaping = imn.manifest_from_dict(dict(folder, **{key: value}), tmp_path / "cats-dogs.json")
        with pytest.raises(CNPError, match=r"'\.\.'|absolute"):
            escaping.root_dir() if key == "root" else escaping.splits_file()


def test_manifest_path_as_pair(fake_root, tmp_path):
    raw = json.loads((imn.MANIFEST_DIR / "carton-dugong.json").read_text())
    path = tmp_path / "any-name.json"
    path.write_text(json.dumps(dict(raw, pair="my-carton-dugong")))
    assert imn.is_manifest_path(str(path)) and not imn.is_manifest_path("carton-dugong")
    data = imn.build_pair(str(path), fake_root, sizes=SIZES, cache_dir=tmp_path / "c", image_size=IMG,
                          overlay="cnp", progress=False)
    assert data.pair == "my-carton-dugong" and data.meta["manifest_path"] == str(path.resolve())


def test_packaged_pair_selection_is_pinned(fake_root, tmp_path):
    """The split selection of a packaged pair never changes (the files of every split, hashed)."""
    import hashlib

    data = build(fake_root, tmp_path)
    got = {k: files(s) for k, s in data.splits.items()}
    digest = hashlib.sha256(json.dumps(got, sort_keys=True).encode()).hexdigest()[:16]
    assert digest == "8e05be8553b4b0ac", got
    assert "masks" not in data.meta["manifest"]["watermark"] and data.meta["n_masks"] == 0


# ------------------------------------------------------------------------ splits
def test_splits_sizes_balance_and_disjointness(fake_root, tmp_path):
    data = build(fake_root, tmp_path)
    assert isinstance(data, PairData) and set(data.splits) == {"train", "drsa", "rank", "val", "test"}
    assert (data.positive, data.negative) == ("carton", "dugong")
    assert data.meta["classes"]["positive"]["index"] == 478
    tr, drsa, rank, val, test = (data[k] for k in ("train", "drsa", "rank", "val", "test"))
    for s in data.splits.values():
        assert s.images.dtype == torch.uint8 and s.images.shape[1:] == (3, IMG, IMG)
        assert len(files(s)) == len(s)
    assert len(tr) == 24 and int(tr.labels.sum()) == 12
    assert not tr.wm.any()  # no labels, no overlay rates: natural (unknown) distribution
    assert val.counts() == {g: 3 for g in SUBGROUPS}
    assert test.counts() == {g: 3 for g in SUBGROUPS}
    # every image of train, val and test is a different file
    all_files = files(tr) + files(val) + files(test)
    assert len(set(all_files)) == len(all_files)
    # drsa and rank: positives of train, disjoint when drsa + rank <= train positives
    pos_train = {f for f, y in zip(files(tr), tr.labels.tolist()) if y == 1}
    assert len(drsa) == 8 and len(rank) == 8
    assert bool((drsa.labels == 1).all())
    # rank: 4 positives first, then 4 train negatives (for ranking_data='pos+neg')
    assert rank.labels.tolist() == [1] * 4 + [0] * 4
    neg_train = {f for f, y in zip(files(tr), tr.labels.tolist()) if y == 0}
    assert set(files(drsa)) <= pos_train and set(files(rank)[:4]) <= pos_train
    assert set(files(rank)[4:]) <= neg_train and len(set(files(rank))) == 8
    assert not set(files(drsa)) & set(files(rank))
    assert torch.equal(drsa.images, tr.images[drsa.meta["train_index"]])
    # classes come from their own folders
    for s in (tr, val, test):
        for f, y in zip(files(s), s.labels.tolist()):
            assert f.split("/")[1] == (CARTON if y == 1 else DUGONG)
    # the official val images are used (test first)
    assert any(f.startswith("val/") for f in files(test))
    # overlaid w1 images have masks, w0 images none
    for s in (val, test):
        assert s.meta["masks_known"] is True
        assert bool((s.masks.flatten(1).any(1) == s.wm).all())
        assert s.meta["overlaid"] == s.wm.tolist()


def test_drsa_rank_overlap_minimal_when_data_short(fake_root, tmp_path):
    data = build(fake_root, tmp_path, sizes=dict(SIZES, drsa=8, rank=8))
    overlap = set(files(data["drsa"])) & set(files(data["rank"]))
    assert len(overlap) == 8 + 8 - 12


def test_deterministic_per_seed(fake_root, tmp_path):
    a = build(fake_root, tmp_path, seed=3, cache_dir=tmp_path / "a")
    b = build(fake_root, tmp_path, seed=3, cache_dir=tmp_path / "b")
    for k in a.splits:
        assert files(a[k]) == files(b[k])
        assert a[k].fingerprint() == b[k].fingerprint()
        assert torch.equal(a[k].masks, b[k].masks)
    c = build(fake_root, tmp_path, seed=4, cache_dir=tmp_path / "a")
    assert set(files(c["train"])) != set(files(a["train"]))
    assert c.meta["cache_file"] != a.meta["cache_file"]


def test_preprocessing_matches_torchvision(fake_root):
    from PIL import Image
    from torchvision import transforms

    path = fake_root / "train" / CARTON / f"{CARTON}_1.JPEG"
    ours = imn.decode_image(path, image_size=32, resize=37)
    tv = transforms.Compose([transforms.Resize(37), transforms.CenterCrop(32), transforms.PILToTensor()])
    with Image.open(path) as im:
        ref = tv(im.convert("RGB"))
    assert ours.dtype == torch.uint8 and torch.equal(ours, ref)


# ------------------------------------------------------------------------ cache
def test_cache_hit_and_corrupt_cache_rebuilt(fake_root, tmp_path, monkeypatch, capsys):
    first = build(fake_root, tmp_path)
    cache_file = Path(first.meta["cache_file"])
    assert cache_file.is_file() and cache_file.parent == tmp_path / "cache"
    assert "carton-dugong" in cache_file.name

    def no_decode(*a, **k):
        raise AssertionError("decoded although the cache should have been used")

    with monkeypatch.context() as m:
        m.setattr(imn, "decode_image", no_decode)
        again = build(fake_root, tmp_path)
    assert all(again[k].fingerprint() == first[k].fingerprint() for k in first.splits)

    cache_file.write_bytes(cache_file.read_bytes()[:1000])  # truncated
    rebuilt = build(fake_root, tmp_path)
    assert "rebuilding" in capsys.readouterr().out
    assert all(rebuilt[k].fingerprint() == first[k].fingerprint() for k in first.splits)
    PairData.load(cache_file)  # the rebuilt cache is sound


def test_cache_dir_from_env(fake_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CNP_CACHE", str(tmp_path / "envcache"))
    assert imn.default_cache_dir() == tmp_path / "envcache" / "imagenet"
    data = build(fake_root, tmp_path, cache_dir=None)
    assert Path(data.meta["cache_file"]).parent == tmp_path / "envcache" / "imagenet"


# ------------------------------------------------------------------------ watermarks
def test_label_csv_honoured(fake_root, tmp_path):
    base = build(fake_root, tmp_path)
    # label two held-out positives (official val images) and one train image as watermarked
    held = sorted(f for f in (fake_root / "val" / CARTON).iterdir())
    wm_files = [f"val/{CARTON}/{p.name}" for p in held[:2]]
    train_file = files(base["train"])[0]
    rows = {f: 1 for f in wm_files} | {train_file: 1, f"val/{DUGONG}/" + sorted(
        p.name for p in (fake_root / "val" / DUGONG).iterdir())[0]: 0}
    csv_path = imn.write_label_csv(tmp_path / "labels.csv", rows, root=fake_root)
    data = build(fake_root, tmp_path, label_csv=csv_path)
    assert data.meta["label_csv_sha256"] and data.meta["cache_key"] != base.meta["cache_key"]
    val, test, tr = data["val"], data["test"], data["train"]
    natural = {}
    for s in (val, test):
        for i, f in enumerate(files(s)):
            if f in wm_files:
                natural[f] = (s.name, bool(s.wm[i]), s.meta["wm_source"][i], bool(s.masks[i].any()))
        assert s.counts() == {g: 3 for g in SUBGROUPS}
    # both labelled images are used as natural c1w1 images, one in test and one in val
    assert set(natural) == set(wm_files)
    assert sorted(v[0] for v in natural.values()) == ["test", "val"]
    assert all(v[1] and v[2] == "csv" and not v[3] for v in natural.values())
    assert val.meta["masks_known"] is False and test.meta["masks_known"] is False
    i = files(tr).index(train_file)
    assert bool(tr.wm[i]) and tr.meta["wm_source"][i] == "csv" and not tr.masks[i].any()


def test_manifest_label_csv_used_when_present(fake_root, tmp_path):
    raw = json.loads((imn.MANIFEST_DIR / "carton-dugong.json").read_text())
    raw["watermark"]["label_csv"] = "labels/mine.csv"
    man_path = tmp_path / "man" / "carton-dugong.json"
    man_path.parent.mkdir()
    man_path.write_text(json.dumps(raw))
    without = build(fake_root, tmp_path, manifest=man_path)
    assert without.meta["label_csv"] is None
    f = files(without["train"])[0]
    imn.write_label_csv(man_path.parent / "labels" / "mine.csv", [(f, 1)], root=fake_root)
    with_csv = build(fake_root, tmp_path, manifest=man_path)
    assert with_csv.meta["label_csv"] == str((man_path.parent / "labels" / "mine.csv").resolve())
    tr = with_csv["train"]
    assert bool(tr.wm[files(tr).index(f)])


def test_train_overlay_rates(fake_root, tmp_path):
    data = build(fake_root, tmp_path, train_overlay_rates=(1.0, 0.0))
    tr = data["train"]
    assert bool(tr.wm[tr.labels == 1].all()) and not tr.wm[tr.labels == 0].any()
    assert bool(tr.masks[tr.labels == 1].flatten(1).any(1).all())
    assert data["drsa"].wm.all() and data["drsa"].meta["masks_known"]
    half = build(fake_root, tmp_path, train_overlay_rates=(0.5, 0.25))["train"]
    assert int(half.wm[half.labels == 1].sum()) == 6 and int(half.wm[half.labels == 0].sum()) == 3
    # the overlay changes the image under the mask; outside it only faint anti-aliased edges
    # (alpha below the mask threshold of 0.1 x opacity) differ
    plain = build(fake_root, tmp_path)["train"]
    i = int(torch.nonzero(half.wm)[0])
    j = files(plain).index(files(half)[i])
    diff = (half.images[i].int() - plain.images[j].int()).abs().amax(0)
    assert int(diff[half.masks[i]].max()) > 20
    assert int(diff[~half.masks[i]].max()) <= 0.1 * 0.5 * 255 + 1


@pytest.mark.parametrize("rates", [(1.5, 0.0), (0.1, -0.2), (float("nan"), 0.0), (0.5,), "ab"])
def test_bad_overlay_rates(fake_root, tmp_path, rates):
    with pytest.raises(CNPError, match="train_overlay_rates"):
        build(fake_root, tmp_path, train_overlay_rates=rates)


def test_style_forces_cnp_overlay_and_enters_cache_key(fake_root, tmp_path):
    a = build(fake_root, tmp_path, overlay=None, style=WatermarkStyle(wm_text="AB", wm_placement="fixed"))
    b = build(fake_root, tmp_path, overlay=None, style={"wm_text": "XYZ", "wm_placement": "fixed"})
    assert a.meta["overlay"] == b.meta["overlay"] == "cnp"
    assert a.meta["cache_key"] != b.meta["cache_key"]
    assert a["test"].fingerprint() != b["test"].fingerprint()


def test_imagenet_w_adapter(fake_root, tmp_path, monkeypatch):
    class AddWatermark:  # the imagenet-w API: AddWatermark(image_size)(float (3, S, S)) -> same
        def __init__(self, image_size=224):
            self.opacity = 0.5
            self.size = image_size

        def __call__(self, image):
            out = image.clone()
            out[:, 4:8, 2:20] = out[:, 4:8, 2:20] * 0.5 + 0.5
            return out

    monkeypatch.setitem(sys.modules, "imagenet_w", types.SimpleNamespace(AddWatermark=AddWatermark))
    monkeypatch.setattr(imn, "imagenet_w_available", lambda: True)
    data = build(fake_root, tmp_path, overlay="auto")
    assert data.meta["overlay"] == "imagenet-w"
    test = data["test"]
    expect = torch.zeros(IMG, IMG, dtype=torch.bool)
    expect[4:8, 2:20] = True
    assert all(torch.equal(test.masks[i], expect) for i in torch.nonzero(test.wm).flatten().tolist())
    assert not test.masks[~test.wm].any()


def test_imagenet_w_missing(fake_root, tmp_path, monkeypatch):
    monkeypatch.setattr(imn, "imagenet_w_available", lambda: False)
    with pytest.raises(CNPError, match="pip install imagenet-w"):
        build(fake_root, tmp_path, overlay="imagenet-w")
    assert build(fake_root, tmp_path, overlay="auto").meta["overlay"] == "cnp"


# ------------------------------------------------------------------------ label CSV
def test_label_csv_roundtrip(fake_root, tmp_path):
    rows = [(f"train/{CARTON}/{CARTON}_2.JPEG", 1), (f"./train/{CARTON}/{CARTON}_1.JPEG", "0"),
            {"file": f"val/{DUGONG}/" + sorted(os.listdir(fake_root / "val" / DUGONG))[0], "watermark": True}]
    p = imn.write_label_csv(tmp_path / "sub" / "l.csv", rows, root=fake_root)
    text = p.read_text()
    assert text.splitlines()[0] == "file,watermark"
    assert text.splitlines()[1] == f"train/{CARTON}/{CARTON}_1.JPEG,0"  # sorted, normalised
    labels = imn.read_label_csv(p, fake_root)
    assert labels[f"train/{CARTON}/{CARTON}_2.JPEG"] == 1 and len(labels) == 3
    # a byte-order mark and extra columns are accepted
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbffile,watermark,note\n" + f"train/{CARTON}/{CARTON}_3.JPEG,1,x\n".encode())
    assert imn.read_label_csv(bom, fake_root) == {f"train/{CARTON}/{CARTON}_3.JPEG": 1}


def test_label_csv_path_escapes_rejected(fake_root, tmp_path):
    outside = tmp_path / "secret.JPEG"
    outside.write_bytes(b"x")
    link = fake_root / "train" / CARTON / "zz_link.JPEG"
    link.symlink_to(outside)
    try:
        for bad, pattern in [(str(outside), "absolute"), (f"train/{CARTON}/../../../secret.JPEG", r"'\.\.'"),
                             (f"train/{CARTON}/zz_link.JPEG", "outside")]:
            p = tmp_path / "bad.csv"
            p.write_text(f"file,watermark\n{bad},1\n")
            with pytest.raises(CNPError, match=pattern):
                imn.read_label_csv(p, fake_root)
            with pytest.raises(CNPError, match=pattern):
                imn.write_label_csv(tmp_path / "w.csv", [(bad, 1)], root=fake_root)
        with pytest.raises(CNPError, match="absolute"):
            imn.write_label_csv(tmp_path / "w.csv", {"/etc/passwd": 1})
    finally:
        link.unlink()


@pytest.mark.parametrize("content, pattern", [
    ("path,label\nx,1\n", "header 'file,watermark'"),
    ("", "header"),
    (f"file,watermark\ntrain/{CARTON}/{CARTON}_1.JPEG,2\n", "line 2: watermark must be 0 or 1"),
    (f"file,watermark\ntrain/{CARTON}/{CARTON}_1.JPEG,yes\n", "line 2: watermark must be 0 or 1"),
    (f"file,watermark\ntrain/{CARTON}/{CARTON}_1.JPEG,1\ntrain/{CARTON}/nope.JPEG,0\n", "line 3.*does not exist"),
    (f"file,watermark\ntrain/{CARTON}/{CARTON}_1.JPEG,1\ntrain/{CARTON}/{CARTON}_1.JPEG,0\n", "both 0 and 1"),
    (f"file,watermark\ntrain/{CARTON}/{CARTON}_1.JPEG\n", "expected columns"),
])
def test_label_csv_bad_rows(fake_root, tmp_path, content, pattern):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(CNPError, match=pattern):
        imn.read_label_csv(p, fake_root)
    with pytest.raises(CNPError, match=pattern):
        build(fake_root, tmp_path, label_csv=p)


def test_label_csv_missing_file(fake_root, tmp_path):
    with pytest.raises(CNPError, match="does not exist.*label_csv=None"):
        build(fake_root, tmp_path, label_csv=tmp_path / "none.csv")


# ------------------------------------------------------------------------ bad input
def test_bad_roots(fake_root, tmp_path):
    with pytest.raises(CNPError, match="does not exist or is not a folder"):
        build(tmp_path / "nowhere", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CNPError, match="has no train/ folder"):
        build(tmp_path / "empty", tmp_path)
    with pytest.raises(CNPError, match="passed the train .*folder.*pass its parent"):
        build(fake_root / "train", tmp_path)


def test_missing_wnid_folder(tmp_path):
    root = make_fake_imagenet(tmp_path / "r", [CARTON], n_train=3, n_val=0, size=16)
    with pytest.raises(CNPError, match=f"{DUGONG}.*'dugong'.*negative class"):
        build(root, tmp_path)
    make_fake_imagenet(tmp_path / "r", [DUGONG], n_train=30, n_val=2, size=16)
    with pytest.raises(CNPError, match=f"val/{CARTON}.*'carton'"):
        build(root, tmp_path)


def test_flat_val_folder(tmp_path):
    root = make_fake_imagenet(tmp_path / "r", [CARTON, DUGONG], n_train=30, n_val=0, size=16)
    (root / "val").mkdir()
    (root / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(
        (root / "train" / CARTON / f"{CARTON}_1.JPEG").read_bytes())
    with pytest.raises(CNPError, match="arranged in wnid folders.*torchvision.datasets.ImageNet"):
        build(root, tmp_path)


def test_no_val_folder_uses_train_images(tmp_path):
    root = make_fake_imagenet(tmp_path / "r", [CARTON, DUGONG], n_train=30, n_val=0, size=16)
    data = build(root, tmp_path)
    assert all(f.startswith("train/") for f in files(data["test"]) + files(data["val"]))


def test_too_few_images(fake_root, tmp_path):
    with pytest.raises(CNPError, match=r"30 images in train/n02971356.*needs 40 per class.*sizes\['train'\]"):
        build(fake_root, tmp_path, sizes=dict(SIZES, train=40))
    with pytest.raises(CNPError, match=r"drsa split needs 13 positive.*12 positives.*sizes\['drsa'\]"):
        build(fake_root, tmp_path, sizes=dict(SIZES, drsa=13))
    with pytest.raises(CNPError, match=r"need 26 held-out images.*only 22.*4 in val/n02971356.*"
                                       r"sizes\['test'\] or sizes\['val'\]"):
        build(fake_root, tmp_path, sizes=dict(SIZES, test=10))


@pytest.mark.parametrize("sizes, pattern", [({"trian": 3}, "unknown size key"), ({"val": 0}, "positive integer")])
def test_bad_sizes(fake_root, tmp_path, sizes, pattern):
    with pytest.raises(CNPError, match=pattern):
        build(fake_root, tmp_path, sizes=sizes)


def test_bad_seed_and_pair_mismatch(fake_root, tmp_path):
    with pytest.raises(CNPError, match="seed"):
        build(fake_root, tmp_path, seed=-1)
    with pytest.raises(CNPError, match="describes pair 'crate-packet'"):
        build(fake_root, tmp_path, manifest=imn.MANIFEST_DIR / "crate-packet.json")


def test_corrupt_jpeg_named(tmp_path):
    # 24 images per class, all of them used (12 train + 4 x 3 held out)
    root = make_fake_imagenet(tmp_path / "r", [CARTON, DUGONG], n_train=24, n_val=0, size=16)
    bad = root / "train" / DUGONG / f"{DUGONG}_5.JPEG"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(CNPError, match=f"could not decode the image .*{DUGONG}_5.JPEG.*restore it"):
        build(root, tmp_path)


# ------------------------------------------------------------------------ VGG-16 weights
@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "vgg16-fake.pth"
    return path, make_fake_vgg16_weights(path, seed=0)


def test_fake_weights_load_and_forward(fake_weights):
    path, sha = fake_weights
    assert len(sha) == 64
    model = load_torchvision_vgg16(path, expected_sha256=sha).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["features.0.weight"], model.features[0].weight)


def test_wrong_hash_raises(fake_weights):
    path, sha = fake_weights
    with pytest.raises(CNPError, match="SHA-256.*expected"):
        load_torchvision_vgg16(path, expected_sha256="0" * 64)


def test_missing_weights_file_says_how_to_supply(tmp_path):
    with pytest.raises(CNPError, match="does not exist.*vgg16-397923af.pth"):
        load_torchvision_vgg16(tmp_path / "missing.pth")


def test_no_download_without_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    calls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: calls.append(a))
    with pytest.raises(CNPError, match="weights_path=.*allow_download=True"):
        load_torchvision_vgg16(None, allow_download=False)
    assert not calls


def test_fake_imagenet_layout(tmp_path):
    root = make_fake_imagenet(tmp_path, [CARTON, DUGONG], n_train=2, n_val=1, size=16)
    assert sorted(os.listdir(root / "train" / CARTON)) == [f"{CARTON}_1.JPEG", f"{CARTON}_2.JPEG"]
    assert sorted(os.listdir(root / "val")) == sorted([CARTON, DUGONG])
    a = imn.decode_image(root / "train" / CARTON / f"{CARTON}_1.JPEG", 16, 16).float().mean((1, 2))
    b = imn.decode_image(root / "train" / DUGONG / f"{DUGONG}_1.JPEG", 16, 16).float().mean((1, 2))
    assert float(np.abs((a - b).numpy()).max()) > 10  # class-dependent colours
