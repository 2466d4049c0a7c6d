"""Test fakes: a tiny ImageNet folder of generated JPEGs and a random VGG-16 weights file.

Nothing here touches the network. Import from a test module with ``from fakes import ...``
(pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cnp.io import atomic_torch_save, sha256_file
from cnp.models import full_vgg16

#: Wnids of the paper's classes (carton, dugong, crate, packet, basketball).
PAPER_WNIDS: tuple[str, ...] = ("n02971356", "n02074367", "n03127925", "n03871628", "n02802426")


def class_color(wnid: str) -> tuple[int, int, int]:
    """A stable, class-dependent RGB base colour for ``wnid``."""
    d = hashlib.sha256(wnid.encode()).digest()
    return int(40 + d[0] % 176), int(40 + d[1] % 176), int(40 + d[2] % 176)


def _fake_image(rng: np.random.Generator, wnid: str, size: int) -> np.ndarray:
    # non-square (landscape or portrait), so resizing and centre cropping are exercised
    long_side = int(size * rng.uniform(1.1, 1.5))
    h, w = (size, long_side) if rng.random() < 0.5 else (long_side, size)
    base = np.array(class_color(wnid), dtype=np.float32)
    img = base + rng.normal(0.0, 18.0, size=(h, w, 3)).astype(np.float32)
    # a class-dependent bright square somewhere, so images of one class differ
    s = max(2, size // 4)
    y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
    img[y:y + s, x:x + s] = 255.0 - base
    return np.clip(img, 0, 255).astype(np.uint8)


def make_fake_imagenet(
    root: str | Path,
    wnids: Sequence[str],
    n_train: int,
    n_val: int,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a tiny ImageNet in the standard layout with generated JPEGs.

    ``root/train/<wnid>/<wnid>_<k>.JPEG`` (``n_train`` per class) and
    ``root/val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG`` (``n_val`` per class; no ``val/`` folder
    when ``n_val`` is 0). Each class has its own base colour plus noise, so a classifier can
    separate classes; images are about ``size`` pixels on the short side.

    Returns
    -------
    Path
        ``root``.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    val_counter = 1
    for wnid in wnids:
        tdir = root / "train" / wnid
        tdir.mkdir(parents=True, exist_ok=True)
        for k in range(n_train):
            Image.fromarray(_fake_image(rng, wnid, size)).save(tdir / f"{wnid}_{k + 1}.JPEG", quality=85)
        if n_val:
            vdir = root / "val" / wnid
            vdir.mkdir(parents=True, exist_ok=True)
            for _ in range(n_val):
                name = f"ILSVRC2012_val_{val_counter:08d}.JPEG"
                Image.fromarray(_fake_image(rng, wnid, size)).save(vdir / name, quality=85)
                val_counter += 1
    return root


def make_fake_vgg16_weights(path: str | Path, seed: int = 0) -> str:
    """Save a random full-size VGG-16 state dict (torchvision layout) with ``torch.save``.

    Returns
    -------
    str
        The SHA-256 of the written file (pass it as ``expected_sha256``).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = full_vgg16().state_dict()
    atomic_torch_save(path, {k: v.contiguous() for k, v in state.items()})
    return sha256_file(path)
