"""Shared training loop pieces: optimisers, one epoch of supervised training, prediction."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from cnp.data.splits import Split
from cnp.images import normalize_images
from cnp.runtime import progress


def make_optimizer(params: Iterable[torch.nn.Parameter], kind: str = "sgd", lr: float = 0.01,
                   momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """SGD with momentum (default, as in the pruning literature) or AdamW."""
    params = [p for p in params if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}; use 'sgd' or 'adamw'")


def train_epoch(
    model: nn.Module,
    split: Split,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    desc: str = "epoch",
    amp: bool = False,
    class_weights: torch.Tensor | None = None,
    verbose: bool = True,
    grad_clip: float = 0.0,
    penalty: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    penalty_weight: float = 0.0,
) -> float:
    """One epoch of cross-entropy training on ``split`` (shuffled by ``generator``); mean loss.

    ``amp``: the forward pass in bf16 autocast (the weights, their gradients and the optimiser
    stay fp32); :func:`cnp.runtime.resolve_precision` says where that is worth it.
    ``grad_clip > 0`` clips the gradient norm (a heavily pruned network can otherwise take a step
    that kills every ReLU of a layer, after which it predicts one class and cannot recover).
    ``penalty`` (e.g. :class:`cnp.pruning.penalty.ConceptPenalty`) computes the logits and an
    extra term from the batch; ``penalty_weight`` times that term is added to the loss (the
    returned mean loss is the cross-entropy alone).
    """
    model.train()
    device = torch.device(device)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights.to(device) if class_weights is not None else None)
    # the running loss stays on the device (float64, the same arithmetic as Python floats), so no
    # batch waits for the previous one to finish; one transfer at the end of the epoch
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    use_amp = bool(amp)
    for x, y in progress(split.batches(batch_size, shuffle=True, generator=generator, device=device),
                         total=(len(split) + batch_size - 1) // batch_size, desc=desc, disable=not verbose):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            if penalty is not None and penalty_weight > 0:
                logits, extra = penalty(model, x)
                loss = loss_fn(logits, y)
                objective = loss + penalty_weight * extra
            else:
                loss = objective = loss_fn(model(x), y)
        objective.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        total += loss.detach().double() * len(y)
        count += len(y)
    model.eval()
    return float(total) / max(count, 1)


#: Images per forward pass where a network only predicts (evaluation, the warm-up's features). A
#: per-image forward pass does not depend on the batch it is in (the same logits to the bit at 64,
#: 256 or 1200 on the CPU, ``bench/bench_eval_batch.py``), so this is a matter of speed: on the
#: embedded benchmark's 48 px network, one thread of an Intel Xeon, batches of 64 took 1.15x less
#: time than batches of 256 unpruned and at 40 % removed, the same at 70 % (the first layers'
#: activations stay closer to the core; ``bench/results/eval_batch_cpu-xeon-amx-2026-12-07.json``).
PREDICT_BATCH = 64


@torch.no_grad()
def predict_logits(model: nn.Module, images_uint8: torch.Tensor, batch_size: int = PREDICT_BATCH,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits of the model (eval mode) for uint8 images, on the CPU.

    ``images_uint8`` may already be on ``device`` (e.g. :meth:`Split.device_images`); the logits
    are gathered there and copied to the CPU once.
    """
    model.eval()
    out = []
    for start in range(0, images_uint8.shape[0], batch_size):
        x = normalize_images(images_uint8[start:start + batch_size], device)
        out.append(model(x).float())
    return torch.cat(out).cpu() if out else torch.zeros(0)
