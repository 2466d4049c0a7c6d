"""How images enter the networks: the ImageNet normalisation, and the range of a normalised pixel.

Every image of the companion is stored as uint8 and normalised with ImageNet's mean and std on
its way into a network (the paper's VGG-16 and every torchvision model expect it); LRP's ZBox
rule at the first layer needs the normalised values of pixel 0 and pixel 1.
"""

from __future__ import annotations

import torch

#: ImageNet normalisation used for every input (synthetic and real).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_NORM_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _norm_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std (1, 3, 1, 1) on ``device``, made once per device.

    On an accelerator, building them per batch would be two blocking host-to-device copies.
    """
    if device.type == "cpu":
        return (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    if device not in _NORM_CONSTANTS:
        _NORM_CONSTANTS[device] = (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
                                   torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))
    return _NORM_CONSTANTS[device]


def normalize_images(images_uint8: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> float32, ImageNet-normalised (on ``device``)."""
    x = images_uint8.to(device) if device is not None else images_uint8
    x = x.float().div_(255.0)
    mean, std = _norm_constants(x.device)
    return (x - mean) / std


def input_bounds(device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised values of pixel 0 and pixel 1 per channel, shape (1, 3, 1, 1) (for LRP's ZBox)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "input_bounds", "normalize_images"]
