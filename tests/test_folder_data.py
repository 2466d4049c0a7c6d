"""Your own data: the manifest command, ImageFolder trees, masks, split files, the exported
benchmark read back through the folder path, and the overlay parameters of the real-data paths."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import make_fake_imagenet
from netguard import refuse_in_process

import cnp.data.imagenet as imn
from cnp.data.__main__ import main as data_main
from cnp.data.folder import auto_sizes, export_pair, make_manifest
from cnp.data.splits import SUBGROUPS, Split
from cnp.io import CNPError

CARTON, DUGONG = "n02971356", "n02074367"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    """No network; the real-data caches go to tmp_path (the embedded benchmark keeps $CNP_CACHE)."""
    refuse_in_process(monkeypatch)
    monkeypatch.setenv("CNP_PROGRESS", "0")
    monkeypatch.setattr(imn, "default_cache_dir", lambda: tmp_path / "real-cache")


def _image(rng: np.random.Generator, color, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    img = np.array(color, dtype=np.float32) + rng.normal(0, 15, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, classes: dict[str, int], size=(40, 52), seed: int = 0, nested: bool = False,
                      ext: str = ".jpg") -> Path:
    """An ImageFolder tree root/<class>/<k>.jpg (in root/<class>/sub/ too when ``nested``)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for ci, (name, n) in enumerate(classes.items()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        color = (60 + 120 * (ci % 2), 80, 200 - 100 * (ci % 2))
        for k in range(n):
            target = d / "sub" if nested and k % 3 == 0 else d
            target.mkdir(exist_ok=True)
            Image.fromarray(_image(rng, color, size)).save(target / f"img{k:03d}{ext}", quality=90)
    (root / next(iter(classes)) / ".hidden.jpg").write_bytes(b"x")  # hidden files are skipped
    return root


def write_mask(path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    """A mask PNG of ``size`` (w, h), white inside ``box`` (left, top, right, bottom)."""
    from PIL import Image

    arr = np.zeros((size[1], size[0]), dtype=np.uint8)
    left, top, right, bottom = box
    arr[top:bottom, left:right] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L").save(path)


#: 10 + 2 x 3 + 2 x 4 = 24: every image of a 24-image class is used
SMALL = {"train": 10, "drsa": 6, "rank": 4, "val": 3, "test": 4}


# ------------------------------------------------------------------------ the manifest command
def test_manifest_command_folder_layout(tmp_path, capsys):
    root = make_image_folder(tmp_path / "flowers", {"tulips": 30, "roses": 28}, nested=True)
    out = root / "tulips-roses.json"
    assert data_main(["manifest", "--root", str(root), "--positive", "tulips", "--negative", "roses",
                      "--out", str(out), "--crop", "32", "--resize", "36"]) == 0
    assert "layout folder" in capsys.readouterr().out
    raw = json.loads(out.read_text())
    assert raw["layout"] == "folder" and raw["root"] == "." and raw["schema"] == imn.SCHEMA_VERSION
    assert raw["positive"] == {"name": "tulips", "folder": "tulips"} and "index" not in raw["negative"]
    assert raw["sizes"] == auto_sizes(28)                    # the paper's proportions, fitted to 28 images
    data = imn.build_pair(out, progress=False)               # root from the manifest, pair from its name
    assert data.pair == "tulips-roses" and data.meta["source"] == "folder"
    assert data.image_size == 32
    for s in (data["val"], data["test"]):
        assert s.counts() == {g: raw["sizes"][s.name] for g in SUBGROUPS}
    files = [f for s in ("train", "val", "test") for f in data[s].meta["files"]]
    assert len(set(files)) == len(files) and not any(".hidden" in f for f in files)
    assert any("/sub/" in f for f in files)                  # images below the class folder count too
    for s in data.splits.values():
        for f, y in zip(s.meta["files"], s.labels.tolist()):
            assert f.split("/")[0] == ("tulips" if y == 1 else "roses")
    # deterministic: a second build in another cache gives the same files
    again = imn.build_pair(out, progress=False, cache_dir=tmp_path / "other")
    assert all(again[k].meta["files"] == data[k].meta["files"] for k in data.splits)


def test_manifest_command_imagenet_layout(tmp_path):
    root = make_fake_imagenet(tmp_path / "inet", [CARTON, DUGONG], n_train=20, n_val=3, size=36, seed=2)
    out = tmp_path / "m" / "mine.json"
    out.parent.mkdir()
    assert data_main(["manifest", "--root", str(root), "--positive", CARTON, "--negative", DUGONG,
                      "--out", str(out), "--sizes", "train=8,drsa=5,rank=3,val=2,test=2"]) == 0
    raw = json.loads(out.read_text())
    assert raw["layout"] == "imagenet" and "root" not in raw      # the root is outside the manifest's folder
    assert raw["positive"] == {"name": "carton", "wnid": CARTON, "index": 478}   # known from the packaged pairs
    assert raw["sizes"] == {"train": 8, "drsa": 5, "rank": 3, "val": 2, "test": 2}
    with pytest.raises(CNPError, match="no ImageNet root given"):
        imn.build_pair(out, progress=False)
    data = imn.build_pair(out, root, progress=False, image_size=32)
    assert data.pair == "carton-dugong" and data.meta["classes"]["positive"]["index"] == 478
    assert any(f.startswith("val/") for f in data["test"].meta["files"])


@pytest.mark.parametrize("layout", ["folder", "imagenet"])
def test_manifest_command_clear_errors(tmp_path, capsys, layout):
    if layout == "folder":
        root = make_image_folder(tmp_path / "r", {"tulips": 12, "roses": 12})
        (root / "empty").mkdir()
        pos, typo, empty, good = "tulips", "tulip", "empty", "roses"
    else:
        root = make_fake_imagenet(tmp_path / "r", [CARTON, DUGONG], n_train=12, n_val=0, size=16)
        (root / "train" / "n01234567").mkdir()
        pos, typo, empty, good = CARTON, "n02971357", "n01234567", DUGONG
    out = str(tmp_path / "m.json")
    args = ["manifest", "--root", str(root), "--out", out, "--layout", layout]
    assert data_main([*args, "--positive", typo, "--negative", good]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --positive") and "no folder" in err and "close:" in err
    with pytest.raises(CNPError, match="contains no images"):
        make_manifest(root, empty, good, out, layout=layout)
    with pytest.raises(CNPError, match="--root .* does not exist"):
        make_manifest(tmp_path / "nowhere", "a", "b", out)
    with pytest.raises(CNPError, match="two different classes"):
        make_manifest(root, good, good, out, layout=layout)
    with pytest.raises(CNPError, match="sizes need train"):
        make_manifest(root, pos, good, out, layout=layout, sizes={"train": 9})
    if layout == "imagenet":
        with pytest.raises(CNPError, match="chosen by its WordNet id.*'carton' is n02971356"):
            make_manifest(root, "carton", good, out)
    else:
        (tmp_path / "labels.csv").write_text("file,watermark\n")
        with pytest.raises(CNPError, match="outside the manifest's folder"):
            make_manifest(root, pos, good, tmp_path / "sub" / "m.json", label_csv=tmp_path / "labels.csv")
    make_manifest(root, pos, good, out, layout=layout)
    with pytest.raises(CNPError, match="exists; pass --force"):
        make_manifest(root, pos, good, out, layout=layout)


# ------------------------------------------------------------------------ masks
def _masked_tree(tmp_path: Path, where: str) -> tuple[Path, Path, dict[str, tuple]]:
    """An ImageFolder tree (52 x 40 images) with masks on the first 4 positives, beside or in masks/."""
    root = make_image_folder(tmp_path / "data", {"cats": 24, "dogs": 24}, size=(52, 40), ext=".png")
    boxes = {}
    for k in range(4):
        rel = f"cats/img{k:03d}.png"
        box = (10 + k, 5, 30 + k, 15)
        base = root if where == "beside" else root / "masks"
        write_mask(base / "cats" / f"img{k:03d}.mask.png", (52, 40), box)
        boxes[rel] = box
    return root, root / "cats-dogs.json", boxes


@pytest.mark.parametrize("where", ["beside", "folder"])
def test_masks_beside_images_and_in_a_folder(tmp_path, where):
    from PIL import Image
    from torchvision import transforms

    root, out, boxes = _masked_tree(tmp_path, where)
    make_manifest(root, "cats", "dogs", out, masks="beside" if where == "beside" else root / "masks",
                  sizes=SMALL, crop=32, resize=36)
    assert json.loads(out.read_text())["watermark"]["masks"] == ("beside" if where == "beside" else "masks")
    data = imn.build_pair(out, progress=False)
    assert data.meta["n_masks"] == 4
    seen = set()
    for s in data.splits.values():
        files = s.meta["files"]
        assert not any(f.endswith(".mask.png") for f in files)          # masks are never images
        for i, f in enumerate(files):
            if f in boxes and not s.meta["overlaid"][i]:
                seen.add(f)
                assert bool(s.wm[i]) and s.meta["wm_source"][i] == "mask" and s.meta["masks_known_per_image"][i]
                # resized and centre-cropped exactly as the image, nearest neighbour
                mask_file = (root if where == "beside" else root / "masks") / f.replace(".png", ".mask.png")
                tv = transforms.Compose([transforms.Resize(36, interpolation=transforms.InterpolationMode.NEAREST),
                                         transforms.CenterCrop(32), transforms.PILToTensor()])
                with Image.open(mask_file) as im:
                    ref = tv(im.convert("L"))[0] > 127
                assert torch.equal(s.masks[i], ref) and s.masks[i].any()
    assert seen == set(boxes)
    # a masked image labelled clean, and a mask of the wrong size, are errors
    labels = imn.write_label_csv(tmp_path / "l.csv", {next(iter(boxes)): 0}, root=root)
    with pytest.raises(CNPError, match="labels mark clean"):
        imn.build_pair(out, progress=False, label_csv=labels)
    base = root if where == "beside" else root / "masks"
    write_mask(base / "cats" / "img000.mask.png", (40, 40), (0, 0, 4, 4))
    with pytest.raises(CNPError, match="is 40x40 pixels but its image .* is 52x40"):
        imn.build_pair(out, progress=False, cache_dir=tmp_path / "c2")
    if where == "folder":
        with pytest.raises(CNPError, match="mask folder .* does not exist"):
            imn.build_pair(out, progress=False, masks=tmp_path / "none")


def test_masks_beside_images_need_the_setting(tmp_path):
    root, out, _ = _masked_tree(tmp_path, "beside")
    make_manifest(root, "cats", "dogs", out, masks="beside", sizes=SMALL, crop=32, resize=36)
    raw = json.loads(out.read_text())
    raw["watermark"].pop("masks")
    out.write_text(json.dumps(raw))
    with pytest.raises(CNPError, match=r"looks like a watermark mask.*set watermark.masks to \"beside\""):
        imn.build_pair(out, progress=False)


# ------------------------------------------------------------------------ split files
def test_split_file_is_honoured_and_checked(tmp_path):
    root = make_image_folder(tmp_path / "d", {"a": 14, "b": 14}, ext=".png")
    rows = [(f"a/img{k:03d}.png", "train", 1, k % 2) for k in range(6)] + \
           [(f"b/img{k:03d}.png", "train", 0, 0) for k in range(6)] + \
           [(f"{c}/img{k:03d}.png", s, int(c == "a"), w) for s, ks in (("val", (6, 7, 8, 9)), ("test", (10, 11, 12, 13)))
            for c in "ab" for k, w in zip(ks, (0, 1, 0, 1))]
    split_csv = imn.write_split_csv(root / "splits.csv", rows)
    out = root / "m.json"
    make_manifest(root, "a", "b", out, splits=split_csv, crop=32, resize=36, sizes={"drsa": 3, "rank": 2})
    data = imn.build_pair(out, progress=False)
    assert data["train"].meta["files"] == [r[0] for r in rows[:12]]       # in the file's order, not shuffled
    assert data["test"].counts() == {g: 2 for g in SUBGROUPS}
    assert data["train"].wm.tolist() == [bool(k % 2) for k in range(6)] + [False] * 6
    assert len(data["drsa"]) == 3 and data["rank"].labels.tolist() == [1, 1, 0, 0]   # derived from train
    assert set(data["drsa"].meta["files"]) <= set(data["train"].meta["files"][:6])
    with pytest.raises(CNPError, match="fixes the train, val and test splits"):
        imn.build_pair(out, progress=False, sizes={"train": 4})
    (root / "dev.csv").write_text("file,split\na/img000.png,dev\n")
    with pytest.raises(CNPError, match="line 2: unknown split 'dev'"):
        imn.build_pair(out, progress=False, splits=root / "dev.csv")
    bad = {
        "has no rows for val, test": rows[:12],
        "lies in the folder of the positive class": [(rows[0][0], "train", 0, 1)] + rows[1:],
        "has no image in subgroup.*c0w1": [r if not (r[1] == "test" and r[2] == 0) else r[:3] + (0,) for r in rows],
    }
    for pattern, content in bad.items():
        imn.write_split_csv(root / "bad.csv", content)
        with pytest.raises(CNPError, match=pattern):
            imn.build_pair(out, progress=False, splits=root / "bad.csv")


# ------------------------------------------------------------------------ the benchmark on disk
@pytest.mark.parametrize("pair", ["carton-dugong", "basketball"])
def test_png_export_round_trip_is_bit_identical(tiny_pair, tmp_path, pair):
    from cnp.data.synthetic import PairConfig, make_pair

    data = tiny_pair if pair == "carton-dugong" else make_pair(PairConfig(
        pair=pair, seed=1, image_size=32, n_train_per_class=4, n_drsa=3, n_rank=2, n_val_per_subgroup=1,
        n_test_per_subgroup=2))
    man = export_pair(data, tmp_path / "bench")
    back = imn.build_pair(man, progress=False)
    assert back.pair == data.pair and (back.positive, back.negative) == (data.positive, data.negative)
    assert list(back.splits) == list(data.splits)
    for k, s in data.splits.items():
        b = back[k]
        for attr in ("images", "labels", "wm", "masks"):
            assert torch.equal(getattr(s, attr), getattr(b, attr)), (k, attr)
        assert sorted(b.extra_masks) == sorted(s.extra_masks)
        assert all(torch.equal(s.extra_masks[p], b.extra_masks[p]) for p in s.extra_masks)
        assert b.meta["masks_known"] is True
    # the tree is an ImageFolder tree: one folder per class, masks in their own folders
    assert {p.name for p in (tmp_path / "bench").iterdir() if p.is_dir()} >= {data.positive, data.negative, "masks"}
    with pytest.raises(CNPError, match="not an empty folder"):
        export_pair(data, tmp_path / "bench")
    assert export_pair(data, tmp_path / "bench", image_format="jpeg", overwrite=True).is_file()
    assert next((tmp_path / "bench" / data.positive).glob("*.jpg"))


def test_export_of_imagenet_data_shares_train_files(tmp_path):
    root = make_fake_imagenet(tmp_path / "inet", [CARTON, DUGONG], n_train=24, n_val=0, size=20, seed=3)
    held = f"train/{CARTON}/{CARTON}_7.JPEG"
    labels = imn.write_label_csv(tmp_path / "l.csv", {held: 1}, root=root)
    data = imn.build_pair("carton-dugong", root, 0, sizes={"train": 10, "drsa": 4, "rank": 3, "val": 2, "test": 2},
                          image_size=16, overlay="cnp", label_csv=labels, progress=False)
    man = export_pair(data, tmp_path / "out")
    assert len(list((tmp_path / "out").rglob("drsa-*"))) == 0           # drsa and rank reuse the train files
    back = imn.build_pair(man, progress=False)
    for k, s in data.splits.items():
        assert torch.equal(s.images, back[k].images) and torch.equal(s.masks, back[k].masks)
        assert s.meta["masks_known_per_image"] == back[k].meta["masks_known_per_image"]
    assert back.meta["classes"]["positive"]["wnid"] == CARTON


def test_exported_benchmark_reads_back_through_the_folder_path(tmp_path, make_tiny_vgg, capsys):
    """The smoke-size benchmark written as JPEG + label CSV + mask PNGs (python -m cnp.data
    export-synthetic) and read back with dataset='folder': the same splits and subgroups, the same
    masks, the images within JPEG loss, and a fixed model's subgroup accuracies within 0.05."""
    from cnp.evaluate import subgroup_accuracy
    from cnp.pipeline import backbone_config, load_data, load_pretrained, make_params
    from cnp.pretrain import backbone_path
    from cnp.training import predict_logits
    from cnp.warmup import warmup

    p = make_params(smoke=True)
    mem = load_data(p)
    assert data_main(["export-synthetic", "--pair", "carton-dugong", "--seed", "0", "--smoke", "--format", "jpeg",
                      "--out", str(tmp_path / "bench")]) == 0
    man = tmp_path / "bench" / "manifest.json"
    assert json.loads(man.read_text())["export"] == {"format": "jpeg", "quality": 95, "source": "synthetic"}
    assert data_main(["summary", str(man)]) == 0
    assert "test   n=   60  c0w0=15  c0w1=15  c1w0=15  c1w1=15" in capsys.readouterr().out
    assert {"labels.csv", "splits.csv", "manifest.json"} <= {f.name for f in (tmp_path / "bench").iterdir()}
    assert len(list((tmp_path / "bench" / "masks").rglob("*.mask.png"))) == sum(int(s.wm.sum()) for s in mem.splits.values())
    q = make_params(smoke=True, dataset="folder", pair=str(man), run_dir=str(tmp_path / "run"))
    disk = load_data(q)
    assert disk.meta["source"] == "folder" and disk.image_size == mem.image_size
    for name, s in mem.splits.items():
        d = disk[name]
        assert d.counts() == s.counts() and torch.equal(d.labels, s.labels) and torch.equal(d.wm, s.wm)
        assert float((d.masks == s.masks).float().mean()) >= 0.95 and d.meta["masks_known"]
        err = (d.images.float() - s.images.float()).abs()
        assert float(err.mean()) < 3.0 and float(err.max()) <= 48        # JPEG q95, 4:4:4
    # a fixed model: the embedded backbone when it is cached (cheap), else a fixed tiny VGG
    backbone = load_pretrained(p) if backbone_path(backbone_config(p)).exists() else make_tiny_vgg(seed=0)
    model = warmup(backbone, mem, epochs=2, seed=0, verbose=False).model
    # val and test together: 25 images per subgroup, so one flipped prediction moves 0.04
    held_mem, held_disk = (Split.concat([d["val"], d["test"]], "held-out") for d in (mem, disk))
    a, b = subgroup_accuracy(model, held_mem), subgroup_accuracy(model, held_disk)
    assert all(abs(a[g] - b[g]) <= 0.05 for g in SUBGROUPS), (a, b)
    same = predict_logits(model, held_mem.images).argmax(1) == predict_logits(model, held_disk.images).argmax(1)
    assert float(same.float().mean()) >= 0.95


# ------------------------------------------------------------------------ pipeline parameters
@pytest.fixture(scope="module")
def inet_root(tmp_path_factory) -> Path:
    return make_fake_imagenet(tmp_path_factory.mktemp("inet"), [CARTON, DUGONG], n_train=30, n_val=4, size=40, seed=1)


TINY = {"n_train_per_class": 12, "n_drsa": 8, "n_rank": 4, "n_val_per_subgroup": 3, "n_test_per_subgroup": 3,
        "image_size": 32}


def test_manifest_style_wins_unless_overlay_style_params(inet_root):
    """The ImageNet path overlays in the manifest's style; the wm_* values only with overlay_style='params'."""
    from cnp.pipeline import _stage_key, load_data, make_params

    manifest_style = imn.load_manifest("carton-dugong").style
    base = dict(TINY, dataset="imagenet", imagenet_root=str(inet_root), overlay="cnp")
    data = load_data(make_params(**base, wm_text="XYZ"))              # wm_* set, but the manifest's style wins
    assert data.meta["style"] == manifest_style and data.meta["overlay"] == "cnp"
    params = load_data(make_params(**base, wm_text="XYZ", overlay_style="params"))
    assert params.meta["style"]["wm_text"] == "XYZ" and params.meta["style"]["wm_size"] == 0.22
    assert params["test"].fingerprint() != data["test"].fingerprint()
    # the overlay's style is part of every stage's key
    inet = make_params(**base)
    assert _stage_key(inet, "warmup") != _stage_key(inet.replace(overlay_style="params"), "warmup")
    with pytest.raises(CNPError, match="overlay_style must be"):
        make_params(**base, overlay_style="wm")


def test_overlay_parameter_reaches_build_pair(inet_root, monkeypatch):
    from cnp.pipeline import load_data, make_params

    base = dict(TINY, dataset="imagenet", imagenet_root=str(inet_root))
    monkeypatch.setattr(imn, "imagenet_w_available", lambda: False)
    with pytest.raises(CNPError, match="pip install imagenet-w"):
        make_params(**base, overlay="imagenet-w")
    assert load_data(make_params(**base)).meta["overlay"] == "cnp"      # auto without the package

    class AddWatermark:  # the imagenet-w API
        def __init__(self, image_size=224):
            self.opacity = 0.5

        def __call__(self, image):
            out = image.clone()
            out[:, 2:6, 2:20] = out[:, 2:6, 2:20] * 0.5 + 0.5
            return out

    monkeypatch.setitem(sys.modules, "imagenet_w", types.SimpleNamespace(AddWatermark=AddWatermark))
    monkeypatch.setattr(imn, "imagenet_w_available", lambda: True)
    data = load_data(make_params(**base, overlay="imagenet-w"))
    assert data.meta["overlay"] == "imagenet-w" and data["test"].masks[data["test"].wm].any()
    assert load_data(make_params(**base, overlay="cnp")).meta["overlay"] == "cnp"
    with pytest.raises(CNPError, match="overlay_style='params' needs overlay='cnp'"):
        make_params(**base, overlay="imagenet-w", overlay_style="params")
    with pytest.raises(CNPError, match="overlay must be one of"):
        make_params(**base, overlay="stamp")
    with pytest.raises(CNPError, match="applies to dataset='imagenet' or 'folder'"):
        make_params(smoke=True, overlay="cnp")


def test_folder_dataset_parameters(tmp_path, tiny_pair):
    from cnp.pipeline import load_data, make_params

    man = export_pair(tiny_pair, tmp_path / "b")
    with pytest.raises(CNPError, match="is a manifest file: set run_dir too"):
        make_params(dataset="folder", pair=str(man))
    with pytest.raises(CNPError, match="a manifest file needs dataset='folder'"):
        make_params(pair=str(man))
    with pytest.raises(CNPError, match="manifest file .* does not exist"):
        make_params(dataset="folder", pair=str(tmp_path / "none.json"), run_dir=str(tmp_path))
    with pytest.raises(CNPError, match="layout 'folder'; use dataset='folder'"):
        make_params(dataset="imagenet", pair=str(man), imagenet_root=str(tmp_path), run_dir=str(tmp_path))
    p = make_params(dataset="folder", pair=str(man), run_dir=str(tmp_path / "run"))
    data = load_data(p)
    assert data["test"].fingerprint() == tiny_pair["test"].fingerprint()
    raw = json.loads(man.read_text())
    raw.pop("root")
    (tmp_path / "b" / "noroot.json").write_text(json.dumps(raw))
    with pytest.raises(CNPError, match="dataset='folder' needs data_root"):
        make_params(dataset="folder", pair=str(tmp_path / "b" / "noroot.json"), run_dir=str(tmp_path))
    q = make_params(dataset="folder", pair=str(tmp_path / "b" / "noroot.json"), run_dir=str(tmp_path),
                    data_root=str(tmp_path / "b"))
    assert load_data(q)["train"].fingerprint() == tiny_pair["train"].fingerprint()
