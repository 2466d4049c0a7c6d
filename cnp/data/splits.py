"""The data container shared by both data paths: a split of labelled, watermark-annotated images.

A :class:`Split` holds uint8 images (decoded once), class labels, watermark flags and
watermark masks. Subgroups follow the paper: ``c0w0, c0w1, c1w0, c1w1`` (c = class, 1 is the
positive class; w = watermark present). The OOD subgroup is ``c0w1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cnp.images import normalize_images
from cnp.io import CNPError, atomic_torch_save, safe_torch_load, tensor_hash

SUBGROUPS: tuple[str, ...] = ("c0w0", "c0w1", "c1w0", "c1w1")
OOD_SUBGROUP = "c0w1"


def subgroup_name(label: int, wm: bool) -> str:
    return f"c{int(label)}w{int(bool(wm))}"


@dataclass
class Split:
    """Images with class labels, watermark flags and masks.

    Attributes
    ----------
    images : torch.Tensor
        uint8, (n, 3, H, W).
    labels : torch.Tensor
        int64, (n,), 1 = positive class.
    wm : torch.Tensor
        bool, (n,), watermark present.
    masks : torch.Tensor
        bool, (n, H, W), watermark pixels (all False where ``wm`` is False or unknown).
    name : str
        Split name (``train``, ``drsa``, ``rank``, ``val``, ``test``).
    extra_masks : dict[str, torch.Tensor]
        Further part masks (e.g. ``ball`` for the basketball demo), bool (n, H, W).
    meta : dict
        Free-form provenance (pair, seed, recipe, file names on the ImageNet path).
    """

    images: torch.Tensor
    labels: torch.Tensor
    wm: torch.Tensor
    masks: torch.Tensor
    name: str = "split"
    extra_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    # device copies of the tensors (see on_device); not part of the split's content
    _device_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise CNPError(f"Split.images must be uint8 (n, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        for key, t in (("labels", self.labels), ("wm", self.wm), ("masks", self.masks)):
            if t.shape[0] != n:
                raise CNPError(f"Split.{key} has {t.shape[0]} rows but there are {n} images")
        self.labels = self.labels.long()
        self.wm = self.wm.bool()
        self.masks = self.masks.bool()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def subgroups(self) -> list[str]:
        """Subgroup name of every image."""
        return [subgroup_name(c, w) for c, w in zip(self.labels.tolist(), self.wm.tolist())]

    def subgroup_index(self, name: str) -> torch.Tensor:
        if name not in SUBGROUPS:
            raise CNPError(f"unknown subgroup {name!r}; use one of {SUBGROUPS}")
        c, w = int(name[1]), bool(int(name[3]))
        return torch.nonzero((self.labels == c) & (self.wm == w)).flatten()

    def counts(self) -> dict[str, int]:
        return {g: int(self.subgroup_index(g).numel()) for g in SUBGROUPS}

    def subset(self, index: torch.Tensor | list[int], name: str | None = None) -> Split:
        """The images at ``index``; per-image lists in ``meta`` (length n) are sliced too."""
        idx = torch.as_tensor(index, dtype=torch.long)
        n = len(self)
        meta = {}
        for k, v in self.meta.items():
            if isinstance(v, list | tuple) and len(v) == n:
                meta[k] = [v[i] for i in idx.tolist()]
            else:
                meta[k] = v
        return Split(
            images=self.images[idx], labels=self.labels[idx], wm=self.wm[idx], masks=self.masks[idx],
            name=name or self.name, extra_masks={k: v[idx] for k, v in self.extra_masks.items()},
            meta=meta,
        )

    @classmethod
    def concat(cls, parts: list[Split], name: str) -> Split:
        """The images of ``parts`` one after the other, in order (meta and extra masks of the
        first part; every part must have the same extra-mask names)."""
        if not parts:
            raise CNPError("Split.concat needs at least one split")
        keys = set(parts[0].extra_masks)
        if any(set(p.extra_masks) != keys for p in parts):
            raise CNPError(f"cannot concatenate splits with different extra masks: "
                           f"{[sorted(p.extra_masks) for p in parts]}")
        return cls(images=torch.cat([p.images for p in parts]), labels=torch.cat([p.labels for p in parts]),
                   wm=torch.cat([p.wm for p in parts]), masks=torch.cat([p.masks for p in parts]), name=name,
                   extra_masks={k: torch.cat([p.extra_masks[k] for p in parts]) for k in keys},
                   meta=dict(parts[0].meta))

    def positives(self) -> Split:
        return self.subset(torch.nonzero(self.labels == 1).flatten(), name=f"{self.name}-pos")

    def on_device(self, name: str = "images", device: torch.device | str | None = None) -> torch.Tensor:
        """The tensor ``name`` (``images``, ``labels``, ``wm``, ``masks``) on ``device``.

        On the CPU this is the tensor itself. On an accelerator a copy is made once and kept
        (uint8 images: 150 kB per 224 px image), so every epoch, ranking and evaluation indexes
        the images where the model runs instead of copying each batch from the host (a blocking
        transfer per batch). The copy is made again if the tensor is replaced or modified in place.
        """
        t = getattr(self, name)
        dev = torch.device(device) if device is not None else t.device
        if dev.type == "cpu":
            return t if t.device.type == "cpu" else t.cpu()
        key = (str(dev), id(t), t.data_ptr(), t._version)
        hit = self._device_cache.get(name)
        if hit is None or hit[0] != key:
            hit = (key, t.to(dev))
            self._device_cache[name] = hit
        return hit[1]

    def device_images(self, device: torch.device | str | None = None) -> torch.Tensor:
        """uint8 images on ``device`` (see :meth:`on_device`)."""
        return self.on_device("images", device)

    def release_device(self) -> None:
        """Drop the device copies made by :meth:`on_device`."""
        self._device_cache.clear()

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        with_index: bool = False,
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield ``(x, labels)`` (or ``(x, labels, index)``) with x normalised float on ``device``.

        Images stay uint8 in memory and are only converted per batch: nothing is decoded or
        generated again per epoch. On an accelerator the uint8 images and labels are held there
        (:meth:`on_device`) and the batch order is moved there once per pass, so batching never
        waits for the device. ``index`` is always a CPU tensor.
        """
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        dev = torch.device(device) if device is not None else self.images.device
        images, labels = self.on_device("images", dev), self.on_device("labels", dev)
        order_dev = order.to(dev)  # one transfer per pass (none on the CPU)
        for start in range(0, n, batch_size):
            idx_dev = order_dev[start:start + batch_size]
            x = normalize_images(images[idx_dev])
            y = labels[idx_dev]
            yield (x, y, order[start:start + batch_size]) if with_index else (x, y)

    def fingerprint(self) -> str:
        """Content hash of images, labels and watermark flags (cached until one of them changes)."""
        key = tuple((id(t), t.data_ptr(), t._version) for t in (self.images, self.labels, self.wm))
        hit = self._device_cache.get("fingerprint")
        if hit is None or hit[0] != key:
            hit = (key, tensor_hash(self.images, self.labels, self.wm.to(torch.uint8)))
            self._device_cache["fingerprint"] = hit
        return hit[1]

    # ----------------------------------------------------------------- persistence
    def to_state(self) -> dict:
        return {
            "images": self.images, "labels": self.labels, "wm": self.wm, "masks": self.masks,
            "name": self.name, "extra_masks": dict(self.extra_masks), "meta": self.meta,
            "fingerprint": self.fingerprint(),
        }

    @classmethod
    def from_state(cls, state: dict) -> Split:
        split = cls(
            images=state["images"], labels=state["labels"], wm=state["wm"], masks=state["masks"],
            name=state.get("name", "split"), extra_masks=dict(state.get("extra_masks", {})),
            meta=dict(state.get("meta", {})),
        )
        if "fingerprint" in state and split.fingerprint() != state["fingerprint"]:
            raise CNPError(f"split {split.name!r}: content hash mismatch (corrupt cache file)")
        return split


@dataclass
class PairData:
    """All splits of one binary pair: ``train``, ``drsa``, ``rank``, ``val``, ``test``."""

    pair: str
    positive: str
    negative: str
    splits: dict[str, Split]
    meta: dict = field(default_factory=dict)

    def __getitem__(self, key: str) -> Split:
        if key not in self.splits:
            raise CNPError(f"pair {self.pair!r} has no split {key!r}; available: {sorted(self.splits)}")
        return self.splits[key]

    @property
    def image_size(self) -> int:
        return next(iter(self.splits.values())).image_size

    def summary(self) -> str:
        lines = [f"pair {self.pair}: positive={self.positive} negative={self.negative}"]
        for k, s in self.splits.items():
            c = s.counts()
            lines.append(f"  {k:<6s} n={len(s):5d}  " + "  ".join(f"{g}={c[g]}" for g in SUBGROUPS))
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        return atomic_torch_save(path, {
            "pair": self.pair, "positive": self.positive, "negative": self.negative,
            "meta": self.meta, "splits": {k: v.to_state() for k, v in self.splits.items()},
        })

    @classmethod
    def load(cls, path: str | Path) -> PairData:
        blob = safe_torch_load(path)
        try:
            return cls(
                pair=blob["pair"], positive=blob["positive"], negative=blob["negative"],
                meta=blob.get("meta", {}),
                splits={k: Split.from_state(v) for k, v in blob["splits"].items()},
            )
        except (KeyError, TypeError) as exc:
            raise CNPError(f"{path} is not a cnp pair-data cache ({exc}); delete it to rebuild") from exc
