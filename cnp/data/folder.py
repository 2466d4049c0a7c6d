"""Your own data: manifests for any two classes of an image tree, and the benchmark on disk.

* :func:`make_manifest` (``python -m cnp.data manifest``) describes two classes of an ImageNet
  tree (``root/train/<wnid>/``) or of a torchvision ``ImageFolder`` tree (``root/<class>/``) in
  a manifest that :func:`cnp.data.imagenet.build_pair` (and the pipeline's ``dataset="folder"``)
  reads, with optional watermark labels, watermark masks and an explicit split file.
* :func:`export_pair` writes any :class:`~cnp.data.splits.PairData` (e.g. the embedded benchmark,
  :func:`export_synthetic`, ``python -m cnp.data export-synthetic``) as an ``ImageFolder`` tree of
  PNG or JPEG files with a label CSV, mask PNGs, a split file and a manifest, so that the folder
  path reads back the same images in the same splits (bit-identical with PNG).

Exported layout::

    out/manifest.json             layout "folder", root ".", splits "splits.csv"
    out/splits.csv                file,split,label,watermark (rows of a split in order)
    out/labels.csv                file,watermark
    out/<class>/<split>-<i>.png   the images (one folder per class: an ImageFolder tree)
    out/masks/<class>/<split>-<i>.mask.png          watermark masks (watermarked images)
    out/masks_<part>/<class>/<split>-<i>.mask.png   part masks (e.g. the basketball's ball)
"""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnp.data.imagenet import (
    _PART_RE,
    _WNID_RE,
    LAYOUTS,
    MASK_SUFFIX,
    OVERLAYS,
    SCHEMA_VERSION,
    SELECTION_RULE,
    SIZE_KEYS,
    _check_sizes,
    check_root,
    is_folder_name,
    known_pairs,
    list_class_files,
    load_manifest,
    manifest_from_dict,
    read_label_csv,
    read_split_csv,
    write_label_csv,
    write_split_csv,
)
from cnp.data.splits import PairData
from cnp.data.synthetic import PAIRS, load_pair, pair_config
from cnp.data.watermark import WatermarkStyle
from cnp.io import CNPError, atomic_write_json
from cnp.params import Params

#: The paper's split sizes (``train`` per class, ``drsa`` and ``rank`` positives, ``val`` and
#: ``test`` per subgroup): what a manifest gets when the classes have enough images.
PAPER_SIZES: dict[str, int] = {"train": 650, "drsa": 500, "rank": 500, "val": 150, "test": 150}
#: Image formats :func:`export_pair` writes.
EXPORT_FORMATS = ("png", "jpeg")
#: Split order in exported files.
_SPLITS = ("train", "drsa", "rank", "val", "test")


# ---------------------------------------------------------------------------- helpers
def _safe_name(name: str) -> str:
    """A file-name-safe version of ``name`` (letters, digits, ``.``, ``_``, ``-``)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
    return s or "class"


def _rel_inside(path: Path, base: Path, what: str, fix: str) -> str:
    """``path`` relative to ``base`` (posix), or a CNPError when it lies outside ``base``."""
    p, b = path.expanduser().resolve(), base.resolve()
    if p != b and b not in p.parents:
        raise CNPError(f"{what} {p} is outside the manifest's folder {b}: paths in a manifest must stay inside "
                       f"its folder. {fix}")
    return Path(os.path.relpath(p, b)).as_posix()


def _known_classes() -> dict[str, dict]:
    """wnid -> {name, index} from the packaged manifests."""
    out: dict[str, dict] = {}
    for pair in known_pairs():
        try:
            man = load_manifest(pair)
        except CNPError:
            continue
        for cls in (man.positive, man.negative):
            if cls.wnid:
                out[cls.wnid] = {"name": cls.name, "index": cls.index}
    return out


def _torchvision_index(root: Path, wnid: str) -> int | None:
    """The torchvision index of ``wnid`` when ``root/train`` holds the 1000 ImageNet-1k classes
    (torchvision orders them by wnid)."""
    tdir = root / "train"
    if not tdir.is_dir():
        return None
    wnids = sorted(p.name for p in tdir.iterdir() if p.is_dir() and _WNID_RE.match(p.name))
    if len(wnids) == 1000 and wnid in wnids:
        return wnids.index(wnid)
    return None


def _class_entry(root: Path, name: str, layout: str, display: str | None, known: Mapping[str, dict],
                 option: str) -> dict:
    import difflib

    if layout == "imagenet":
        tdir = root / "train"
        there = sorted(p.name for p in tdir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not _WNID_RE.match(name):
            by_name = [w for w, info in known.items() if info["name"] == name and w in there]
            hint = f" ({name!r} is {by_name[0]})" if by_name else ""
            raise CNPError(f"{option} {name!r}: in the imagenet layout a class is chosen by its WordNet id, the name "
                           f"of its folder under {tdir} (e.g. n02971356){hint}; for a tree root/<class>/ use "
                           "--layout folder")
        if name not in there:
            close = difflib.get_close_matches(name, there, n=3)
            raise CNPError(f"{option} {name!r}: there is no folder {tdir / name}"
                           + (f" (close: {', '.join(close)})" if close else "")
                           + f"; {len(there)} class folders are there. Extract the class into {tdir} or pick another wnid.")
        info = known.get(name, {})
        entry: dict[str, Any] = {"name": display or info.get("name") or name, "wnid": name}
        index = info.get("index")
        if index is None:
            index = _torchvision_index(root, name)
        if index is not None:
            entry["index"] = index
        return entry
    if not is_folder_name(name):
        raise CNPError(f"{option} {name!r}: a class is the name of one folder directly under {root} (no '/', not hidden)")
    cdir = root / name
    if not cdir.is_dir():
        there = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        close = difflib.get_close_matches(name, there, n=3)
        hint = " The root has a train/ folder: for an ImageNet tree use --layout imagenet." if (root / "train").is_dir() else ""
        raise CNPError(f"{option} {name!r}: there is no folder {cdir}"
                       + (f" (close: {', '.join(close)})" if close else "")
                       + f". Class folders there: {', '.join(there[:20]) or '(none)'}{' ...' if len(there) > 20 else ''}.{hint}")
    entry = {"name": display or name, "folder": name}
    if _WNID_RE.match(name):
        entry["wnid"] = name
        info = known.get(name, {})
        if display is None and info.get("name"):
            entry["name"] = info["name"]
        if info.get("index") is not None:
            entry["index"] = info["index"]
    return entry


def auto_sizes(n_per_class: int, given: Mapping[str, int] | None = None) -> dict[str, int]:
    """Split sizes for classes of at least ``n_per_class`` images each.

    The paper's sizes (:data:`PAPER_SIZES`: 650 + 2 x 150 + 2 x 150 = 1,250 distinct images per
    class) when they fit, else the same proportions scaled down; ``given`` sizes are kept.

    Raises
    ------
    CNPError
        When the sizes do not fit: ``train + 2 * val + 2 * test`` images per class are needed.
    """
    given = dict(given or {})
    need = PAPER_SIZES["train"] + 2 * PAPER_SIZES["val"] + 2 * PAPER_SIZES["test"]
    s = min(1.0, n_per_class / need)
    sizes = {"train": max(1, math.floor(PAPER_SIZES["train"] * s)),
             "val": max(1, math.floor(PAPER_SIZES["val"] * s)), "test": max(1, math.floor(PAPER_SIZES["test"] * s))}
    sizes.update({k: v for k, v in given.items() if k in sizes})
    for k in ("drsa", "rank"):
        sizes[k] = given.get(k, max(1, min(math.floor(PAPER_SIZES[k] * s), sizes["train"])))
    sizes = {k: sizes[k] for k in SIZE_KEYS}
    used = sizes["train"] + 2 * sizes["val"] + 2 * sizes["test"]
    if used > n_per_class:
        raise CNPError(
            f"the smaller class has {n_per_class} images but the sizes need train + 2 x val + 2 x test = {used} "
            f"distinct images per class ({sizes}); pass smaller sizes (e.g. --sizes train=N,val=N,test=N) or add images"
        )
    return sizes


def _sizes_from_table(table, cls_count_train: Mapping[int, int]) -> dict[str, int]:
    n_train = max(1, min(cls_count_train.values()))
    sizes = {"train": n_train, "val": max(1, len(table.rows["val"]) // 4), "test": max(1, len(table.rows["test"]) // 4)}
    n_pos = max(1, cls_count_train[1])
    sizes["drsa"] = len(table.rows["drsa"]) if table.rows.get("drsa") else min(PAPER_SIZES["drsa"], n_pos)
    sizes["rank"] = (len(table.rows["rank"]) // 2 or 1) if table.rows.get("rank") else min(PAPER_SIZES["rank"], n_pos)
    return {k: sizes[k] for k in SIZE_KEYS}


# ---------------------------------------------------------------------------- manifests
def make_manifest(
    root: str | os.PathLike,
    positive: str,
    negative: str,
    out: str | os.PathLike,
    *,
    layout: str | None = None,
    pair: str | None = None,
    positive_name: str | None = None,
    negative_name: str | None = None,
    label_csv: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    mask_suffix: str = MASK_SUFFIX,
    splits: str | os.PathLike | None = None,
    sizes: Mapping[str, int] | None = None,
    resize: int = 256,
    crop: int = 224,
    overlay: str = "auto",
    style: WatermarkStyle | Mapping[str, Any] | None = None,
    description: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a manifest for two classes of an image tree (``python -m cnp.data manifest``).

    Parameters
    ----------
    root : path
        The image tree.
    positive, negative : str
        The positive (label 1) and negative (label 0) class: a wnid (ImageNet layout: the folder
        name under ``root/train``) or a folder name directly under ``root`` (folder layout).
    out : path
        The manifest file to write (``.json``). Paths in it are relative to its folder: put it
        in (or above) the image tree to record the root, the label CSV, masks and split file.
    layout : str, optional
        ``imagenet`` or ``folder``; default ``imagenet`` when ``root/train`` exists, else ``folder``.
    pair : str, optional
        The pair's name (default ``<positive name>-<negative name>``).
    positive_name, negative_name : str, optional
        Display names (default: the packaged manifests' name for a known wnid, else the folder name).
    label_csv : path, optional
        Watermark labels ``file,watermark`` (files relative to ``root``); checked now.
    masks : ``"beside"`` or path, optional
        Watermark masks: ``"beside"`` (``<image stem><mask_suffix>`` next to each image) or a
        folder mirroring the images' relative paths.
    mask_suffix : str
        Name ending of a mask file (``.mask.png``).
    splits : path, optional
        A split file ``file,split[,label,watermark]`` (checked now); the splits are then used as
        they are.
    sizes : dict, optional
        Split sizes; keys not given are the paper's when the classes have enough images, else
        scaled down to fit the smaller class (:func:`auto_sizes`).
    resize, crop : int
        Preprocessing: short side and centre crop at ``image_size = crop`` (256, 224).
    overlay : str
        ``auto``, ``cnp`` or ``imagenet-w`` (the overlay that makes the w1 subgroups).
    style : WatermarkStyle or dict, optional
        The ``cnp`` overlay's style (default: the packaged pairs' style).
    description : str, optional
        Free text.
    overwrite : bool
        Replace an existing ``out``.

    Returns
    -------
    Path
        The manifest written (atomically).

    Raises
    ------
    CNPError
        A missing or empty root or class folder, an unknown class (with close matches), a label
        CSV, mask folder or split file that is bad or lies outside the manifest's folder, sizes
        that do not fit, or an existing ``out`` without ``overwrite``.
    """
    out = Path(out).expanduser()
    if out.suffix != ".json":
        raise CNPError(f"--out {out}: a manifest file name must end in .json")
    if out.exists() and not overwrite:
        raise CNPError(f"{out} exists; pass --force (overwrite=True) to replace it or choose another --out")
    r0 = Path(root).expanduser()
    if not r0.is_dir():
        raise CNPError(f"--root {r0} does not exist or is not a folder; pass the image tree's folder "
                       "(root/<class>/*.jpg, or root/train/<wnid>/*.JPEG for ImageNet)")
    if layout is None:
        layout = "imagenet" if (r0 / "train").is_dir() else "folder"
    if layout not in LAYOUTS:
        raise CNPError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    r = check_root(r0, layout)
    if overlay not in OVERLAYS:
        raise CNPError(f"--overlay must be one of {', '.join(OVERLAYS)}, got {overlay!r}")
    if positive == negative:
        raise CNPError(f"--positive and --negative are both {positive!r}; choose two different classes")
    known = _known_classes()
    pos = _class_entry(r, positive, layout, positive_name, known, "--positive")
    neg = _class_entry(r, negative, layout, negative_name, known, "--negative")
    if pair is None:
        pair = f"{_safe_name(pos['name'])}-{_safe_name(neg['name'])}"
    if not is_folder_name(pair) or _safe_name(pair) != pair:
        raise CNPError(f"--pair {pair!r}: a pair name may hold letters, digits, '.', '_' and '-' only "
                       "(it names cache files and run folders)")
    base = out.resolve().parent
    fix_data = ("Write the manifest into a folder that holds it (e.g. --out <root>/manifest.json), or pass it at "
                "run time (label_csv=... / build_pair(masks=..., splits=...)).")
    if style is None:
        style_d = WatermarkStyle(wm_size=0.16, wm_opacity=0.5).to_dict()
    else:
        style_d = (style if isinstance(style, WatermarkStyle) else WatermarkStyle(**style)).to_dict()
    wm: dict[str, Any] = {"label_csv": None, "overlay": overlay, "style": style_d}
    if label_csv is not None:
        read_label_csv(label_csv, r)  # checked now
        wm["label_csv"] = _rel_inside(Path(label_csv), base, "the label CSV", fix_data)
    if masks is not None:
        if os.fspath(masks) == "beside":
            wm["masks"] = "beside"
        else:
            mdir = Path(masks).expanduser()
            if not mdir.is_dir():
                raise CNPError(f"--masks {mdir} does not exist or is not a folder; pass the mask folder (it mirrors "
                               "the images' relative paths) or 'beside' for masks next to the images")
            wm["masks"] = _rel_inside(mdir, base, "the mask folder", fix_data)
        if mask_suffix != MASK_SUFFIX:
            wm["mask_suffix"] = mask_suffix
    raw: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "pair": pair,
        "description": description or f"{pos['name']} (positive) vs {neg['name']} (negative), written by "
                                      "python -m cnp.data manifest",
        "layout": layout, "positive": pos, "negative": neg, "sizes": dict(PAPER_SIZES),
        "selection": {"rule": SELECTION_RULE},
        "preprocessing": {"resize_short_side": int(resize), "center_crop": int(crop), "interpolation": "bilinear",
                          "color": "RGB"},
        "watermark": wm,
    }
    b, rr = base.resolve(), r.resolve()
    if rr == b or b in rr.parents:
        raw["root"] = Path(os.path.relpath(rr, b)).as_posix()
    if splits is not None:
        raw["splits"] = _rel_inside(Path(splits), base, "the split file", fix_data)
    man = manifest_from_dict(raw, out)  # validates the classes, preprocessing, style, mask settings
    files = list_class_files(man, r)    # missing or empty class folders, stray masks
    given = _check_sizes(sizes, "sizes") if sizes else {}
    if splits is not None:
        table = read_split_csv(splits, r)
        cls_of = {f: 1 for f in files["positive"]} | {f: 0 for f in files["negative"]}
        outside = [f for rows in table.rows.values() for f in rows if f not in cls_of]
        if outside:
            raise CNPError(f"split file {splits}: {outside[0]!r} is not an image of {positive!r} or {negative!r}")
        count = {c: sum(cls_of[f] == c for f in table.rows["train"]) for c in (0, 1)}
        raw["sizes"] = {**_sizes_from_table(table, count), **given}
    else:
        raw["sizes"] = auto_sizes(min(len(files["positive"]), len(files["negative"])), given)
    manifest_from_dict(raw, out)
    return atomic_write_json(out, raw)


# ---------------------------------------------------------------------------- export
def _image_bytes(img: torch.Tensor, fmt: str, quality: int) -> bytes:
    from PIL import Image

    arr = img.permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
    else:
        Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _mask_bytes(mask: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.numpy().astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _sizes_of(data: PairData) -> dict[str, int]:
    tr = data["train"]
    per_class = [int((tr.labels == c).sum()) for c in (0, 1)]
    sizes = {"train": max(1, min(per_class))}
    for name in ("val", "test"):
        sizes[name] = max(1, min(data[name].counts().values())) if name in data.splits else 1
    sizes["drsa"] = max(1, len(data["drsa"])) if "drsa" in data.splits else 1
    sizes["rank"] = max(1, int((data["rank"].labels == 1).sum())) if "rank" in data.splits else 1
    return {k: sizes[k] for k in SIZE_KEYS}


def export_pair(
    data: PairData,
    out_dir: str | os.PathLike,
    image_format: str = "png",
    quality: int = 95,
    overwrite: bool = False,
) -> Path:
    """Write a pair's splits to disk as an image tree the folder path reads back.

    Every image is a file ``<class>/<split>-<i>.<ext>`` (one folder per class, an ``ImageFolder``
    tree); ``splits.csv`` records each split's files in order, ``labels.csv`` the watermark
    labels, ``masks/`` the watermark masks of the watermarked images whose masks are known (PNG,
    the image's size, white = watermark), ``masks_<part>/`` the part masks (``Split.extra_masks``,
    where not empty), and ``manifest.json`` ties them together (layout ``folder``, ``root: "."``).
    ``build_pair("<out_dir>/manifest.json")`` then gives the same splits: identical with PNG,
    within JPEG loss with JPEG (the masks stay PNG). Images that ``drsa`` and ``rank`` share with
    ``train`` (``meta['train_index']``, the ImageNet path) are written once.

    Parameters
    ----------
    data : PairData
        Splits ``train``, ``val`` and ``test`` at least (``drsa`` and ``rank`` too, usually).
    out_dir : path
        Folder to create; it must not exist or be empty unless ``overwrite``. It is written as a
        temporary sibling folder and renamed at the end, so an interrupted export leaves no half
        tree under this name.
    image_format : str
        ``png`` (lossless) or ``jpeg``.
    quality : int
        JPEG quality (1-100; 4:4:4 chroma, i.e. no subsampling).
    overwrite : bool
        Replace an existing, non-empty ``out_dir``.

    Returns
    -------
    Path
        The manifest file (``<out_dir>/manifest.json``).

    Raises
    ------
    CNPError
        A bad format or quality, missing splits, a watermark mask on an image flagged clean, or
        an existing ``out_dir`` without ``overwrite``.
    """
    fmt = image_format.lower()
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt not in EXPORT_FORMATS:
        raise CNPError(f"image_format must be one of {', '.join(EXPORT_FORMATS)}, got {image_format!r}")
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
        raise CNPError(f"quality must be an integer in 1..100, got {quality!r}")
    missing = [k for k in ("train", "val", "test") if k not in data.splits]
    if missing:
        raise CNPError(f"pair {data.pair!r} has no {', '.join(missing)} split; export needs train, val and test")
    bad_parts = sorted(p for s in data.splits.values() for p in s.extra_masks if not _PART_RE.match(p))
    if bad_parts:
        raise CNPError(f"extra mask name {bad_parts[0]!r} cannot name a folder; use letters, digits, _ or -")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CNPError(f"{out} exists and is not an empty folder; pass overwrite=True (--force) or another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    ext = ".png" if fmt == "png" else ".jpg"
    folders = {1: _safe_name(data.positive), 0: _safe_name(data.negative)}
    if folders[0] == folders[1]:
        folders = {1: folders[1] + "_pos", 0: folders[0] + "_neg"}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        labels: dict[str, int] = {}
        rows: list[tuple[str, str, int, int]] = []
        parts: set[str] = set()
        train_files: list[str] = []
        for name in _SPLITS:
            if name not in data.splits:
                continue
            split = data[name]
            known = split.meta.get("masks_known_per_image")
            if not (isinstance(known, list) and len(known) == len(split)):
                known = [True] * len(split)
            tix = split.meta.get("train_index")
            shared = (name != "train" and isinstance(tix, list) and len(tix) == len(split)
                      and len(train_files) == len(data["train"]))
            for i in range(len(split)):
                label, wm = int(split.labels[i]), bool(split.wm[i])
                if shared and torch.equal(split.images[i], data["train"].images[tix[i]]):
                    rows.append((train_files[tix[i]], name, label, int(wm)))
                    continue
                rel = f"{folders[label]}/{name}-{i:05d}{ext}"
                _write(tmp / rel, _image_bytes(split.images[i], fmt, quality))
                stem = rel[: -len(ext)]
                if split.masks[i].any() and not wm:
                    raise CNPError(f"split {name}, image {i}: it has watermark mask pixels but is flagged clean; "
                                   "fix the data (a mask marks a watermarked image)")
                if wm and known[i]:
                    _write(tmp / "masks" / f"{stem}{MASK_SUFFIX}", _mask_bytes(split.masks[i]))
                for part, pm in split.extra_masks.items():
                    if pm[i].any():
                        parts.add(part)
                        _write(tmp / f"masks_{part}" / f"{stem}{MASK_SUFFIX}", _mask_bytes(pm[i]))
                labels[rel] = int(wm)
                rows.append((rel, name, label, int(wm)))
                if name == "train":
                    train_files.append(rel)
        for part in {p for s in data.splits.values() for p in s.extra_masks}:
            (tmp / f"masks_{part}").mkdir(exist_ok=True)
            parts.add(part)
        (tmp / "masks").mkdir(exist_ok=True)
        write_label_csv(tmp / "labels.csv", labels)
        write_split_csv(tmp / "splits.csv", rows)
        size = data.image_size
        classes = data.meta.get("classes") if isinstance(data.meta.get("classes"), Mapping) else {}
        entries = {}
        for role, label, name in (("positive", 1, data.positive), ("negative", 0, data.negative)):
            e: dict[str, Any] = {"name": name, "folder": folders[label]}
            info = classes.get(role) if isinstance(classes.get(role), Mapping) else {}
            if isinstance(info.get("wnid"), str) and _WNID_RE.match(info["wnid"]):
                e["wnid"] = info["wnid"]
            if isinstance(info.get("index"), int):
                e["index"] = info["index"]
            entries[role] = e
        style = data.meta.get("style") if isinstance(data.meta.get("style"), Mapping) else None
        recipe = data.meta.get("recipe") if isinstance(data.meta.get("recipe"), Mapping) else {}
        if style is None and isinstance(recipe.get("style"), Mapping):
            style = recipe["style"]
        source = data.meta.get("dataset") or data.meta.get("source") or "unknown"
        manifest = {
            "schema": SCHEMA_VERSION, "pair": data.pair,
            "description": f"pair {data.pair} exported from the {source} data (seed "
                           f"{data.meta.get('seed', recipe.get('seed', '?'))}) by cnp.data.folder.export_pair; "
                           "splits.csv fixes the splits",
            "layout": "folder", "root": ".", "splits": "splits.csv",
            "positive": entries["positive"], "negative": entries["negative"], "sizes": _sizes_of(data),
            "selection": {"rule": SELECTION_RULE},
            "preprocessing": {"resize_short_side": size, "center_crop": size, "interpolation": "bilinear",
                              "color": "RGB"},
            "watermark": {"label_csv": "labels.csv", "masks": "masks", "overlay": "auto",
                          "style": dict(style) if style else WatermarkStyle().to_dict()},
            "export": {"format": fmt, "quality": quality if fmt == "jpeg" else None, "source": source},
        }
        if parts:
            manifest["extra_masks"] = {p: f"masks_{p}" for p in sorted(parts)}
        manifest_from_dict(manifest, tmp / "manifest.json")  # what is written is a valid manifest
        atomic_write_json(tmp / "manifest.json", manifest)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "manifest.json"


def export_synthetic(
    out_dir: str | os.PathLike,
    pair: str = "carton-dugong",
    seed: int = 0,
    *,
    smoke: bool = False,
    image_format: str = "png",
    quality: int = 95,
    overwrite: bool = False,
    **params: Any,
) -> Path:
    """Generate (or load from the cache) the embedded benchmark's pair and :func:`export_pair` it.

    Parameters
    ----------
    out_dir : path
        Folder to create.
    pair, seed : str, int
        The pair and its seed.
    smoke : bool
        The smoke sizes (:data:`cnp.params.SMOKE`: 60 train images per class, ...).
    image_format, quality, overwrite
        As for :func:`export_pair`.
    **params
        Further parameters (:class:`cnp.params.Params`) of the synthetic data (sizes, ``wm_*``
        style, ``wm_rate_pos``, ...).

    Returns
    -------
    Path
        The manifest file.
    """
    p = Params.from_flat(pair=pair, seed=seed, smoke=smoke, dataset="synthetic", **params)
    if pair not in PAIRS:
        raise CNPError(f"unknown pair {pair!r}; known pairs: {', '.join(PAIRS)}")
    return export_pair(load_pair(pair_config(p)), out_dir, image_format=image_format, quality=quality,
                       overwrite=overwrite)


__all__ = ["EXPORT_FORMATS", "PAPER_SIZES", "auto_sizes", "export_pair", "export_synthetic", "make_manifest"]
