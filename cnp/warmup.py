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

from cnp.data.splits import PairData, Split
from cnp.evaluate import subgroup_accuracy
from cnp.images import normalize_images
from cnp.io import CNPError
from cnp.models import VGG, replace_head
from cnp.runtime import progress
from cnp.training import PREDICT_BATCH

HEAD_CHOICES = ("fc8", "classifier")


@dataclass
class WarmupResult:
    model: nn.Module
    history: list[float]
    val_acc: dict[str, float]
    test_acc: dict[str, float]


@torch.no_grad()
def _features(model: VGG, split: Split, device, batch_size: int = PREDICT_BATCH) -> torch.Tensor:
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
        last layer. For a backbone that is not a :class:`~cnp.models.VGG` (a torchvision ResNet,
        ``vgg16_bn``, your own CNN) the last ``nn.Linear`` of the model is replaced by a new
        2-way layer and only that layer is trained, whatever ``head`` says.
    """
    if head not in HEAD_CHOICES:
        raise CNPError(f"head must be one of {HEAD_CHOICES}, got {head!r}")
    if epochs < 1:
        raise CNPError(f"warm-up epochs must be >= 1, got {epochs}")
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    if not isinstance(backbone, VGG):
        return _warmup_last_linear(backbone, data, epochs, lr, batch_size, seed, weight_decay, device, verbose, g)
    model = copy.deepcopy(backbone).to(device)
    replace_head(model, 2, generator=g)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = model.classifier if head == "classifier" else model.classifier[-1]
    for p in trainable.parameters():
        p.requires_grad_(True)
    feats = _features(model, data["train"], device)
    return _fit_head(model, model.classifier, list(trainable.parameters()), feats, data, epochs, lr, batch_size, seed,
                     weight_decay, device, verbose, g)


def _fit_head(model: nn.Module, head: nn.Module, params: list, feats: torch.Tensor, data: PairData, epochs: int,
              lr: float, batch_size: int, seed: int, weight_decay: float, device, verbose: bool,
              g: torch.Generator) -> WarmupResult:
    """SGD on ``head`` over the cached features of the training split; the warmed-up result."""
    labels = data["train"].labels.to(device)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    torch.manual_seed(seed)
    for _ in progress(range(epochs), desc="warm-up", disable=not verbose):
        head.train()
        perm = torch.randperm(len(labels), generator=g).to(device)
        total = 0.0
        for start in range(0, len(perm), batch_size):
            idx = perm[start:start + batch_size]
            loss = loss_fn(head(feats[idx]), labels[idx])
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


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """Name and module of the last ``nn.Linear`` of ``model`` (its classification head)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise CNPError("the model has no nn.Linear layer to use as its classification head")
    return found[-1]


def replace_last_linear(model: nn.Module, num_classes: int, generator: torch.Generator | None = None) -> nn.Module:
    """Give ``model`` a new, freshly initialised last linear layer with ``num_classes`` outputs (in place)."""
    name, old = last_linear(model)
    new = nn.Linear(old.in_features, num_classes)
    with torch.no_grad():
        new.weight.normal_(0.0, 0.01, generator=generator)
        new.bias.zero_()
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new.to(old.weight.device))
    return model


@torch.no_grad()
def _head_inputs(model: nn.Module, head: nn.Module, split: Split, device, batch_size: int = PREDICT_BATCH) -> torch.Tensor:
    model.eval()
    grabbed: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, inp: grabbed.append(inp[0].detach()))
    try:
        for start in range(0, len(split), batch_size):
            model(normalize_images(split.images[start:start + batch_size], device))
    finally:
        handle.remove()
    return torch.cat(grabbed)


def _warmup_last_linear(backbone, data, epochs, lr, batch_size, seed, weight_decay, device, verbose, g) -> WarmupResult:
    model = copy.deepcopy(backbone).to(device)
    replace_last_linear(model, 2, generator=g)
    _, head = last_linear(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    feats = _head_inputs(model, head, data["train"], device)
    return _fit_head(model, head, list(head.parameters()), feats, data, epochs, lr, batch_size, seed, weight_decay,
                     device, verbose, g)
