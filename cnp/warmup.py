"""The paper's warm-up: a new 2-way head trained on the frozen pretrained backbone.

"Prior to augmentation and ablation, we perform a warmup phase of 15 epochs to train the
classification head on the binary task." The convolutional features stay frozen, so they are
computed once and the head is trained on the cached features (15 epochs cost about one forward
pass over the training set). Works for both data paths and any device.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from cnp.data.splits import PairData, Split, normalize_images
from cnp.evaluate import subgroup_accuracy
from cnp.io import CNPError
from cnp.models import VGG, replace_head
from cnp.runtime import progress

HEAD_CHOICES = ("fc8", "classifier")


@dataclass
class WarmupResult:
    model: VGG
    history: list[float]
    val_acc: dict[str, float]
    test_acc: dict[str, float]


@torch.no_grad()
def _features(model: VGG, split: Split, device, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(split), batch_size):
        x = normalize_images(split.images[start:start + batch_size], device)
        out.append(model.forward_features(x))
    return torch.cat(out)


def warmup(
    backbone: VGG,
    data: PairData,
    epochs: int = 15,
    lr: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
    head: str = "classifier",
    weight_decay: float = 5e-4,
    device: torch.device | str = "cpu",
    verbose: bool = True,
) -> WarmupResult:
    """Train a new 2-way head on the frozen backbone.

    Parameters
    ----------
    backbone : VGG
        Pretrained network (not modified; a copy is trained).
    data : PairData
        Binary pair; the ``train`` split is used, ``val`` and ``test`` are reported.
    epochs : int
        Warm-up epochs (the paper: 15).
    head : str
        ``classifier`` trains fc6-fc8 (fc8 new, fc6/fc7 from the backbone), ``fc8`` only the new
        last layer.
    """
    if head not in HEAD_CHOICES:
        raise CNPError(f"head must be one of {HEAD_CHOICES}, got {head!r}")
    if epochs < 1:
        raise CNPError(f"warm-up epochs must be >= 1, got {epochs}")
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(backbone).to(device)
    replace_head(model, 2, generator=g)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = model.classifier if head == "classifier" else model.classifier[-1]
    for p in trainable.parameters():
        p.requires_grad_(True)
    feats = _features(model, data["train"], device)
    labels = data["train"].labels.to(device)
    opt = torch.optim.SGD([p for p in trainable.parameters()], lr=lr, momentum=0.9, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    torch.manual_seed(seed)
    for _ in progress(range(epochs), desc="warm-up", disable=not verbose):
        model.classifier.train()
        perm = torch.randperm(len(labels), generator=g).to(device)
        total = 0.0
        for start in range(0, len(perm), batch_size):
            idx = perm[start:start + batch_size]
            loss = loss_fn(model.classifier(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(labels))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return WarmupResult(
        model=model, history=history,
        val_acc=subgroup_accuracy(model, data["val"], device=device),
        test_acc=subgroup_accuracy(model, data["test"], device=device),
    )
