"""The real-data path: binary ImageNet pairs (carton-dugong, crate-packet, basketball).

A pair is described by a JSON manifest in ``data_manifests/`` at the repository root (schema in
``data_manifests/README.md``): the positive and negative class (name, WordNet id, torchvision
index), the split sizes of the paper, the preprocessing, and where watermark labels come from.
:func:`build_pair` turns a manifest and a local ImageNet copy into a :class:`~cnp.data.splits.PairData`
with the splits ``train``, ``drsa``, ``rank``, ``val`` and ``test``.

ImageNet layout
---------------
``root/train/<wnid>/*.JPEG`` (the training archive, one folder per class) and, optionally,
``root/val/<wnid>/*.JPEG``. The raw validation archive is flat; arrange it into wnid folders
first, e.g. with ``python -c "import torchvision; torchvision.datasets.ImageNet('<root>',
split='val')"`` (needs ``ILSVRC2012_img_val.tar`` and ``ILSVRC2012_devkit_t12.tar.gz`` in
``<root>``). Without ``root/val`` the held-out images come from unused training images only.

Split rule (mirrors section 4 and Appendix A of the paper)
---------------------------------------------------------
Per class, the training folder's files are sorted by name and permuted with a generator
seeded by ``(pair, seed, wnid)``.

* ``train``: the first ``sizes['train']`` files of each class (650 in the paper), in their
  natural watermark distribution. With ``train_overlay_rates=(p, q)`` a fraction ``p`` of the
  clean positives and ``q`` of the clean negatives get a synthetic watermark (a known,
  injected shortcut, like ImageNet-W).
* ``drsa`` and ``rank``: images of ``train`` (the paper learns the subspaces and ranks
  filters on 500 positive-class images; the held-out images must stay untouched). ``drsa`` is the
  first ``sizes['drsa']`` and ``rank`` the last ``sizes['rank']`` train positives in a seeded
  order, so they are disjoint when ``drsa + rank <= train`` and overlap as little as possible
  otherwise (350 images at the paper's 500 + 500 of 650). ``rank`` is followed by
  ``sizes['rank']`` train negatives (seeded order), which only ``ranking_data='pos+neg'`` uses.
* ``test`` then ``val``: balanced over ``c0w0, c0w1, c1w0, c1w1`` (``sizes['test']`` and
  ``sizes['val']`` images per subgroup), drawn from the held-out pool of each class: the
  ``val/<wnid>`` images first (seeded order), then the training images not used by ``train``.
  Images labelled watermarked in the label CSV fill the w1 subgroups (shared alternately between
  test and val); the rest of each w1 subgroup is made by overlaying a watermark on further clean
  held-out images, so every image of ``val`` and ``test`` comes from a different file.

Watermark labels: a label CSV (``file,watermark``; see :func:`read_label_csv`) when the user
passes one or the manifest names one that exists; without labels every image counts as clean.
Masks are exact for overlaid images; for images labelled watermarked in the CSV they are unknown
(all False) and ``split.meta['masks_known']`` is False.

Overlay: ``imagenet-w``'s ``AddWatermark`` (the ImageNet-W watermark) when that optional
package is importable and no ``style`` is given, else :func:`cnp.data.watermark.apply_watermark`
with the manifest's (or the given) style. ``imagenet-w`` is never required nor vendored (its
license file says CC BY-NC 4.0).
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import importlib.util
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from cnp.data.splits import SUBGROUPS, PairData, Split
from cnp.data.watermark import WatermarkStyle, apply_watermark
from cnp.io import CNPError, atomic_write_text, recipe_hash, safe_join
from cnp.resources import manifest_dir
from cnp.runtime import progress as progress_bar

#: Folder of the packaged pair manifests: the checkout's ``data_manifests/``, else the installed
#: copies (:func:`cnp.resources.manifest_dir`).
MANIFEST_DIR = manifest_dir()
#: Keys of the split sizes (``train`` per class, ``val``/``test`` per subgroup).
SIZE_KEYS: tuple[str, ...] = ("train", "drsa", "rank", "val", "test")
#: Image file suffixes listed in class folders (case-insensitive).
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
#: Overlay methods: ``auto`` (imagenet-w when importable and no style given, else ``cnp``).
OVERLAYS = ("auto", "cnp", "imagenet-w")
#: Bumped whenever the split rule changes, so old caches are not reused.
FORMAT_VERSION = 2  # 2: the rank split also holds negatives
#: The selection rule this module implements (``selection.rule`` in a manifest).
SELECTION_RULE = "sorted-seeded-v1"
#: Manifest schema version understood here.
SCHEMA_VERSION = 1

_WNID_RE = re.compile(r"^n\d{8}$")
_SPLIT_NAMES = ("train", "drsa", "rank", "val", "test")


# ---------------------------------------------------------------------------- manifests
@dataclass(frozen=True)
class ClassInfo:
    """One ImageNet class: display name, WordNet id and torchvision output index."""

    name: str
    wnid: str
    index: int

    def to_dict(self) -> dict:
        return {"name": self.name, "wnid": self.wnid, "index": self.index}


@dataclass(frozen=True)
class PairManifest:
    """A validated pair manifest (see ``data_manifests/README.md``).

    Attributes
    ----------
    pair : str
        Pair name (``carton-dugong``).
    positive, negative : ClassInfo
        The positive (label 1) and negative (label 0) class.
    sizes : dict[str, int]
        ``train`` (per class), ``drsa``, ``rank`` (positive images), ``val``, ``test`` (per
        subgroup).
    resize : int
        Short side after resizing, at ``crop`` (256 for 224).
    crop : int
        Centre-crop side the manifest is written for (224).
    label_csv : str or None
        Label CSV path relative to the manifest's folder (used when the file exists).
    overlay : str
        ``auto``, ``cnp`` or ``imagenet-w``.
    style : dict
        :class:`~cnp.data.watermark.WatermarkStyle` fields for the ``cnp`` overlay.
    raw : dict
        The manifest as read (hashed into the cache name).
    path : Path or None
        The manifest file.
    """

    pair: str
    positive: ClassInfo
    negative: ClassInfo
    sizes: dict[str, int]
    resize: int
    crop: int
    label_csv: str | None
    overlay: str
    style: dict
    raw: dict = field(repr=False)
    path: Path | None = None

    @property
    def directory(self) -> Path:
        """Folder that relative paths in the manifest are resolved against."""
        return self.path.parent if self.path is not None else MANIFEST_DIR

    def default_label_csv(self) -> Path | None:
        """Absolute path of the manifest's label CSV (which may not exist yet), or None."""
        if not self.label_csv:
            return None
        return safe_join(self.directory, self.label_csv)


def known_pairs(manifest_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the pairs with a manifest in ``manifest_dir`` (default :data:`MANIFEST_DIR`)."""
    d = Path(manifest_dir) if manifest_dir is not None else MANIFEST_DIR
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json"))


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise CNPError(f"manifest {where}: {msg}")


def _class_info(obj: Any, key: str, where: str) -> ClassInfo:
    _require(isinstance(obj, Mapping), where, f"'{key}' must be an object with name, wnid, index")
    name, wnid, index = obj.get("name"), obj.get("wnid"), obj.get("index")
    _require(isinstance(name, str) and bool(name.strip()), where, f"'{key}.name' must be a non-empty string")
    _require(isinstance(wnid, str) and bool(_WNID_RE.match(wnid)), where,
             f"'{key}.wnid' must be a WordNet id like 'n02971356', got {wnid!r}")
    _require(isinstance(index, int) and not isinstance(index, bool) and 0 <= index < 1000, where,
             f"'{key}.index' must be a torchvision class index 0..999, got {index!r}")
    return ClassInfo(name=name, wnid=wnid, index=index)


def _check_sizes(sizes: Any, where: str) -> dict[str, int]:
    if not isinstance(sizes, Mapping):
        raise CNPError(f"{where}: sizes must be a mapping with keys {list(SIZE_KEYS)}")
    unknown = sorted(set(sizes) - set(SIZE_KEYS))
    if unknown:
        raise CNPError(
            f"{where}: unknown size key(s) {unknown}; use {list(SIZE_KEYS)} (train per class, "
            "drsa and rank positive images, val and test per subgroup)"
        )
    out = {}
    for k, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CNPError(f"{where}: sizes[{k!r}] must be a positive integer, got {v!r}")
        out[k] = int(v)
    return out


def manifest_from_dict(raw: Mapping[str, Any], path: str | os.PathLike | None = None) -> PairManifest:
    """Validate a manifest given as a dict (``path`` is where relative paths are resolved).

    Raises
    ------
    CNPError
        Naming the first missing or malformed field.
    """
    where = str(path) if path is not None else "(dict)"
    _require(isinstance(raw, Mapping), where, "must be a JSON object")
    _require(raw.get("schema", SCHEMA_VERSION) == SCHEMA_VERSION, where,
             f"'schema' is {raw.get('schema')!r}; this version of cnp reads schema {SCHEMA_VERSION}")
    selection = raw.get("selection", {})
    _require(isinstance(selection, Mapping), where, "'selection' must be an object")
    _require(selection.get("rule", SELECTION_RULE) == SELECTION_RULE, where,
             f"'selection.rule' is {selection.get('rule')!r}; this version of cnp implements "
             f"{SELECTION_RULE!r} (files sorted by name, then a seeded permutation)")
    pair = raw.get("pair")
    _require(isinstance(pair, str) and bool(pair.strip()), where, "'pair' must be a non-empty string")
    pos = _class_info(raw.get("positive"), "positive", where)
    neg = _class_info(raw.get("negative"), "negative", where)
    _require(pos.wnid != neg.wnid, where, "positive and negative class must differ")
    sizes = _check_sizes(raw.get("sizes"), f"manifest {where}")
    missing = [k for k in SIZE_KEYS if k not in sizes]
    _require(not missing, where, f"'sizes' lacks {missing}")
    pre = raw.get("preprocessing", {})
    _require(isinstance(pre, Mapping), where, "'preprocessing' must be an object")
    resize, crop = pre.get("resize_short_side", 256), pre.get("center_crop", 224)
    _require(isinstance(resize, int) and isinstance(crop, int) and 0 < crop <= resize, where,
             f"preprocessing needs integers 0 < center_crop <= resize_short_side, got {crop}, {resize}")
    wm = raw.get("watermark", {})
    _require(isinstance(wm, Mapping), where, "'watermark' must be an object")
    label_csv = wm.get("label_csv")
    _require(label_csv is None or (isinstance(label_csv, str) and bool(label_csv)), where,
             "'watermark.label_csv' must be a relative path or null")
    overlay = wm.get("overlay", "auto")
    _require(overlay in OVERLAYS, where, f"'watermark.overlay' must be one of {OVERLAYS}, got {overlay!r}")
    style = dict(wm.get("style", {}))
    try:
        WatermarkStyle(**style)
    except TypeError as exc:
        raise CNPError(f"manifest {where}: 'watermark.style' has unknown fields ({exc})") from exc
    return PairManifest(
        pair=pair, positive=pos, negative=neg, sizes=sizes, resize=resize, crop=crop,
        label_csv=label_csv, overlay=overlay, style=style, raw=json.loads(json.dumps(raw)),
        path=Path(path).resolve() if path is not None else None,
    )


def load_manifest(pair_or_path: str | os.PathLike) -> PairManifest:
    """Load a pair manifest by pair name (from :data:`MANIFEST_DIR`) or from a JSON file path.

    Parameters
    ----------
    pair_or_path : str or path
        ``"carton-dugong"``, ``"crate-packet"``, ``"basketball"`` or the path of a manifest.

    Raises
    ------
    CNPError
        Unknown pair (the message lists the known ones), unreadable or malformed manifest.
    """
    s = os.fspath(pair_or_path)
    candidate = Path(s)
    if candidate.suffix == ".json" or candidate.is_file() or os.sep in s:
        path = candidate
        if not path.is_file():
            raise CNPError(f"manifest file {path} does not exist; pass an existing JSON manifest path "
                           f"or a pair name ({', '.join(known_pairs()) or 'none found'})")
    else:
        path = MANIFEST_DIR / f"{s}.json"
        if not path.is_file():
            known = known_pairs()
            raise CNPError(
                f"unknown pair {s!r}; known pairs: {', '.join(known) or '(none: ' + str(MANIFEST_DIR) + ' is missing)'}. "
                "Pass one of them or manifest=<path to your own JSON manifest>."
            )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CNPError(f"could not read the manifest {path}: {exc}; fix or restore the file") from exc
    return manifest_from_dict(raw, path)


# ---------------------------------------------------------------------------- label CSV
def _norm_rel(relpath: str) -> str:
    rel = relpath.strip()
    return PurePosixPath(rel).as_posix() if rel else rel


def _check_rel_lexical(relpath: str, where: str) -> str:
    rel = _norm_rel(relpath)
    if not rel or rel == ".":
        raise CNPError(f"{where}: empty file name")
    if rel.startswith(("/", "\\")) or PurePosixPath(rel).is_absolute() or re.match(r"^[A-Za-z]:[\\/]", rel):
        raise CNPError(f"{where}: file {relpath!r} is absolute; use a path relative to the ImageNet root "
                       "such as 'train/n02971356/n02971356_123.JPEG'")
    if ".." in PurePosixPath(rel).parts:
        raise CNPError(f"{where}: file {relpath!r} contains '..'; paths must stay inside the ImageNet root")
    return rel


def _parse_wm(value: Any, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    raise CNPError(f"{where}: watermark must be 0 or 1, got {value!r}")


def read_label_csv(path: str | os.PathLike, root: str | os.PathLike) -> dict[str, int]:
    """Read a per-image watermark label CSV.

    The header is ``file,watermark`` (further columns are ignored); ``file`` is relative to the
    ImageNet root (``train/n02971356/n02971356_123.JPEG``), ``watermark`` is 0 or 1.

    Parameters
    ----------
    path : path
        The CSV file (UTF-8, a byte-order mark is accepted).
    root : path
        The ImageNet root; every file must exist inside it.

    Returns
    -------
    dict[str, int]
        ``{relative posix path: 0 or 1}``.

    Raises
    ------
    CNPError
        Missing file, wrong header, a watermark value other than 0/1, a file that is absolute,
        contains ``..``, resolves outside ``root`` (symlink) or does not exist, or one file given
        twice with different labels; the message names the row.
    """
    path = Path(path)
    if not path.is_file():
        raise CNPError(f"label CSV {path} does not exist; pass an existing file (header 'file,watermark') "
                       "or label_csv=None to build without labels")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CNPError(f"could not read the label CSV {path}: {exc}") from exc
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    cols = [c.strip().lower() for c in header] if header else []
    if "file" not in cols or "watermark" not in cols:
        raise CNPError(f"label CSV {path}: the first line must be the header 'file,watermark', got {header!r}")
    i_file, i_wm = cols.index("file"), cols.index("watermark")
    labels: dict[str, int] = {}
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"label CSV {path}, line {lineno}"
        if len(row) <= max(i_file, i_wm):
            raise CNPError(f"{where}: expected columns file,watermark, got {row!r}")
        rel = _check_rel_lexical(row[i_file], where)
        wm = _parse_wm(row[i_wm], where)
        try:
            full = safe_join(root, rel)
        except CNPError as exc:
            raise CNPError(f"{where}: {exc}") from exc
        if not full.is_file():
            raise CNPError(f"{where}: file {rel!r} does not exist under the ImageNet root {Path(root)}; "
                           "fix the row or the root")
        if rel in labels and labels[rel] != wm:
            raise CNPError(f"{where}: file {rel!r} is labelled both 0 and 1; keep one row")
        labels[rel] = wm
    return labels


def write_label_csv(
    path: str | os.PathLike,
    rows: Mapping[str, Any] | Iterable[Any],
    root: str | os.PathLike | None = None,
) -> Path:
    """Atomically write a label CSV (``file,watermark``, sorted by file).

    Parameters
    ----------
    path : path
        Output file.
    rows : mapping or iterable
        ``{file: 0/1}``, or ``(file, watermark)`` pairs, or dicts with keys ``file`` and
        ``watermark``. Files are relative to the ImageNet root.
    root : path, optional
        When given, every file is checked with :func:`cnp.io.safe_join` and must exist.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    CNPError
        Bad file names (absolute, ``..``, outside ``root``), values other than 0/1, or one file
        given twice with different labels.
    """
    items = rows.items() if isinstance(rows, Mapping) else rows
    labels: dict[str, int] = {}
    for k, item in enumerate(items):
        where = f"label row {k}"
        if isinstance(item, Mapping):
            if "file" not in item or "watermark" not in item:
                raise CNPError(f"{where}: a dict row needs keys 'file' and 'watermark', got {dict(item)!r}")
            file, wm = item["file"], item["watermark"]
        else:
            try:
                file, wm = item
            except (TypeError, ValueError) as exc:
                raise CNPError(f"{where}: expected (file, watermark), got {item!r}") from exc
        if not isinstance(file, str):
            file = os.fspath(file)
        rel = _check_rel_lexical(file, where)
        wm = _parse_wm(wm, where)
        if root is not None:
            full = safe_join(root, rel)
            if not full.is_file():
                raise CNPError(f"{where}: file {rel!r} does not exist under {Path(root)}")
        if rel in labels and labels[rel] != wm:
            raise CNPError(f"{where}: file {rel!r} is labelled both 0 and 1")
        labels[rel] = wm
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "watermark"])
    for rel in sorted(labels):
        writer.writerow([rel, labels[rel]])
    return atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------- ImageNet folders
def _list_images(folder: Path) -> list[str]:
    names = []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith(".") or Path(e.name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if e.is_file():
                names.append(e.name)
    return sorted(names)


def check_root(root: str | os.PathLike) -> Path:
    """Resolve and check an ImageNet root (must contain ``train/``).

    Raises
    ------
    CNPError
        Missing root, no ``train/`` folder (with a hint when the train folder itself was passed),
        or a flat (unarranged) ``val/`` folder.
    """
    if root is None:
        raise CNPError("no ImageNet root given; pass root=<folder containing train/<wnid>/*.JPEG>")
    r = Path(root).expanduser()
    if not r.is_dir():
        raise CNPError(f"ImageNet root {r} does not exist or is not a folder; pass the folder that "
                       "contains train/<wnid>/*.JPEG (and optionally val/<wnid>/*.JPEG)")
    r = r.resolve()
    if not (r / "train").is_dir():
        hint = ""
        try:
            if any(_WNID_RE.match(p.name) and p.is_dir() for p in r.iterdir()):
                hint = (" It holds wnid folders itself: you probably passed the train (or val) folder; "
                        f"pass its parent {r.parent} instead.")
        except OSError:
            pass
        raise CNPError(f"ImageNet root {r} has no train/ folder; pass the folder that contains "
                       f"train/<wnid>/*.JPEG (e.g. ILSVRC/Data/CLS-LOC of the Kaggle copy).{hint}")
    val = r / "val"
    if val.is_dir():
        try:
            flat = next((e.name for e in os.scandir(val)
                         if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES), None)
        except OSError:
            flat = None
        if flat is not None:
            raise CNPError(
                f"{val} holds images directly ({flat}); the validation images must be arranged in "
                "wnid folders (val/<wnid>/*.JPEG), e.g. with python -c \"import torchvision; "
                f"torchvision.datasets.ImageNet('{r}', split='val')\" (needs ILSVRC2012_img_val.tar and "
                f"ILSVRC2012_devkit_t12.tar.gz in {r}), or move {val} away to use training images only."
            )
    return r


def _class_files(root: Path, cls: ClassInfo, role: str, pair: str) -> tuple[list[str], list[str]]:
    """Relative paths of a class's train and val images (each sorted by name)."""
    tdir = root / "train" / cls.wnid
    if not tdir.is_dir():
        raise CNPError(
            f"{tdir} does not exist: class {cls.name!r} ({cls.wnid}, the {role} class of pair {pair!r}) "
            f"is missing from the ImageNet root {root}. Use a full ImageNet-1k copy or extract "
            f"{cls.wnid}.tar into {root / 'train'}."
        )
    train = [f"train/{cls.wnid}/{n}" for n in _list_images(tdir)]
    if not train:
        raise CNPError(f"{tdir} (class {cls.name!r}, {cls.wnid}) contains no images "
                       f"({'/'.join(IMAGE_SUFFIXES)}); re-extract {cls.wnid}.tar there")
    val: list[str] = []
    vroot = root / "val"
    if vroot.is_dir():
        vdir = vroot / cls.wnid
        if vdir.is_dir():
            val = [f"val/{cls.wnid}/{n}" for n in _list_images(vdir)]
        elif any(_WNID_RE.match(p.name) for p in vroot.iterdir() if p.is_dir()):
            raise CNPError(
                f"{vdir} does not exist: the validation images of class {cls.name!r} ({cls.wnid}, "
                f"the {role} class of pair {pair!r}) are missing while {vroot} has other wnid folders; "
                f"arrange the full validation set in wnid folders, or move {vroot} away."
            )
    return train, val


# ---------------------------------------------------------------------------- decoding
def _resize_crop_sizes(w: int, h: int, resize: int) -> tuple[int, int]:
    # torchvision's Resize(int) on PIL images: the short side becomes ``resize``
    if w <= h:
        return resize, int(resize * h / w)
    return int(resize * w / h), resize


def decode_image(path: str | os.PathLike, image_size: int = 224, resize: int = 256) -> torch.Tensor:
    """Decode one image: RGB, resize the short side to ``resize`` (bilinear), centre-crop.

    Equal to torchvision's ``Resize(resize)`` + ``CenterCrop(image_size)`` on a PIL image.

    Returns
    -------
    torch.Tensor
        uint8, (3, image_size, image_size).

    Raises
    ------
    CNPError
        When the file cannot be decoded (the message names it).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            ow, oh = _resize_crop_sizes(im.width, im.height, resize)
            im = im.resize((ow, oh), Image.Resampling.BILINEAR)
            top = int(round((oh - image_size) / 2.0))
            left = int(round((ow - image_size) / 2.0))
            im = im.crop((left, top, left + image_size, top + image_size))
            arr = np.array(im, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise CNPError(
            f"could not decode the image {path} ({type(exc).__name__}: {exc}). The file is corrupt or "
            "truncated: restore it from the ImageNet archive (or delete it and rebuild)."
        ) from exc
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def _decode_all(root: Path, files: Sequence[str], image_size: int, resize: int,
                show: bool, desc: str) -> torch.Tensor:
    out = torch.empty((len(files), 3, image_size, image_size), dtype=torch.uint8)
    workers = max(1, min(8, os.cpu_count() or 1))
    bar = progress_bar(total=len(files), desc=desc, unit="img", disable=not show)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, img in enumerate(pool.map(lambda f: decode_image(root / f, image_size, resize), files)):
                out[i] = img
                bar.update(1)
    finally:
        bar.close()
    return out


# ---------------------------------------------------------------------------- overlays
def imagenet_w_available() -> bool:
    """Whether the optional ``imagenet-w`` package (module ``imagenet_w``) is importable."""
    try:
        return importlib.util.find_spec("imagenet_w") is not None
    except (ImportError, ValueError):
        return False


def _imagenet_w_version() -> str:
    try:
        from importlib.metadata import version

        return version("imagenet-w")
    except Exception:  # noqa: BLE001 - metadata missing for a vendored/fake module
        return "unknown"


def _resolve_overlay(requested: str, style_given: bool) -> str:
    if requested not in OVERLAYS:
        raise CNPError(f"overlay must be one of {OVERLAYS}, got {requested!r}")
    if requested == "imagenet-w":
        if not imagenet_w_available():
            raise CNPError("overlay='imagenet-w' needs the optional package imagenet-w (pip install "
                           "imagenet-w; non-commercial license), or use overlay='cnp'")
        return "imagenet-w"
    if requested == "auto":
        return "imagenet-w" if (imagenet_w_available() and not style_given) else "cnp"
    return "cnp"


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _overlay(images: torch.Tensor, method: str, style: WatermarkStyle,
             generator: torch.Generator, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Watermark uint8 images (n, 3, S, S); return (uint8 images, bool masks (n, S, S))."""
    n, _, size, _ = images.shape
    out = images.clone()
    masks = torch.zeros((n, size, size), dtype=torch.bool)
    if n == 0:
        return out, masks
    if method == "imagenet-w":
        aw = importlib.import_module("imagenet_w").AddWatermark(size)
        opacity = float(getattr(aw, "opacity", 0.5))
        black, white = torch.zeros(3, size, size), torch.ones(3, size, size)
        diff = torch.maximum((aw(black) - black).abs().amax(0), (aw(white) - white).abs().amax(0))
        mask = diff > 0.1 * opacity
        for i in range(n):
            out[i] = _to_uint8(aw(images[i].float().div(255.0)))
        masks[:] = mask
        return out, masks
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk)
        x, m = apply_watermark(images[sl].float().div(255.0), style, generator)
        out[sl], masks[sl] = _to_uint8(x), m
    return out, masks


# ---------------------------------------------------------------------------- planning
def _subseed(pair: str, seed: int, purpose: str) -> int:
    digest = hashlib.sha256(f"{pair}|{seed}|{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _perm(n: int, pair: str, seed: int, purpose: str) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(_subseed(pair, seed, purpose))).permutation(n)


def _torch_gen(pair: str, seed: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(_subseed(pair, seed, purpose))


@dataclass
class _Row:
    file: str
    label: int
    wm: bool
    source: str  # 'csv' (label from the CSV), 'overlay' (synthetic) or 'none' (unlabelled)
    overlay: bool = False


@dataclass
class _ClassPlan:
    train: list[str]
    test_w0: list[str]
    val_w0: list[str]
    test_w1_nat: list[str]
    val_w1_nat: list[str]
    test_w1_src: list[str]
    val_w1_src: list[str]


def _plan_class(cls: ClassInfo, role: str, train_files: list[str], val_files: list[str],
                labels: Mapping[str, int], sizes: Mapping[str, int], pair: str, seed: int) -> _ClassPlan:
    n_train, n_val, n_test = sizes["train"], sizes["val"], sizes["test"]
    if len(train_files) < n_train:
        raise CNPError(
            f"class {cls.name!r} ({cls.wnid}, {role}) has {len(train_files)} images in train/{cls.wnid} "
            f"but the train split needs {n_train} per class; lower sizes['train'] well below "
            f"{len(train_files)} (held-out images for val and test come from the rest)."
        )
    order = [train_files[i] for i in _perm(len(train_files), pair, seed, f"select-train-{cls.wnid}")]
    train, unused = order[:n_train], order[n_train:]
    vorder = [val_files[i] for i in _perm(len(val_files), pair, seed, f"select-val-{cls.wnid}")]
    pool = vorder + unused
    natural = [f for f in pool if labels.get(f) == 1]
    clean = [f for f in pool if labels.get(f) == 0] + [f for f in pool if f not in labels]
    # natural watermarks shared alternately between test and val while each has room
    test_nat: list[str] = []
    val_nat: list[str] = []
    turn_test = True
    for f in natural:
        if len(test_nat) >= n_test and len(val_nat) >= n_val:
            break
        if (turn_test and len(test_nat) < n_test) or len(val_nat) >= n_val:
            test_nat.append(f)
        else:
            val_nat.append(f)
        turn_test = not turn_test
    d_test, d_val = n_test - len(test_nat), n_val - len(val_nat)
    need_clean = n_test + n_val + d_test + d_val
    if len(clean) < need_clean:
        have = len(pool)
        raise CNPError(
            f"class {cls.name!r} ({cls.wnid}, {role}): test and val need {2 * (n_test + n_val)} held-out "
            f"images ({n_test} per subgroup for test and {n_val} for val; {len(test_nat) + len(val_nat)} "
            f"labelled watermarked, {need_clean} clean or to be overlaid) but only {have} are held out "
            f"({len(vorder)} in val/{cls.wnid} and {len(unused)} train images not used by the train split; "
            f"{len(clean)} of them usable as clean). Lower sizes['test'] or sizes['val'], or lower "
            "sizes['train'] to free training images."
        )
    bounds = np.cumsum([0, n_test, n_val, d_test, d_val])
    test_w0, val_w0, test_src, val_src = (clean[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
    return _ClassPlan(train, test_w0, val_w0, test_nat, val_nat, test_src, val_src)


# ---------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """``$CNP_CACHE/imagenet`` when ``CNP_CACHE`` is set, else ``~/.cache/cnp/imagenet``."""
    env = os.environ.get("CNP_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "cnp"
    return base / "imagenet"


def _file_list_hash(root: Path, files: Iterable[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        try:
            size = (root / f).stat().st_size
        except OSError:
            size = -1
        h.update(f"{f}\t{size}\n".encode())
    return h.hexdigest()


def _check_rates(rates: Any) -> tuple[float, float] | None:
    if rates is None:
        return None
    try:
        p, q = (float(r) for r in rates)
    except (TypeError, ValueError) as exc:
        raise CNPError(f"train_overlay_rates must be (positive_rate, negative_rate), got {rates!r}") from exc
    for name, r in (("positive", p), ("negative", q)):
        if not (0.0 <= r <= 1.0) or math.isnan(r):
            raise CNPError(f"train_overlay_rates: the {name} rate must be a fraction in [0, 1], got {r}; "
                           "e.g. train_overlay_rates=(0.5, 0.05)")
    return p, q


# ---------------------------------------------------------------------------- build
def build_pair(
    pair: str,
    root: str | os.PathLike,
    seed: int = 0,
    *,
    manifest: str | os.PathLike | Mapping[str, Any] | PairManifest | None = None,
    label_csv: str | os.PathLike | None = None,
    style: WatermarkStyle | Mapping[str, Any] | None = None,
    overlay: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    image_size: int = 224,
    sizes: Mapping[str, int] | None = None,
    train_overlay_rates: Sequence[float] | None = None,
    progress: bool = True,
) -> PairData:
    """Build (or load from the cache) the splits of an ImageNet pair.

    Parameters
    ----------
    pair : str
        Pair name (``carton-dugong``, ``crate-packet``, ``basketball``); must match the manifest.
    root : path
        ImageNet root with ``train/<wnid>/*.JPEG`` and optionally ``val/<wnid>/*.JPEG``.
    seed : int
        Selection seed; the result is deterministic per ``(pair, seed)`` and inputs.
    manifest : path, dict or PairManifest, optional
        Overrides the packaged manifest ``data_manifests/<pair>.json``.
    label_csv : path, optional
        Per-image watermark labels (``file,watermark``); default: the manifest's
        ``watermark.label_csv`` when that file exists, else no labels.
    style : WatermarkStyle or dict, optional
        Overlay style (forces the ``cnp`` overlay); default: the manifest's style.
    overlay : str, optional
        ``auto`` (default from the manifest: ``imagenet-w`` when importable and no ``style``
        given, else ``cnp``), ``cnp`` or ``imagenet-w``.
    cache_dir : path, optional
        Cache folder (default :func:`default_cache_dir`).
    image_size : int
        Centre-crop side; the short side is first resized to
        ``round(image_size * resize_short_side / center_crop)`` (256 for 224).
    sizes : dict, optional
        Overrides of the manifest's split sizes (keys ``train``, ``drsa``, ``rank``, ``val``,
        ``test``).
    train_overlay_rates : (float, float), optional
        Fractions of clean train positives and negatives that get a watermark overlay.
    progress : bool
        Show a progress bar while decoding.

    Returns
    -------
    PairData
        Splits ``train``, ``drsa``, ``rank``, ``val``, ``test``; ``meta`` records the manifest,
        the classes (with torchvision indices), sizes, overlay, label source and cache file.

    Raises
    ------
    CNPError
        Unknown pair, bad manifest, bad sizes or rates, missing root/train folder/wnid folder,
        too few images for a split, a bad label CSV or a corrupt image.
    """
    # ---- inputs
    if isinstance(manifest, PairManifest):
        man = manifest
    elif isinstance(manifest, Mapping):
        man = manifest_from_dict(manifest)
    elif manifest is not None:
        man = load_manifest(Path(manifest))
    else:
        man = load_manifest(pair)
    if man.pair != pair:
        raise CNPError(f"the manifest describes pair {man.pair!r}, not {pair!r}; pass matching names")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise CNPError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise CNPError(f"image_size must be an integer >= 8, got {image_size!r}")
    sz = dict(man.sizes)
    if sizes is not None:
        sz.update(_check_sizes(sizes, "sizes"))
    rates = _check_rates(train_overlay_rates)
    if isinstance(style, Mapping):
        style = WatermarkStyle(**style)
    if style is not None and not isinstance(style, WatermarkStyle):
        raise CNPError(f"style must be a WatermarkStyle or a dict of its fields, got {type(style).__name__}")
    method = _resolve_overlay(overlay or man.overlay, style is not None)
    wm_style = style if style is not None else WatermarkStyle(**man.style)
    resize = max(image_size, int(round(image_size * man.resize / man.crop)))

    # ---- data
    r = check_root(root)
    classes = ((man.positive, "positive", 1), (man.negative, "negative", 0))
    listing = {cls.wnid: _class_files(r, cls, role, pair) for cls, role, _ in classes}
    if label_csv is not None:
        csv_path: Path | None = Path(label_csv)
        labels = read_label_csv(csv_path, r)
    else:
        csv_path = man.default_label_csv()
        if csv_path is not None and csv_path.is_file():
            labels = read_label_csv(csv_path, r)
        else:
            csv_path, labels = None, {}
    csv_sha = hashlib.sha256(csv_path.read_bytes()).hexdigest() if csv_path is not None else None

    plans = {cls.wnid: _plan_class(cls, role, *listing[cls.wnid], labels, sz, pair, seed)
             for cls, role, _ in classes}
    n_pos_train = sz["train"]
    for key in ("drsa", "rank"):
        if sz[key] > n_pos_train:
            raise CNPError(
                f"the {key} split needs {sz[key]} positive images, drawn from the train split's "
                f"{n_pos_train} positives ({man.positive.name}); lower sizes[{key!r}] or raise sizes['train']."
            )

    # ---- cache
    all_files = [f for w in listing for group in listing[w] for f in group]
    recipe = {
        "format": FORMAT_VERSION, "manifest": man.raw, "root": str(r), "seed": seed, "sizes": sz,
        "image_size": image_size, "resize": resize, "overlay": method,
        "imagenet_w": _imagenet_w_version() if method == "imagenet-w" else None,
        "style": wm_style.to_dict() if method == "cnp" else None,
        "train_overlay_rates": list(rates) if rates else None,
        "files": _file_list_hash(r, all_files), "label_csv_sha256": csv_sha,
    }
    key = recipe_hash(recipe)
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = cdir / f"{pair}-seed{seed}-{image_size}px-{key}.pt"
    if cache_file.is_file():
        try:
            data = PairData.load(cache_file)
            if data.meta.get("cache_key") != key:
                raise CNPError("its recipe hash does not match its name")
            return data
        except CNPError as exc:
            print(f"cnp: the cached pair data {cache_file} is unusable ({exc}); rebuilding it.")

    # ---- decode every needed file once
    needed: list[str] = []
    for p in plans.values():
        for group in (p.train, p.test_w0, p.val_w0, p.test_w1_nat, p.val_w1_nat, p.test_w1_src, p.val_w1_src):
            needed.extend(group)
    index = {f: i for i, f in enumerate(needed)}
    if len(index) != len(needed):  # pragma: no cover - the plan draws each file once
        raise CNPError("internal error: a file was selected twice")
    pixels = _decode_all(r, needed, image_size, resize, progress, f"decoding {pair}")

    def make_split(name: str, rows: list[_Row], pixels: torch.Tensor) -> Split:
        order = _perm(len(rows), pair, seed, f"order-{name}")
        rows = [rows[i] for i in order]
        imgs = pixels[[index[row.file] for row in rows]] if rows else pixels[:0]
        masks = torch.zeros((len(rows), image_size, image_size), dtype=torch.bool)
        ov = [i for i, row in enumerate(rows) if row.overlay]
        if ov:
            out, m = _overlay(imgs[ov], method, wm_style, _torch_gen(pair, seed, f"overlay-{name}"))
            imgs[ov], masks[ov] = out, m
        known = [not (row.wm and not row.overlay) for row in rows]
        meta = {
            "pair": pair, "split": name, "seed": seed, "files": [row.file for row in rows],
            "overlaid": [row.overlay for row in rows], "wm_source": [row.source for row in rows],
            "masks_known": all(known), "masks_known_per_image": known, "overlay": method,
            "image_size": image_size, "cache_key": key,
        }
        return Split(
            images=imgs, labels=torch.tensor([row.label for row in rows], dtype=torch.long),
            wm=torch.tensor([row.wm for row in rows], dtype=torch.bool), masks=masks, name=name, meta=meta,
        )

    def labelled(f: str, label: int) -> _Row:
        v = labels.get(f)
        return _Row(f, label, v == 1, "none" if v is None else "csv")

    train_rows: list[_Row] = []
    val_rows: list[_Row] = []
    test_rows: list[_Row] = []
    for cls, _role, label in classes:
        p = plans[cls.wnid]
        rows = [labelled(f, label) for f in p.train]
        if rates is not None:
            rate = rates[0] if label == 1 else rates[1]
            clean_idx = [i for i, row in enumerate(rows) if not row.wm]
            k = int(round(rate * len(clean_idx)))
            pick = _perm(len(clean_idx), pair, seed, f"train-overlay-{cls.wnid}")[:k]
            for j in pick:
                rows[clean_idx[j]] = _Row(rows[clean_idx[j]].file, label, True, "overlay", True)
        train_rows += rows
        for dest, w0, nat, src in ((test_rows, p.test_w0, p.test_w1_nat, p.test_w1_src),
                                   (val_rows, p.val_w0, p.val_w1_nat, p.val_w1_src)):
            dest += [_Row(f, label, False, "none" if labels.get(f) is None else "csv") for f in w0]
            dest += [_Row(f, label, True, "csv") for f in nat]
            dest += [_Row(f, label, True, "overlay", True) for f in src]

    splits = {"train": make_split("train", train_rows, pixels)}
    train = splits["train"]
    pos_idx = torch.nonzero(train.labels == 1).flatten()
    pos_idx = pos_idx[torch.from_numpy(_perm(len(pos_idx), pair, seed, "drsa-rank")).long()]
    neg_idx = torch.nonzero(train.labels == 0).flatten()
    neg_idx = neg_idx[torch.from_numpy(_perm(len(neg_idx), pair, seed, "rank-neg")).long()]
    # rank: its positives, then as many negatives (ranking_data='pos+neg'; 'pos' uses the former)
    rank_idx = torch.cat([pos_idx[len(pos_idx) - sz["rank"]:], neg_idx[: sz["rank"]]])
    for name, idx in (("drsa", pos_idx[: sz["drsa"]]), ("rank", rank_idx)):
        il = idx.tolist()
        known = [train.meta["masks_known_per_image"][i] for i in il]
        sub_meta = {k: v for k, v in train.meta.items()}
        sub_meta.update({
            "split": name, "files": [train.meta["files"][i] for i in il],
            "overlaid": [train.meta["overlaid"][i] for i in il],
            "wm_source": [train.meta["wm_source"][i] for i in il],
            "masks_known": all(known), "masks_known_per_image": known, "train_index": il,
        })
        splits[name] = Split(images=train.images[idx], labels=train.labels[idx], wm=train.wm[idx],
                             masks=train.masks[idx], name=name, meta=sub_meta)
    splits["val"] = make_split("val", val_rows, pixels)
    splits["test"] = make_split("test", test_rows, pixels)
    del pixels  # the splits hold their own copies; free the decoded pool before saving
    for name in ("val", "test"):
        counts = splits[name].counts()
        if set(counts.values()) != {sz[name]}:  # pragma: no cover - guaranteed by the plan
            raise CNPError(f"internal error: {name} is not balanced: {counts}")

    data = PairData(
        pair=pair, positive=man.positive.name, negative=man.negative.name, splits=splits,
        meta={
            "source": "imagenet", "manifest": man.raw,
            "manifest_path": str(man.path) if man.path else None,
            "classes": {"positive": man.positive.to_dict(), "negative": man.negative.to_dict()},
            "root": str(r), "seed": seed, "sizes": sz, "image_size": image_size, "resize": resize,
            "overlay": method, "style": wm_style.to_dict() if method == "cnp" else None,
            "imagenet_w_version": recipe["imagenet_w"],
            "train_overlay_rates": list(rates) if rates else None,
            "label_csv": str(csv_path) if csv_path is not None else None, "label_csv_sha256": csv_sha,
            "n_labelled": len(labels), "cache_key": key, "cache_file": str(cache_file),
            "subgroups": list(SUBGROUPS), "format": FORMAT_VERSION,
        },
    )
    data.save(cache_file)
    return data


__all__ = [
    "MANIFEST_DIR", "SIZE_KEYS", "OVERLAYS", "ClassInfo", "PairManifest", "known_pairs",
    "load_manifest", "manifest_from_dict", "read_label_csv", "write_label_csv", "check_root",
    "decode_image", "imagenet_w_available", "default_cache_dir", "build_pair",
]
