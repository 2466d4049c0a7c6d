"""The real-data path: any two classes of an image tree (ImageNet or ImageFolder layout).

A pair is described by a JSON manifest (schema in ``data_manifests/README.md``): the positive
and negative class (name, folder or WordNet id, optionally the torchvision index), the split
sizes, the preprocessing, and where watermark labels and masks come from. The paper's pairs
(carton-dugong, crate-packet, basketball) are manifests in ``data_manifests/`` at the repository
root; ``python -m cnp.data manifest`` writes one for any other pair (:mod:`cnp.data.folder`).
:func:`build_pair` turns a manifest and a local image tree into a
:class:`~cnp.data.splits.PairData` with the splits ``train``, ``drsa``, ``rank``, ``val`` and
``test``.

Folder layout
-------------
``layout: "folder"`` in the manifest: torchvision's ``ImageFolder`` tree, ``root/<class>/...``
(images anywhere below the class folder, no train/val level). A class folder's images take the
place of ``train/<wnid>`` in the split rule below; there are no ``val`` folders, so the held-out
images are the ones the train split does not use.

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

Explicit splits: a split file (``file,split[,label,watermark]``; see :func:`read_split_csv`)
named by the manifest's ``splits`` (or ``build_pair(splits=...)``) fixes which image is in which
split, in which order; nothing is selected, shuffled or overlaid then (``drsa`` and ``rank`` are
derived from ``train`` as above when the file has no rows for them). This is how an exported
benchmark (:func:`cnp.data.folder.export_pair`) reads back as the same splits.

Watermark labels: a label CSV (``file,watermark``; see :func:`read_label_csv`) when the user
passes one or the manifest names one that exists, the split file's ``watermark`` column, and the
watermark masks (an image with a mask file is watermarked); without any, every image counts as
clean. Masks (optional): PNG files ``<image stem>.mask.png`` beside the images
(``watermark.masks: "beside"``) or in a folder that mirrors the images' relative paths; they are
resized and centre-cropped exactly as the images (nearest neighbour, :func:`decode_mask`). Masks
are exact for overlaid images and for images with a mask file; for the other images labelled
watermarked they are unknown (all False) and ``split.meta['masks_known']`` is False.

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

from cnp.data.splits import SUBGROUPS, PairData, Split, subgroup_name
from cnp.data.watermark import WatermarkStyle, apply_watermark
from cnp.io import CNPError, atomic_write_text, cache_dir, load_current, recipe_hash, safe_join
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
#: Layouts of an image tree (``layout`` in a manifest): ``imagenet`` (``root/train/<wnid>/``,
#: optionally ``root/val/<wnid>/``) or ``folder`` (torchvision ``ImageFolder``: ``root/<class>/``).
LAYOUTS = ("imagenet", "folder")
#: Default name ending of a watermark mask file: ``<image stem>.mask.png``.
MASK_SUFFIX = ".mask.png"
#: Bumped whenever the split rule changes, so old caches are not reused.
FORMAT_VERSION = 2  # 2: the rank split also holds negatives
#: The selection rule this module implements (``selection.rule`` in a manifest).
SELECTION_RULE = "sorted-seeded-v1"
#: Manifest schema version written here (2: schema 1 plus the optional keys ``layout``,
#: ``root``, ``splits``, ``extra_masks``, ``<class>.folder``, ``watermark.masks`` and
#: ``watermark.mask_suffix``; ``<class>.index`` may be left out).
SCHEMA_VERSION = 2
#: Manifest schema versions read here.
SCHEMA_VERSIONS = (1, 2)

_WNID_RE = re.compile(r"^n\d{8}$")
_PART_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_SPLIT_NAMES = ("train", "drsa", "rank", "val", "test")


# ---------------------------------------------------------------------------- manifests
@dataclass(frozen=True)
class ClassInfo:
    """One class of a pair.

    Attributes
    ----------
    name : str
        Display name (``carton``).
    wnid : str or None
        WordNet id (``n02971356``); required by the ``imagenet`` layout, where it names the
        class folder.
    index : int or None
        Output index of the class in torchvision's ImageNet-1k models (0..999); only needed to
        start a binary head from an ImageNet-pretrained 1000-way head.
    folder : str or None
        The class folder under the root in the ``folder`` layout (None in the ``imagenet``
        layout, where the folder is the wnid).
    """

    name: str
    wnid: str | None
    index: int | None
    folder: str | None = None

    @property
    def key(self) -> str:
        """The class folder's name (the wnid in the ``imagenet`` layout); it also seeds the
        class's selection, so a pair's splits do not depend on the display name."""
        return self.folder if self.folder is not None else str(self.wnid)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "wnid": self.wnid, "index": self.index}
        if self.folder is not None:
            d["folder"] = self.folder
        return d


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
    layout : str
        ``imagenet`` or ``folder`` (see :data:`LAYOUTS`).
    root : str or None
        The image tree relative to the manifest's folder (``"."``: the manifest sits in it),
        used when no root is passed.
    masks : str or None
        ``"beside"`` (mask files next to the images), a folder relative to the manifest's folder
        that mirrors the images' relative paths, or None (no masks).
    mask_suffix : str
        Name ending of a mask file: ``<image stem><mask_suffix>`` (default ``.mask.png``).
    splits : str or None
        Split file (``file,split[,label,watermark]``) relative to the manifest's folder.
    extra_masks : dict[str, str]
        Part name -> folder (relative to the manifest's folder, mirroring the images' paths) of
        further part masks (``Split.extra_masks``, e.g. ``ball`` for ``ablate="mask:ball"``).
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
    layout: str = "imagenet"
    root: str | None = None
    masks: str | None = None
    mask_suffix: str = MASK_SUFFIX
    splits: str | None = None
    extra_masks: dict[str, str] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        """Folder that relative paths in the manifest are resolved against."""
        return self.path.parent if self.path is not None else MANIFEST_DIR

    def default_label_csv(self) -> Path | None:
        """Absolute path of the manifest's label CSV (which may not exist yet), or None."""
        if not self.label_csv:
            return None
        return safe_join(self.directory, self.label_csv)

    def root_dir(self) -> Path | None:
        """Absolute path of the manifest's ``root`` (inside the manifest's folder), or None."""
        return safe_join(self.directory, self.root) if self.root else None

    def mask_dir(self) -> Path | str | None:
        """``"beside"``, the absolute mask folder (inside the manifest's folder), or None."""
        if self.masks is None or self.masks == "beside":
            return self.masks
        return safe_join(self.directory, self.masks)

    def splits_file(self) -> Path | None:
        """Absolute path of the manifest's split file (inside the manifest's folder), or None."""
        return safe_join(self.directory, self.splits) if self.splits else None

    def extra_mask_dirs(self) -> dict[str, Path]:
        """Part name -> absolute folder of its masks (inside the manifest's folder)."""
        return {part: safe_join(self.directory, d) for part, d in self.extra_masks.items()}


def known_pairs(manifest_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the pairs with a manifest in ``manifest_dir`` (default :data:`MANIFEST_DIR`)."""
    d = Path(manifest_dir) if manifest_dir is not None else MANIFEST_DIR
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json"))


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise CNPError(f"manifest {where}: {msg}")


def is_folder_name(name: Any) -> bool:
    """Whether ``name`` can name a class folder: one path component, not hidden, not ``..``."""
    return (isinstance(name, str) and bool(name.strip()) and name == name.strip() and "/" not in name
            and "\\" not in name and not name.startswith(".") and "\0" not in name)


def _class_info(obj: Any, key: str, where: str, layout: str = "imagenet") -> ClassInfo:
    what = "name, wnid (and optionally index)" if layout == "imagenet" else "name, folder (and optionally wnid, index)"
    _require(isinstance(obj, Mapping), where, f"'{key}' must be an object with {what}")
    name, wnid, index, folder = obj.get("name"), obj.get("wnid"), obj.get("index"), obj.get("folder")
    _require(isinstance(name, str) and bool(name.strip()), where, f"'{key}.name' must be a non-empty string")
    if layout == "imagenet" or wnid is not None:
        _require(isinstance(wnid, str) and bool(_WNID_RE.match(wnid)), where,
                 f"'{key}.wnid' must be a WordNet id like 'n02971356', got {wnid!r}"
                 + (" (the imagenet layout names the class folders train/<wnid>/; use layout 'folder' "
                    "for other folder names)" if layout == "imagenet" else ""))
    _require(index is None or (isinstance(index, int) and not isinstance(index, bool) and 0 <= index < 1000), where,
             f"'{key}.index' must be a torchvision class index 0..999 (or left out), got {index!r}")
    if layout == "folder":
        _require(is_folder_name(folder), where,
                 f"'{key}.folder' must name the class's folder under the root (one path component, "
                 f"e.g. 'tulips'), got {folder!r}")
    else:
        _require(folder is None or folder == wnid, where,
                 f"'{key}.folder' must equal the wnid in the imagenet layout, got {folder!r}; use "
                 "layout 'folder' for a tree root/<class>/")
        folder = None
    return ClassInfo(name=name, wnid=wnid, index=index, folder=folder)


def _opt_relpath(value: Any, key: str, where: str) -> str | None:
    _require(value is None or (isinstance(value, str) and bool(value.strip())), where,
             f"'{key}' must be a path relative to the manifest's folder, or null; got {value!r}")
    return value


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
    _require(raw.get("schema", SCHEMA_VERSION) in SCHEMA_VERSIONS, where,
             f"'schema' is {raw.get('schema')!r}; this version of cnp reads schemas "
             f"{', '.join(map(str, SCHEMA_VERSIONS))}")
    layout = raw.get("layout", "imagenet")
    _require(layout in LAYOUTS, where, f"'layout' must be one of {LAYOUTS}, got {layout!r}")
    selection = raw.get("selection", {})
    _require(isinstance(selection, Mapping), where, "'selection' must be an object")
    _require(selection.get("rule", SELECTION_RULE) == SELECTION_RULE, where,
             f"'selection.rule' is {selection.get('rule')!r}; this version of cnp implements "
             f"{SELECTION_RULE!r} (files sorted by name, then a seeded permutation)")
    pair = raw.get("pair")
    _require(isinstance(pair, str) and bool(pair.strip()), where, "'pair' must be a non-empty string")
    _require(is_folder_name(pair), where, f"'pair' {pair!r} must be a name without '/' or '\\' that does not "
             "start with '.' (it names cache files)")
    pos = _class_info(raw.get("positive"), "positive", where, layout)
    neg = _class_info(raw.get("negative"), "negative", where, layout)
    _require(pos.key != neg.key, where, "positive and negative class must differ")
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
    masks = _opt_relpath(wm.get("masks"), "watermark.masks", where)
    mask_suffix = wm.get("mask_suffix", MASK_SUFFIX)
    _require(isinstance(mask_suffix, str) and mask_suffix.lower().endswith(".png") and "/" not in mask_suffix,
             where, f"'watermark.mask_suffix' must be a file name ending in .png such as '.mask.png', "
                    f"got {mask_suffix!r}")
    _require(masks != "beside" or mask_suffix.lower() not in IMAGE_SUFFIXES, where,
             f"'watermark.mask_suffix' {mask_suffix!r} cannot tell masks beside the images from images; "
             "use a longer ending such as '.mask.png'")
    extra = raw.get("extra_masks", {})
    _require(isinstance(extra, Mapping) and all(isinstance(k, str) and _PART_RE.match(k) for k in extra), where,
             "'extra_masks' must map part names (letters, digits, _ or -) to mask folders")
    extra = {k: _opt_relpath(v, f"extra_masks.{k}", where) for k, v in extra.items()}
    _require(all(v is not None for v in extra.values()), where, "'extra_masks' folders must not be null")
    return PairManifest(
        pair=pair, positive=pos, negative=neg, sizes=sizes, resize=resize, crop=crop,
        label_csv=label_csv, overlay=overlay, style=style, raw=json.loads(json.dumps(raw)),
        path=Path(path).resolve() if path is not None else None, layout=layout,
        root=_opt_relpath(raw.get("root"), "root", where), masks=masks, mask_suffix=mask_suffix,
        splits=_opt_relpath(raw.get("splits"), "splits", where), extra_masks=extra,
    )


def is_manifest_path(pair_or_path: str | os.PathLike) -> bool:
    """Whether ``pair_or_path`` names a manifest file rather than a packaged pair.

    A path: an ``os.PathLike``, a string ending in ``.json``, containing a path separator, or
    naming an existing file.
    """
    if not isinstance(pair_or_path, str):
        return True
    s = pair_or_path
    return s.endswith(".json") or "/" in s or os.sep in s or Path(s).is_file()


def load_manifest(pair_or_path: str | os.PathLike) -> PairManifest:
    """Load a pair manifest by pair name (from :data:`MANIFEST_DIR`) or from a JSON file path.

    Parameters
    ----------
    pair_or_path : str or path
        ``"carton-dugong"``, ``"crate-packet"``, ``"basketball"`` or the path of a manifest
        (see :func:`is_manifest_path`).

    Raises
    ------
    CNPError
        Unknown pair (the message lists the known ones), unreadable or malformed manifest.
    """
    s = os.fspath(pair_or_path)
    candidate = Path(s)
    if is_manifest_path(pair_or_path) or candidate.suffix == ".json":
        path = candidate.expanduser()
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


def _open_csv(path: Path, what: str, required: tuple[str, ...], missing_fix: str, header_rule: str):
    """A CSV reader after its header, the header and its lower-cased column names; CNPError
    (naming ``what``) for a missing or unreadable file or a header without ``required``."""
    if not path.is_file():
        raise CNPError(f"{what} {path} does not exist; {missing_fix}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CNPError(f"could not read the {what} {path}: {exc}") from exc
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    cols = [c.strip().lower() for c in header] if header else []
    if any(c not in cols for c in required):
        raise CNPError(f"{what} {path}: {header_rule}, got {header!r}")
    return reader, header, cols


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
    reader, header, cols = _open_csv(
        path, "label CSV", ("file", "watermark"),
        "pass an existing file (header 'file,watermark') or label_csv=None to build without labels",
        "the first line must be the header 'file,watermark'")
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


# ---------------------------------------------------------------------------- split file
@dataclass
class SplitTable:
    """An explicit split file, as read by :func:`read_split_csv`.

    Attributes
    ----------
    rows : dict[str, list[str]]
        Split name -> its files (relative to the root), in the file's order.
    labels : dict[str, int]
        File -> class label (1 = positive) where the ``label`` column gives one.
    watermark : dict[str, int]
        File -> watermark label (0 or 1) where the ``watermark`` column gives one.
    """

    rows: dict[str, list[str]]
    labels: dict[str, int]
    watermark: dict[str, int]


def read_split_csv(path: str | os.PathLike, root: str | os.PathLike) -> SplitTable:
    """Read a split file: which image is in which split, in which order.

    The header has ``file`` and ``split`` and optionally ``label`` (1 = positive class, 0 =
    negative; checked against the image's class folder) and ``watermark`` (0 or 1, merged with the
    label CSV); further columns are ignored. ``file`` is relative to the root, ``split`` is one of
    ``train``, ``drsa``, ``rank``, ``val``, ``test``. Rows of one split keep their order; a file
    may be in several splits (``drsa`` and ``rank`` are usually subsets of ``train``) but only
    once per split. ``train``, ``val`` and ``test`` must have rows; without ``drsa`` or ``rank``
    rows, those splits are derived from ``train`` (see :func:`build_pair`).

    Raises
    ------
    CNPError
        Missing file, wrong header, an unknown split, a bad label, a file that escapes the root or
        does not exist, a file twice in one split or with two different labels; the message names
        the row.
    """
    path = Path(path)
    reader, header, cols = _open_csv(
        path, "split file", ("file", "split"),
        "pass an existing file (header 'file,split') or remove 'splits' from the manifest to select the "
        "splits by the seeded rule",
        "the first line must be a header with the columns file,split (and optionally label,watermark)")
    i_file, i_split = cols.index("file"), cols.index("split")
    i_label = cols.index("label") if "label" in cols else None
    i_wm = cols.index("watermark") if "watermark" in cols else None
    need = max(i for i in (i_file, i_split, i_label, i_wm) if i is not None)
    rows: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    labels: dict[str, int] = {}
    wm: dict[str, int] = {}
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"split file {path}, line {lineno}"
        if len(row) <= need:
            raise CNPError(f"{where}: expected columns {','.join(c for c in cols if c)}, got {row!r}")
        rel = _check_rel_lexical(row[i_file], where)
        split = row[i_split].strip()
        if split not in _SPLIT_NAMES:
            raise CNPError(f"{where}: unknown split {split!r}; use one of {', '.join(_SPLIT_NAMES)}")
        try:
            full = safe_join(root, rel)
        except CNPError as exc:
            raise CNPError(f"{where}: {exc}") from exc
        if not full.is_file():
            raise CNPError(f"{where}: file {rel!r} does not exist under the root {Path(root)}; fix the row or the root")
        if rel in seen.setdefault(split, set()):
            raise CNPError(f"{where}: file {rel!r} is listed twice in the {split} split; keep one row")
        seen[split].add(rel)
        rows.setdefault(split, []).append(rel)
        for col, store, what in ((i_label, labels, "label"), (i_wm, wm, "watermark")):
            if col is None or not row[col].strip():
                continue
            try:
                v = _parse_wm(row[col], where)
            except CNPError:
                raise CNPError(f"{where}: {what} must be 0 or 1, got {row[col]!r}") from None
            if store.get(rel, v) != v:
                raise CNPError(f"{where}: file {rel!r} has {what} {store[rel]} in an earlier row and {v} here")
            store[rel] = v
    missing = [k for k in ("train", "val", "test") if not rows.get(k)]
    if missing:
        raise CNPError(f"split file {path} has no rows for {', '.join(missing)}; train, val and test are "
                       "required (drsa and rank are derived from train when left out)")
    return SplitTable(rows=rows, labels=labels, watermark=wm)


def write_split_csv(path: str | os.PathLike, rows: Iterable[Sequence[Any]]) -> Path:
    """Atomically write a split file ``file,split,label,watermark`` (rows in the given order).

    Parameters
    ----------
    path : path
        Output file.
    rows : iterable of (file, split, label, watermark)
        ``file`` relative to the root; ``split`` one of ``train``, ``drsa``, ``rank``, ``val``,
        ``test``; ``label`` 1 (positive) or 0; ``watermark`` 0 or 1.

    Raises
    ------
    CNPError
        A bad file name, split or label.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "split", "label", "watermark"])
    for k, row in enumerate(rows):
        where = f"split row {k}"
        try:
            file, split, label, wm = row
        except (TypeError, ValueError) as exc:
            raise CNPError(f"{where}: expected (file, split, label, watermark), got {row!r}") from exc
        if split not in _SPLIT_NAMES:
            raise CNPError(f"{where}: unknown split {split!r}; use one of {', '.join(_SPLIT_NAMES)}")
        writer.writerow([_check_rel_lexical(os.fspath(file), where), split, _parse_wm(label, where),
                         _parse_wm(wm, where)])
    return atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------- image folders
def _is_mask_name(name: str, suffix: str) -> bool:
    return name.lower().endswith(suffix.lower())


def _list_images(folder: Path, recursive: bool = False, mask_suffix: str | None = None) -> list[str]:
    """Image file names in ``folder`` (relative posix paths when ``recursive``), sorted.

    Hidden files and folders are skipped, and so are mask files (names ending in ``mask_suffix``,
    or in :data:`MASK_SUFFIX` when ``mask_suffix`` is None).
    """
    skip = mask_suffix or MASK_SUFFIX
    names = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = Path(dirpath).relative_to(folder)
            for n in filenames:
                if n.startswith(".") or Path(n).suffix.lower() not in IMAGE_SUFFIXES or _is_mask_name(n, skip):
                    continue
                if (Path(dirpath) / n).is_file():
                    names.append((rel_dir / n).as_posix())
        return sorted(names)
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith(".") or Path(e.name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if _is_mask_name(e.name, skip):
                continue
            if e.is_file():
                names.append(e.name)
    return sorted(names)


def _mask_names(folder: Path, recursive: bool) -> list[str]:
    """Names of files ending in :data:`MASK_SUFFIX` in ``folder`` (at most a few, for messages)."""
    found = []
    walker = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for dirpath, _dirs, filenames in walker:
        found += [str(Path(dirpath) / n) for n in filenames if _is_mask_name(n, MASK_SUFFIX)]
        if found:
            break
    return found[:3]


def check_root(root: str | os.PathLike, layout: str = "imagenet") -> Path:
    """Resolve and check the root of an image tree.

    Parameters
    ----------
    root : path
        ImageNet layout: the folder that contains ``train/`` (and optionally ``val/``); folder
        layout: the folder that contains one folder per class.
    layout : str
        ``imagenet`` or ``folder``.

    Raises
    ------
    CNPError
        Missing root; in the ImageNet layout no ``train/`` folder (with a hint when the train
        folder itself was passed) or a flat (unarranged) ``val/`` folder.
    """
    if layout not in LAYOUTS:
        raise CNPError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "folder":
        if root is None or os.fspath(root) == "":
            raise CNPError("no data root given; pass the folder that holds one folder per class "
                           "(root/<class>/*.jpg), e.g. data_root=... or root=...")
        r = Path(root).expanduser()
        if not r.is_dir():
            raise CNPError(f"data root {r} does not exist or is not a folder; pass the folder that holds "
                           "one folder per class (root/<class>/*.jpg)")
        return r.resolve()
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


def _folder_class_files(root: Path, cls: ClassInfo, role: str, pair: str,
                        mask_suffix: str | None) -> list[str]:
    cdir = root / cls.key
    if not cdir.is_dir():
        import difflib

        try:
            there = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            there = []
        close = difflib.get_close_matches(cls.key, there, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if (root / "train").is_dir() and cls.key not in there:
            hint += " The root has a train/ folder: if it is an ImageNet tree, use layout 'imagenet'."
        raise CNPError(
            f"{cdir} does not exist: class {cls.name!r} (folder {cls.key!r}, the {role} class of pair {pair!r}) "
            f"is missing from the data root {root}{hint}. Class folders there: "
            f"{', '.join(there[:20]) or '(none)'}{' ...' if len(there) > 20 else ''}."
        )
    files = [f"{cls.key}/{n}" for n in _list_images(cdir, recursive=True, mask_suffix=mask_suffix)]
    if not files:
        raise CNPError(f"{cdir} (class {cls.name!r}, the {role} class of pair {pair!r}) contains no images "
                       f"({'/'.join(IMAGE_SUFFIXES)}, case-insensitive, hidden files skipped); put the "
                       "class's images there or choose another class")
    if mask_suffix is None:
        strays = _mask_names(cdir, recursive=True)
        if strays:
            raise CNPError(f"{strays[0]} looks like a watermark mask beside the images of class {cls.name!r}, "
                           "but the manifest does not read masks beside the images: set watermark.masks to "
                           "\"beside\" (python -m cnp.data manifest ... --masks beside) or move the masks away")
    return files


def _class_files(root: Path, cls: ClassInfo, role: str, pair: str, layout: str = "imagenet",
                 mask_suffix: str | None = None) -> tuple[list[str], list[str]]:
    """Relative paths of a class's train and val images (each sorted by name).

    In the folder layout, every image of the class folder (searched recursively) counts as a
    training file and there are no val files. ``mask_suffix``: the name ending of masks beside
    the images (None: masks are not read beside the images, and a file that looks like one is an
    error).
    """
    if layout == "folder":
        return _folder_class_files(root, cls, role, pair, mask_suffix), []
    tdir = root / "train" / cls.key
    if not tdir.is_dir():
        raise CNPError(
            f"{tdir} does not exist: class {cls.name!r} ({cls.wnid}, the {role} class of pair {pair!r}) "
            f"is missing from the ImageNet root {root}. Use a full ImageNet-1k copy or extract "
            f"{cls.wnid}.tar into {root / 'train'}."
        )
    train = [f"train/{cls.wnid}/{n}" for n in _list_images(tdir, mask_suffix=mask_suffix)]
    if not train:
        raise CNPError(f"{tdir} (class {cls.name!r}, {cls.wnid}) contains no images "
                       f"({'/'.join(IMAGE_SUFFIXES)}); re-extract {cls.wnid}.tar there")
    if mask_suffix is None:
        strays = _mask_names(tdir, recursive=False)
        if strays:
            raise CNPError(f"{strays[0]} looks like a watermark mask beside the images of class {cls.name!r}, "
                           "but the manifest does not read masks beside the images: set watermark.masks to "
                           "\"beside\" (python -m cnp.data manifest ... --masks beside) or move the masks away")
    val: list[str] = []
    vroot = root / "val"
    if vroot.is_dir():
        vdir = vroot / cls.wnid
        if vdir.is_dir():
            val = [f"val/{cls.wnid}/{n}" for n in _list_images(vdir, mask_suffix=mask_suffix)]
        elif any(_WNID_RE.match(p.name) for p in vroot.iterdir() if p.is_dir()):
            raise CNPError(
                f"{vdir} does not exist: the validation images of class {cls.name!r} ({cls.wnid}, "
                f"the {role} class of pair {pair!r}) are missing while {vroot} has other wnid folders; "
                f"arrange the full validation set in wnid folders, or move {vroot} away."
            )
    return train, val


def list_class_files(manifest: PairManifest, root: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Every image file of the pair's two classes, relative to the root.

    Parameters
    ----------
    manifest : PairManifest
        The pair (its ``layout`` says where the class folders are).
    root : path, optional
        The image tree (default: the manifest's ``root``).

    Returns
    -------
    dict
        ``{"positive": [...], "negative": [...]}``, each sorted (ImageNet layout: ``train/``
        files, then ``val/`` files).

    Raises
    ------
    CNPError
        A missing root or class folder, or a class folder without images.
    """
    r = check_root(root if root is not None else manifest.root_dir(), manifest.layout)
    suffix = manifest.mask_suffix if manifest.masks == "beside" else None
    out = {}
    for cls, role in ((manifest.positive, "positive"), (manifest.negative, "negative")):
        train, val = _class_files(r, cls, role, manifest.pair, manifest.layout, suffix)
        out[role] = train + val
    return out


def _mask_file(base: Path, rel: str, suffix: str) -> Path:
    p = PurePosixPath(rel)
    return base.joinpath(*p.parent.parts, p.stem + suffix)


def find_masks(files: Iterable[str], root: Path, masks: str | os.PathLike | None,
               suffix: str = MASK_SUFFIX) -> dict[str, Path]:
    """The mask file of each image that has one.

    Parameters
    ----------
    files : iterable of str
        Images relative to ``root``.
    root : Path
        The image tree.
    masks : ``"beside"``, path or None
        ``"beside"``: ``<image folder>/<image stem><suffix>``; a folder: the same relative path
        below it (``<masks>/<relative image folder>/<image stem><suffix>``); None: no masks.
    suffix : str
        Name ending of a mask file.

    Returns
    -------
    dict[str, Path]
        Image (relative) -> mask file, for the images whose mask file exists.

    Raises
    ------
    CNPError
        A mask folder that does not exist, or two images whose mask file would be the same.
    """
    if masks is None:
        return {}
    if isinstance(masks, str) and masks == "beside":
        base = root
    else:
        base = Path(masks).expanduser()
        if not base.is_dir():
            raise CNPError(f"mask folder {base} does not exist; create it (masks mirror the images' relative "
                           "paths: <mask folder>/<class>/<image stem>.mask.png) or drop the masks setting")
    out: dict[str, Path] = {}
    owner: dict[Path, str] = {}
    for f in files:
        m = _mask_file(base, f, suffix)
        if m in owner:
            raise CNPError(f"images {owner[m]!r} and {f!r} would share the mask file {m}; rename one of them "
                           "(a mask is named after its image's name without the extension)")
        owner[m] = f
        if m.is_file():
            out[f] = m
    return out


def _paths_hash(paths: Mapping[str, Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(paths):
        try:
            size = paths[f].stat().st_size
        except OSError:
            size = -1
        h.update(f"{f}\t{paths[f]}\t{size}\n".encode())
    return h.hexdigest()


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


def decode_mask(path: str | os.PathLike, image_size: int = 224, resize: int = 256,
                like: str | os.PathLike | None = None) -> torch.Tensor:
    """Decode a mask PNG exactly as :func:`decode_image` decodes its image, nearest neighbour.

    The mask is converted to 8-bit grey (any PIL mode: ``1``, ``L``, ``P``, ``RGB`` ...); a pixel
    belongs to the watermark (or part) where the grey value is above 127. The short side is resized
    to ``resize`` with nearest-neighbour interpolation and the centre ``image_size`` square is cut
    out, with the same sizes and offsets as the image's.

    Parameters
    ----------
    path : path
        The mask file.
    image_size, resize : int
        As for :func:`decode_image`.
    like : path, optional
        The image the mask belongs to; its size must equal the mask's.

    Returns
    -------
    torch.Tensor
        bool, (image_size, image_size).

    Raises
    ------
    CNPError
        An unreadable mask, or a mask whose size differs from its image's.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if like is not None:
                with Image.open(like) as ref:
                    ref_size = ref.size
                if ref_size != im.size:
                    raise CNPError(f"the mask {path} is {im.size[0]}x{im.size[1]} pixels but its image {like} is "
                                   f"{ref_size[0]}x{ref_size[1]}; a mask must have its image's size")
            im = im.convert("L")
            ow, oh = _resize_crop_sizes(im.width, im.height, resize)
            im = im.resize((ow, oh), Image.Resampling.NEAREST)
            top = int(round((oh - image_size) / 2.0))
            left = int(round((ow - image_size) / 2.0))
            im = im.crop((left, top, left + image_size, top + image_size))
            arr = np.array(im, dtype=np.uint8) > 127
    except CNPError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise CNPError(f"could not decode the mask {path} ({type(exc).__name__}: {exc}); write it again as a "
                       "PNG of its image's size (watermark pixels white, the rest black)") from exc
    return torch.from_numpy(np.ascontiguousarray(arr))


@dataclass
class _Decoded:
    pixels: torch.Tensor                                   # uint8 (n, 3, S, S)
    masks: dict[int, torch.Tensor]                         # file index -> bool (S, S), where a mask file exists
    parts: dict[str, dict[int, torch.Tensor]]              # part -> file index -> bool (S, S)


def _decode_all(root: Path, files: Sequence[str], image_size: int, resize: int,
                show: bool, desc: str, masks: Mapping[str, Path] | None = None,
                parts: Mapping[str, Mapping[str, Path]] | None = None) -> _Decoded:
    masks = masks or {}
    parts = parts or {}
    out = torch.empty((len(files), 3, image_size, image_size), dtype=torch.uint8)
    res = _Decoded(out, {}, {p: {} for p in parts})
    workers = max(1, min(8, os.cpu_count() or 1))
    bar = progress_bar(total=len(files), desc=desc, unit="img", disable=not show)

    def work(f: str):
        img = decode_image(root / f, image_size, resize)
        m = decode_mask(masks[f], image_size, resize, like=root / f) if f in masks else None
        pm = {p: decode_mask(d[f], image_size, resize, like=root / f) for p, d in parts.items() if f in d}
        return img, m, pm

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, (img, m, pm) in enumerate(pool.map(work, files)):
                out[i] = img
                if m is not None:
                    res.masks[i] = m
                for p, v in pm.items():
                    res.parts[p][i] = v
                bar.update(1)
    finally:
        bar.close()
    return res


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
    where = f"train/{cls.key}" if cls.folder is None else f"{cls.key}/"
    if len(train_files) < n_train:
        raise CNPError(
            f"class {cls.name!r} ({cls.key}, {role}) has {len(train_files)} images in {where} "
            f"but the train split needs {n_train} per class; lower sizes['train'] well below "
            f"{len(train_files)} (held-out images for val and test come from the rest)."
        )
    order = [train_files[i] for i in _perm(len(train_files), pair, seed, f"select-train-{cls.key}")]
    train, unused = order[:n_train], order[n_train:]
    vorder = [val_files[i] for i in _perm(len(val_files), pair, seed, f"select-val-{cls.key}")]
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
        held = (f"{len(unused)} images of {where} not used by the train split" if cls.folder is not None else
                f"{len(vorder)} in val/{cls.key} and {len(unused)} train images not used by the train split")
        raise CNPError(
            f"class {cls.name!r} ({cls.key}, {role}): test and val need {2 * (n_test + n_val)} held-out "
            f"images ({n_test} per subgroup for test and {n_val} for val; {len(test_nat) + len(val_nat)} "
            f"labelled watermarked, {need_clean} clean or to be overlaid) but only {have} are held out "
            f"({held}; {len(clean)} of them usable as clean). Lower sizes['test'] or sizes['val'], or lower "
            "sizes['train'] to free training images."
        )
    bounds = np.cumsum([0, n_test, n_val, d_test, d_val])
    test_w0, val_w0, test_src, val_src = (clean[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
    return _ClassPlan(train, test_w0, val_w0, test_nat, val_nat, test_src, val_src)


# ---------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """``$CNP_CACHE/imagenet`` when ``CNP_CACHE`` is set, else ``~/.cache/cnp/imagenet``."""
    return cache_dir() / "imagenet"


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
def _resolve_manifest(pair: str | os.PathLike,
                      manifest: str | os.PathLike | Mapping[str, Any] | PairManifest | None) -> PairManifest:
    if isinstance(manifest, PairManifest):
        man = manifest
    elif isinstance(manifest, Mapping):
        man = manifest_from_dict(manifest)
    elif manifest is not None:
        man = load_manifest(Path(manifest))
    else:
        return load_manifest(pair)  # a packaged pair's name, or any manifest file
    if man.pair != os.fspath(pair):
        raise CNPError(f"the manifest describes pair {man.pair!r}, not {os.fspath(pair)!r}; pass matching names")
    return man


def _derive_from_train(train: Split, names: Sequence[str], sz: Mapping[str, int], pair: str, seed: int) -> dict[str, Split]:
    """``drsa`` (the first ``sz['drsa']`` train positives in a seeded order) and ``rank`` (the
    last ``sz['rank']`` of them, then the first ``sz['rank']`` train negatives in a seeded order)."""
    pos_idx = torch.nonzero(train.labels == 1).flatten()
    pos_idx = pos_idx[torch.from_numpy(_perm(len(pos_idx), pair, seed, "drsa-rank")).long()]
    neg_idx = torch.nonzero(train.labels == 0).flatten()
    neg_idx = neg_idx[torch.from_numpy(_perm(len(neg_idx), pair, seed, "rank-neg")).long()]
    # rank: its positives, then as many negatives (ranking_data='pos+neg'; 'pos' uses the former)
    rank_idx = torch.cat([pos_idx[len(pos_idx) - sz["rank"]:], neg_idx[: sz["rank"]]])
    out = {}
    for name, idx in (("drsa", pos_idx[: sz["drsa"]]), ("rank", rank_idx)):
        if name not in names:
            continue
        il = idx.tolist()
        known = [train.meta["masks_known_per_image"][i] for i in il]
        sub_meta = {k: v for k, v in train.meta.items()}
        sub_meta.update({
            "split": name, "files": [train.meta["files"][i] for i in il],
            "overlaid": [train.meta["overlaid"][i] for i in il],
            "wm_source": [train.meta["wm_source"][i] for i in il],
            "masks_known": all(known), "masks_known_per_image": known, "train_index": il,
        })
        out[name] = Split(images=train.images[idx], labels=train.labels[idx], wm=train.wm[idx],
                          masks=train.masks[idx], name=name, meta=sub_meta,
                          extra_masks={k: v[idx] for k, v in train.extra_masks.items()})
    return out


def _check_table(table: SplitTable, split_path: Path, cls_of: Mapping[str, int], labels: Mapping[str, int],
                 man: PairManifest) -> None:
    """The split file's images belong to the pair's classes and val/test have every subgroup."""
    pos, neg = man.positive, man.negative
    for split, files in table.rows.items():
        for f in files:
            if f not in cls_of:
                raise CNPError(
                    f"split file {split_path}: {f!r} (split {split}) is not an image of the positive class "
                    f"({pos.key}) or the negative class ({neg.key}) of pair {man.pair!r}; list only images of "
                    "the two class folders"
                )
            if f in table.labels and table.labels[f] != cls_of[f]:
                role = "positive" if cls_of[f] == 1 else "negative"
                raise CNPError(f"split file {split_path}: {f!r} has label {table.labels[f]} but lies in the folder "
                               f"of the {role} class (label {cls_of[f]}); fix the label column")
    train_labels = {cls_of[f] for f in table.rows["train"]}
    if train_labels != {0, 1}:
        raise CNPError(f"the train split of {split_path} holds only {'positive' if 1 in train_labels else 'negative'} "
                       "images; it needs images of both classes")
    for name in ("val", "test"):
        present = {subgroup_name(cls_of[f], labels.get(f) == 1) for f in table.rows[name]}
        missing = [g for g in SUBGROUPS if g not in present]
        if missing:
            raise CNPError(
                f"the {name} split of {split_path} has no image in subgroup(s) {', '.join(missing)} (c: class, 1 = "
                "positive; w: watermark); the evaluation needs every subgroup (c0w1 is the OOD one): add such "
                "images or label their watermarks (label CSV, watermark column or masks)"
            )


def build_pair(
    pair: str | os.PathLike,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    manifest: str | os.PathLike | Mapping[str, Any] | PairManifest | None = None,
    label_csv: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    splits: str | os.PathLike | None = None,
    style: WatermarkStyle | Mapping[str, Any] | None = None,
    overlay: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    sizes: Mapping[str, int] | None = None,
    train_overlay_rates: Sequence[float] | None = None,
    progress: bool = True,
) -> PairData:
    """Build (or load from the cache) the splits of a pair of classes of an image tree.

    Parameters
    ----------
    pair : str or path
        A packaged pair's name (``carton-dugong``, ``crate-packet``, ``basketball``) or the path
        of any manifest (e.g. one written by ``python -m cnp.data manifest``); with
        ``manifest=`` given, the name the manifest must have.
    root : path, optional
        The image tree: ImageNet layout ``train/<wnid>/*.JPEG`` and optionally
        ``val/<wnid>/*.JPEG``; folder layout ``<class>/*.jpg``. Default: the manifest's ``root``.
    seed : int
        Selection seed; the result is deterministic per ``(pair, seed)`` and inputs.
    manifest : path, dict or PairManifest, optional
        Overrides the packaged manifest ``data_manifests/<pair>.json``.
    label_csv : path, optional
        Per-image watermark labels (``file,watermark``); default: the manifest's
        ``watermark.label_csv`` when that file exists, else no labels.
    masks : ``"beside"`` or path, optional
        Watermark masks (default: the manifest's ``watermark.masks``): ``"beside"`` reads
        ``<image stem>.mask.png`` next to each image, a folder the same relative paths below it.
        An image with a mask file counts as watermarked.
    splits : path, optional
        A split file (``file,split[,label,watermark]``, :func:`read_split_csv`; default: the
        manifest's ``splits``): its splits are used as they are (no selection, shuffle or overlay).
    style : WatermarkStyle or dict, optional
        Overlay style (forces the ``cnp`` overlay); default: the manifest's style.
    overlay : str, optional
        ``auto`` (default from the manifest: ``imagenet-w`` when importable and no ``style``
        given, else ``cnp``), ``cnp`` or ``imagenet-w``.
    cache_dir : path, optional
        Cache folder (default :func:`default_cache_dir`).
    image_size : int, optional
        Centre-crop side (default: the manifest's ``center_crop``, 224 for the packaged pairs);
        the short side is first resized to ``round(image_size * resize_short_side / center_crop)``
        (256 for 224).
    sizes : dict, optional
        Overrides of the manifest's split sizes (keys ``train``, ``drsa``, ``rank``, ``val``,
        ``test``); with a split file only ``drsa`` and ``rank``, used when it has no rows for them.
    train_overlay_rates : (float, float), optional
        Fractions of clean train positives and negatives that get a watermark overlay (not with a
        split file).
    progress : bool
        Show a progress bar while decoding.

    Returns
    -------
    PairData
        Splits ``train``, ``drsa``, ``rank``, ``val``, ``test``; ``meta`` records the manifest,
        the classes (with torchvision indices where known), sizes, overlay, label source, masks,
        split file and cache file.

    Raises
    ------
    CNPError
        Unknown pair, bad manifest, bad sizes or rates, missing root/train folder/class folder,
        too few images for a split, a bad label CSV, split file or mask, or a corrupt image.
    """
    # ---- inputs
    man = _resolve_manifest(pair, manifest)
    pair = man.pair
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise CNPError(f"seed must be a non-negative integer, got {seed!r}")
    if image_size is None:
        image_size = man.crop
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise CNPError(f"image_size must be an integer >= 8, got {image_size!r}")
    split_path = Path(splits).expanduser() if splits is not None else man.splits_file()
    sz = dict(man.sizes)
    if sizes is not None:
        given = _check_sizes(sizes, "sizes")
        fixed = sorted(set(given) - {"drsa", "rank"})
        if split_path is not None and fixed:
            raise CNPError(f"the split file {split_path} fixes the train, val and test splits; sizes may only set "
                           f"drsa and rank (used when the file has no rows for them), got {fixed}")
        sz.update(given)
    rates = _check_rates(train_overlay_rates)
    if rates is not None and split_path is not None:
        raise CNPError(f"train_overlay_rates cannot be combined with the split file {split_path} (its splits are "
                       "used as they are); drop one of them")
    if isinstance(style, Mapping):
        style = WatermarkStyle(**style)
    if style is not None and not isinstance(style, WatermarkStyle):
        raise CNPError(f"style must be a WatermarkStyle or a dict of its fields, got {type(style).__name__}")
    # with a split file nothing is overlaid, so no overlay is resolved (or required)
    method = _resolve_overlay(overlay or man.overlay, style is not None) if split_path is None else None
    wm_style = style if style is not None else WatermarkStyle(**man.style)
    resize = max(image_size, int(round(image_size * man.resize / man.crop)))

    # ---- data
    r = check_root(root if root is not None and os.fspath(root) != "" else man.root_dir(), man.layout)
    mask_mode: str | Path | None
    if masks is not None:
        mask_mode = "beside" if os.fspath(masks) == "beside" else Path(masks).expanduser()
    else:
        mask_mode = man.mask_dir()
    beside_suffix = man.mask_suffix if mask_mode == "beside" else None
    classes = ((man.positive, "positive", 1), (man.negative, "negative", 0))
    listing = {cls.key: _class_files(r, cls, role, pair, man.layout, beside_suffix) for cls, role, _ in classes}
    all_files = [f for w in listing for group in listing[w] for f in group]
    mask_files = find_masks(all_files, r, mask_mode, man.mask_suffix)
    part_files = {part: find_masks(all_files, r, d, man.mask_suffix) for part, d in man.extra_mask_dirs().items()}
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
    sources = dict.fromkeys(labels, "csv")
    table = read_split_csv(split_path, r) if split_path is not None else None
    if table is not None:
        for f, v in table.watermark.items():
            if labels.get(f, v) != v:
                raise CNPError(f"{f!r} is labelled watermark={labels[f]} in the label CSV {csv_path} but {v} in the "
                               f"split file {split_path}; fix one of them")
            labels[f] = v
            sources[f] = "csv"
    for f, m in mask_files.items():
        if labels.get(f) == 0:
            raise CNPError(f"{m} is a watermark mask of {f!r}, which the labels mark clean (watermark=0); delete "
                           "the mask or fix the label")
        if f not in labels:
            labels[f], sources[f] = 1, "mask"

    cls_of = {f: label for cls, _role, label in classes for group in listing[cls.key] for f in group}
    derive = ["drsa", "rank"]
    if table is not None:
        _check_table(table, split_path, cls_of, labels, man)
        derive = [k for k in derive if k not in table.rows]
        n_pos_train = sum(cls_of[f] for f in table.rows["train"])
        plans = {}
    else:
        plans = {cls.key: _plan_class(cls, role, *listing[cls.key], labels, sz, pair, seed)
                 for cls, role, _ in classes}
        n_pos_train = sz["train"]
    for key in derive:
        if sz[key] > n_pos_train:
            raise CNPError(
                f"the {key} split needs {sz[key]} positive images, drawn from the train split's "
                f"{n_pos_train} positives ({man.positive.name}); lower sizes[{key!r}] or raise sizes['train']."
            )

    # ---- cache
    recipe = {
        "format": FORMAT_VERSION, "manifest": man.raw, "root": str(r), "seed": seed, "sizes": sz,
        "image_size": image_size, "resize": resize, "overlay": method,
        "imagenet_w": _imagenet_w_version() if method == "imagenet-w" else None,
        "style": wm_style.to_dict() if method == "cnp" else None,
        "train_overlay_rates": list(rates) if rates else None,
        "files": _file_list_hash(r, all_files), "label_csv_sha256": csv_sha,
    }
    # keys that only exist when used, so the caches of pairs without them keep their names
    if mask_mode is not None:
        recipe["masks"] = [str(mask_mode), man.mask_suffix, _paths_hash(mask_files)]
    if part_files:
        recipe["extra_masks"] = {p: _paths_hash(v) for p, v in sorted(part_files.items())}
    splits_sha = hashlib.sha256(split_path.read_bytes()).hexdigest() if split_path is not None else None
    if splits_sha is not None:
        recipe["splits_sha256"] = splits_sha
    key = recipe_hash(recipe)
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = cdir / f"{pair}-seed{seed}-{image_size}px-{key}.pt"
    cached = load_current(cache_file, what="cached pair data", load=PairData.load,
                          check=lambda data: None if data.meta.get("cache_key") == key
                          else "is stale (its recipe hash does not match its name)")
    if cached is not None:
        return cached

    # ---- decode every needed file once
    needed: list[str] = []
    if table is not None:
        needed = list(dict.fromkeys(f for name in _SPLIT_NAMES for f in table.rows.get(name, [])))
    for p in plans.values():
        for group in (p.train, p.test_w0, p.val_w0, p.test_w1_nat, p.val_w1_nat, p.test_w1_src, p.val_w1_src):
            needed.extend(group)
    index = {f: i for i, f in enumerate(needed)}
    if len(index) != len(needed):  # pragma: no cover - the plan draws each file once
        raise CNPError("internal error: a file was selected twice")
    dec = _decode_all(r, needed, image_size, resize, progress, f"decoding {pair}",
                      masks={f: m for f, m in mask_files.items() if f in index},
                      parts={p: {f: m for f, m in v.items() if f in index} for p, v in part_files.items()})

    def make_split(name: str, rows: list[_Row], shuffle: bool = True) -> Split:
        if shuffle:
            order = _perm(len(rows), pair, seed, f"order-{name}")
            rows = [rows[i] for i in order]
        ii = [index[row.file] for row in rows]
        imgs = dec.pixels[ii] if rows else dec.pixels[:0]
        wmask = torch.zeros((len(rows), image_size, image_size), dtype=torch.bool)
        for i, (row, j) in enumerate(zip(rows, ii)):
            if not row.overlay and j in dec.masks:
                wmask[i] = dec.masks[j]
        extra = {}
        for part, got in sorted(dec.parts.items()):
            pm = torch.zeros((len(rows), image_size, image_size), dtype=torch.bool)
            for i, j in enumerate(ii):
                if j in got:
                    pm[i] = got[j]
            extra[part] = pm
        ov = [i for i, row in enumerate(rows) if row.overlay]
        if ov:
            out, m = _overlay(imgs[ov], method, wm_style, _torch_gen(pair, seed, f"overlay-{name}"))
            imgs[ov], wmask[ov] = out, m
        known = [not (row.wm and not row.overlay and row.file not in mask_files) for row in rows]
        meta = {
            "pair": pair, "split": name, "seed": seed, "files": [row.file for row in rows],
            "overlaid": [row.overlay for row in rows], "wm_source": [row.source for row in rows],
            "masks_known": all(known), "masks_known_per_image": known, "overlay": method,
            "image_size": image_size, "cache_key": key,
        }
        return Split(
            images=imgs, labels=torch.tensor([row.label for row in rows], dtype=torch.long),
            wm=torch.tensor([row.wm for row in rows], dtype=torch.bool), masks=wmask, name=name,
            extra_masks=extra, meta=meta,
        )

    def labelled(f: str, label: int) -> _Row:
        return _Row(f, label, labels.get(f) == 1, sources.get(f, "none"))

    splits_out: dict[str, Split] = {}
    if table is not None:
        for name in _SPLIT_NAMES:
            if name in table.rows:
                splits_out[name] = make_split(name, [labelled(f, cls_of[f]) for f in table.rows[name]], shuffle=False)
        splits_out.update(_derive_from_train(splits_out["train"], derive, sz, pair, seed))
        splits_out = {name: splits_out[name] for name in _SPLIT_NAMES}
    else:
        train_rows: list[_Row] = []
        val_rows: list[_Row] = []
        test_rows: list[_Row] = []
        for cls, _role, label in classes:
            p = plans[cls.key]
            rows = [labelled(f, label) for f in p.train]
            if rates is not None:
                rate = rates[0] if label == 1 else rates[1]
                clean_idx = [i for i, row in enumerate(rows) if not row.wm]
                k = int(round(rate * len(clean_idx)))
                pick = _perm(len(clean_idx), pair, seed, f"train-overlay-{cls.key}")[:k]
                for j in pick:
                    rows[clean_idx[j]] = _Row(rows[clean_idx[j]].file, label, True, "overlay", True)
            train_rows += rows
            for dest, w0, nat, src in ((test_rows, p.test_w0, p.test_w1_nat, p.test_w1_src),
                                       (val_rows, p.val_w0, p.val_w1_nat, p.val_w1_src)):
                dest += [_Row(f, label, False, sources.get(f, "none")) for f in w0]
                dest += [_Row(f, label, True, sources.get(f, "csv")) for f in nat]
                dest += [_Row(f, label, True, "overlay", True) for f in src]

        splits_out["train"] = make_split("train", train_rows)
        splits_out.update(_derive_from_train(splits_out["train"], derive, sz, pair, seed))
        splits_out["val"] = make_split("val", val_rows)
        splits_out["test"] = make_split("test", test_rows)
        for name in ("val", "test"):
            counts = splits_out[name].counts()
            if set(counts.values()) != {sz[name]}:  # pragma: no cover - guaranteed by the plan
                raise CNPError(f"internal error: {name} is not balanced: {counts}")
    # the splits hold their own copies; free the decoded pool before saving
    dec.pixels, dec.masks, dec.parts = dec.pixels[:0], {}, {}

    data = PairData(
        pair=pair, positive=man.positive.name, negative=man.negative.name, splits=splits_out,
        meta={
            "source": "folder" if man.layout == "folder" else "imagenet", "layout": man.layout,
            "manifest": man.raw, "manifest_path": str(man.path) if man.path else None,
            "classes": {"positive": man.positive.to_dict(), "negative": man.negative.to_dict()},
            "root": str(r), "seed": seed, "sizes": sz, "image_size": image_size, "resize": resize,
            "overlay": method, "style": wm_style.to_dict() if method == "cnp" else None,
            "imagenet_w_version": recipe["imagenet_w"],
            "train_overlay_rates": list(rates) if rates else None,
            "label_csv": str(csv_path) if csv_path is not None else None, "label_csv_sha256": csv_sha,
            "n_labelled": len(labels), "masks": str(mask_mode) if mask_mode is not None else None,
            "n_masks": len(mask_files), "extra_masks": sorted(part_files),
            "splits_file": str(split_path) if split_path is not None else None, "splits_sha256": splits_sha,
            "cache_key": key, "cache_file": str(cache_file), "subgroups": list(SUBGROUPS), "format": FORMAT_VERSION,
        },
    )
    data.save(cache_file)
    return data


__all__ = [
    "MANIFEST_DIR", "SIZE_KEYS", "OVERLAYS", "LAYOUTS", "MASK_SUFFIX", "ClassInfo", "PairManifest", "SplitTable",
    "known_pairs", "is_manifest_path", "is_folder_name", "load_manifest", "manifest_from_dict", "read_label_csv",
    "write_label_csv", "read_split_csv", "write_split_csv", "check_root", "list_class_files", "find_masks",
    "decode_image", "decode_mask", "imagenet_w_available", "default_cache_dir", "build_pair",
]
