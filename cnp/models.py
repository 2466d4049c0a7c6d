"""VGG-16 with torchvision's layer names, at any width.

The class :class:`VGG` keeps the exact module layout of ``torchvision.models.vgg16``
(``features``, ``avgpool``, ``classifier``), so ``features.21`` is ``conv4_3`` both in the
embedded benchmark's reduced-width network and in the ImageNet-pretrained VGG-16, and
torchvision's state dicts load unchanged. Widths are per conv layer, so a structurally pruned
network is again a :class:`VGG` (its architecture is recorded in :attr:`VGG.arch`).

Layer names accepted everywhere in ``cnp``: any module name of the model
(``model.named_modules()``: ``features.21``, ``layer3``) and, for the VGG-16 layout, the paper's
names (``conv4_3``, ``relu4_3``, ``pool4``, ``fc6`` ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnp.io import CNPError, atomic_torch_save, safe_torch_load, sha256_file

#: Paper / torchvision names of the 13 convolutions of VGG-16, in forward order.
CONV_NAMES: tuple[str, ...] = (
    "conv1_1", "conv1_2",
    "conv2_1", "conv2_2",
    "conv3_1", "conv3_2", "conv3_3",
    "conv4_1", "conv4_2", "conv4_3",
    "conv5_1", "conv5_2", "conv5_3",
)
BLOCK_SIZES: tuple[int, ...] = (2, 2, 3, 3, 3)
#: Block widths of the full-size VGG-16.
FULL_WIDTHS: tuple[int, ...] = (64, 128, 256, 512, 512)
#: SHA-256 of torchvision's ``vgg16-397923af.pth`` (IMAGENET1K_V1).
VGG16_IMAGENET_SHA256 = "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"


def _build_name_map() -> dict[str, str]:
    names: dict[str, str] = {}
    idx = 0
    conv = iter(CONV_NAMES)
    for block, n in enumerate(BLOCK_SIZES, start=1):
        for _ in range(n):
            c = next(conv)
            names[c] = f"features.{idx}"
            names["relu" + c[4:]] = f"features.{idx + 1}"
            idx += 2
        names[f"pool{block}"] = f"features.{idx}"
        idx += 1
    names["avgpool"] = "avgpool"
    names.update({
        "fc6": "classifier.0", "relu6": "classifier.1", "drop6": "classifier.2",
        "fc7": "classifier.3", "relu7": "classifier.4", "drop7": "classifier.5",
        "fc8": "classifier.6",
    })
    return names


#: ``{'conv4_3': 'features.21', 'relu4_3': 'features.22', ...}``
LAYER_NAMES: dict[str, str] = _build_name_map()
_QUALIFIED_TO_PAPER = {v: k for k, v in LAYER_NAMES.items()}


def block_widths_to_conv_widths(block_widths: Sequence[int]) -> list[int]:
    """Expand 5 block widths (e.g. ``(64, 128, 256, 512, 512)``) to the 13 conv widths."""
    if len(block_widths) != 5:
        raise CNPError(f"VGG-16 has 5 blocks; got {len(block_widths)} block widths {list(block_widths)}")
    out: list[int] = []
    for w, n in zip(block_widths, BLOCK_SIZES):
        out.extend([int(w)] * n)
    return out


class VGG(nn.Module):
    """VGG-16 topology (13 convs in blocks of 2-2-3-3-3, 3 linear layers) at any width.

    Parameters
    ----------
    conv_widths : sequence of 13 ints
        Output channels of each conv (see :func:`block_widths_to_conv_widths`).
    num_classes : int
        Outputs of the last linear layer (``fc8``).
    hidden : int
        Width of ``fc6`` and ``fc7`` (4096 in torchvision's VGG-16).
    pool_size : int
        Output side of the adaptive average pool before ``fc6`` (7 in torchvision).
    dropout : float
        Dropout probability after ``fc6`` and ``fc7``.
    in_channels : int
        Input channels.

    Notes
    -----
    ReLUs are not in-place (LRP hooks and concept probes need the activations intact).
    """

    def __init__(
        self,
        conv_widths: Sequence[int],
        num_classes: int = 1000,
        hidden: int = 4096,
        pool_size: int = 7,
        dropout: float = 0.5,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        conv_widths = [int(w) for w in conv_widths]
        if len(conv_widths) != 13 or min(conv_widths) < 1:
            raise CNPError(f"conv_widths must be 13 positive ints, got {conv_widths}")
        layers: list[nn.Module] = []
        c_in = in_channels
        it = iter(conv_widths)
        for n in BLOCK_SIZES:
            for _ in range(n):
                w = next(it)
                layers += [nn.Conv2d(c_in, w, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                c_in = w
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(c_in * pool_size * pool_size, hidden),
            nn.ReLU(inplace=False),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=False),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        self._arch = {
            "num_classes": int(num_classes),
            "hidden": int(hidden),
            "pool_size": int(pool_size),
            "dropout": float(dropout),
            "in_channels": int(in_channels),
        }

    # ------------------------------------------------------------------ structure
    @property
    def convs(self) -> list[nn.Conv2d]:
        """The 13 conv layers in forward order."""
        return [m for m in self.features if isinstance(m, nn.Conv2d)]

    @property
    def conv_widths(self) -> list[int]:
        return [c.out_channels for c in self.convs]

    @property
    def arch(self) -> dict[str, Any]:
        """Everything needed to rebuild this network (with :func:`vgg_from_arch`)."""
        return {"conv_widths": self.conv_widths, **self._arch,
                "num_classes": self.classifier[-1].out_features,
                "hidden": self.classifier[0].out_features}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of ``avgpool``, flattened (input of ``fc6``)."""
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Output of ``relu7``/``drop7`` (input of ``fc8``)."""
        return self.classifier[:-1](self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def vgg_from_arch(arch: dict[str, Any]) -> VGG:
    """Rebuild a :class:`VGG` from :attr:`VGG.arch`."""
    try:
        return VGG(**arch)
    except TypeError as exc:
        raise CNPError(f"not a VGG architecture record: {arch} ({exc})") from exc


def full_vgg16(num_classes: int = 1000) -> VGG:
    """The full-size VGG-16 (torchvision layout, 224 px input, random weights)."""
    return VGG(block_widths_to_conv_widths(FULL_WIDTHS), num_classes=num_classes)


def qualified_name(name: str) -> str:
    """Map a paper name (``conv4_3``) or a qualified name (``features.21``) to the qualified name.

    Raises
    ------
    CNPError
        When the name is neither.
    """
    if name in LAYER_NAMES:
        return LAYER_NAMES[name]
    if name in _QUALIFIED_TO_PAPER:
        return name
    raise CNPError(
        f"unknown layer name {name!r}; use a VGG-16 name such as 'conv4_3', 'relu4_3', 'conv5_1' "
        f"or a qualified name such as 'features.21' (known: {', '.join(LAYER_NAMES)})"
    )


def paper_name(name: str) -> str:
    """The paper name (``conv4_3``) of a qualified (``features.21``) or paper name."""
    return _QUALIFIED_TO_PAPER[qualified_name(name)]


def resolve_layer_name(model: nn.Module, name: str) -> str:
    """The qualified name, in ``model``, of the layer called ``name``.

    Any module name of ``model.named_modules()`` is accepted as it is (``layer3``, ``features.22``,
    ``layer4.1.conv2``); for a VGG-16 layout the paper's names (``conv4_3``, ``relu4_3``) are
    mapped to torchvision's (``features.21``).

    Raises
    ------
    CNPError
        When ``model`` has no such module; the message lists names that exist.
    """
    modules = dict(model.named_modules())
    if name and name in modules:
        return name
    if name in LAYER_NAMES and LAYER_NAMES[name] in modules:
        return LAYER_NAMES[name]
    names = [n for n, m in model.named_modules() if n and not n.startswith("cnp_")]
    if name in LAYER_NAMES:
        hint = f"{name!r} is a VGG-16 name, but {LAYER_NAMES[name]} does not exist in this model"
    else:
        hint = f"this model has no module called {name!r}"
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    raise CNPError(f"unknown layer name {name!r}: {hint}; use a name from model.named_modules(), e.g. {shown}")


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule of ``model`` called ``name`` (a module name, or a VGG-16 paper name)."""
    return dict(model.named_modules())[resolve_layer_name(model, name)]


@torch.no_grad()
def layer_outputs(model: nn.Module, layer: str, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The output of ``layer`` (paper or qualified name) for each input batch, in order.

    The model runs in eval mode with a forward hook on the layer (the hook is removed, and the
    model's training flag restored, when the iteration ends or is abandoned). ``batches`` are
    model inputs (already normalised); the outputs are detached, on the model's device.
    """
    host = get_layer(model, layer)
    grabbed: list[torch.Tensor] = []
    hook = host.register_forward_hook(lambda _m, _i, out: grabbed.append(out.detach()))
    was = model.training
    model.eval()
    try:
        for x in batches:
            grabbed.clear()
            model(x)
            yield grabbed[-1]
    finally:
        hook.remove()
        model.train(was)


@torch.no_grad()
def layer_output_shape(model: nn.Module, layer: str, image_size: int) -> tuple[int, ...]:
    """Shape of ``layer``'s output for one zero image of ``image_size`` pixels (context sites
    attached to the model are left as they are; eval mode for the pass)."""
    host = get_layer(model, layer)
    p = next(model.parameters())
    for shape in layer_outputs(model, layer, [torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)]):
        return tuple(shape.shape)
    raise CNPError(f"layer {layer!r} ({type(host).__name__}) was not reached in a forward pass")


def conv_index(model: VGG, name: str) -> int:
    """Index (0..12) among the convs of the conv called ``name``."""
    layer = get_layer(model, name)
    for i, c in enumerate(model.convs):
        if c is layer:
            return i
    raise CNPError(f"layer {name!r} is not a convolution; pruning protects convolutions such as 'conv4_3'")


def replace_head(model: VGG, num_classes: int, generator: torch.Generator | None = None) -> VGG:
    """Give ``model`` a new, freshly initialised last linear layer (``fc8``) with ``num_classes``."""
    old = model.classifier[-1]
    new = nn.Linear(old.in_features, num_classes)
    with torch.no_grad():
        new.weight.normal_(0.0, 0.01, generator=generator)
        new.bias.zero_()
    model.classifier[-1] = new.to(old.weight.device)
    return model


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return int(sum(p.numel() for p in model.parameters()))


def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one forward pass at ``image_size`` (convs and linears).

    For a :class:`VGG` from its widths; for any other model from one forward pass of a zero
    image with hooks on its Conv2d and Linear layers (context sites attached to the model are
    not counted: their cost is reported separately, e.g. :meth:`cnp.virtual_layer.KeptAblation.extra_macs`).
    """
    if not isinstance(model, VGG):
        return _traced_macs(model, image_size)
    macs = 0
    h = w = image_size
    for m in model.features:
        if isinstance(m, nn.Conv2d):
            macs += h * w * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.MaxPool2d):
            h, w = h // 2, w // 2
    for m in model.classifier:
        if isinstance(m, nn.Linear):
            macs += m.in_features * m.out_features
    return int(macs)


@torch.no_grad()
def _traced_macs(model: nn.Module, image_size: int) -> int:
    total = [0]

    def conv_hook(m, inp, out):
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total[0] += int(out[0].numel()) * k

    def linear_hook(m, inp, out):
        total[0] += int(out[0].numel()) * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    p = next(model.parameters())
    conv0 = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv0.in_channels if conv0 is not None else 3
    sites = [m for m in model.modules() if hasattr(m, "site_attr") and hasattr(m, "enabled")]
    was_enabled = [s.enabled for s in sites]
    was = model.training
    model.eval()
    try:
        for s in sites:
            s.enabled = False
        model(torch.zeros(1, channels, image_size, image_size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        for s, e in zip(sites, was_enabled):
            s.enabled = e
        model.train(was)
    return int(total[0])


# ---------------------------------------------------------------------- checkpoints
#: Attribute by which a torchvision model built by ``cnp`` records its architecture name.
ARCH_ATTR = "cnp_torchvision_arch"


def tag_torchvision(model: nn.Module, name: str) -> nn.Module:
    """Record that ``model`` is ``torchvision.models.<name>`` (so :func:`save_model` can save it)."""
    object.__setattr__(model, ARCH_ATTR, name)
    return model


def model_arch(model: nn.Module) -> dict:
    """The architecture record of ``model``: :attr:`VGG.arch`, or the torchvision name and classes."""
    if isinstance(model, VGG):
        return model.arch
    name = getattr(model, ARCH_ATTR, None)
    if name is None:
        raise CNPError(f"cannot record the architecture of a {type(model).__name__}: build it with "
                       "cnp.models.load_torchvision_model or tag it with cnp.models.tag_torchvision(model, name)")
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return {"kind": "torchvision", "name": name, "num_classes": int(last[-1].out_features) if last else 1000}


def model_from_arch(arch: dict) -> nn.Module:
    """A new model (random weights) from :func:`model_arch`'s record."""
    if arch.get("kind") == "torchvision":
        import torchvision

        model = torchvision.models.get_model(arch["name"], weights=None, num_classes=int(arch["num_classes"]))
        return tag_torchvision(model, arch["name"])
    return vgg_from_arch(arch)


def save_model(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Save architecture + weights (+ JSON-able extras) atomically; load with :func:`load_model`."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_torch_save(path, {"arch": model_arch(model), "state_dict": state, "extra": extra})


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a checkpoint written by :func:`save_model` (``weights_only=True``)."""
    blob = safe_torch_load(path, map_location=map_location)
    if not isinstance(blob, dict) or "arch" not in blob or "state_dict" not in blob:
        raise CNPError(f"{path} is not a cnp model checkpoint (missing 'arch'/'state_dict'); rebuild it")
    model = model_from_arch(blob["arch"])
    model.load_state_dict(blob["state_dict"])
    return model, blob.get("extra", {})


def _hub_weights() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"


def vgg16_weights_file(weights_path: str | Path | None = None) -> Path:
    """The local VGG-16 weights file to use: ``weights_path``, else torch's hub cache (no download).

    Raises
    ------
    CNPError
        When the file does not exist, saying where to download it and how to pass it.
    """
    if weights_path is None or str(weights_path) == "":
        hub = _hub_weights()
        if hub.is_file():
            return hub
        raise CNPError(
            "VGG-16 ImageNet weights are needed but no file was given and none is cached at "
            f"{hub}. Download https://download.pytorch.org/models/vgg16-397923af.pth on a "
            "machine with internet, then pass weights_path=<file> (or put it in that cache), "
            "or set allow_download=True to let torchvision fetch it."
        )
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise CNPError(
            f"weights file {weights_path} does not exist. Download "
            "https://download.pytorch.org/models/vgg16-397923af.pth on a machine with internet and "
            "pass its path as weights_path."
        )
    return weights_path


def load_torchvision_vgg16(
    weights_path: str | Path | None = None,
    expected_sha256: str | None = VGG16_IMAGENET_SHA256,
    allow_download: bool = False,
) -> VGG:
    """ImageNet-pretrained VGG-16 (IMAGENET1K_V1) as a :class:`VGG` with 1000 outputs.

    Parameters
    ----------
    weights_path : path, optional
        A local copy of torchvision's ``vgg16-397923af.pth``. Its SHA-256 is checked against
        ``expected_sha256`` (pass ``None`` to skip the check for your own fine-tuned weights).
    expected_sha256 : str or None
        Expected SHA-256 of the file.
    allow_download : bool
        Without ``weights_path``: when True, use torchvision's download/cache; when False (the
        default, the companion never touches the network on its own), look in torch's hub cache
        and fail with instructions if the file is not there.

    Raises
    ------
    CNPError
        Missing file, wrong hash, or weights that do not fit VGG-16.
    """
    if weights_path is None and allow_download and not _hub_weights().is_file():
        from torchvision.models import VGG16_Weights

        VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)  # downloads into the hub cache
    weights_path = vgg16_weights_file(weights_path)
    if expected_sha256 is not None:
        digest = sha256_file(weights_path)
        if digest != expected_sha256:
            raise CNPError(
                f"weights file {weights_path} has SHA-256 {digest}, expected {expected_sha256} "
                "(torchvision's vgg16-397923af.pth). The file is corrupt or a different model: "
                "download it again, or pass expected_sha256=None for your own weights."
            )
    state = safe_torch_load(weights_path)
    model = full_vgg16(1000)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CNPError(f"{weights_path} does not hold VGG-16 weights in torchvision's layout: {exc}") from exc
    return model


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv equal to ``bn(conv(x))`` in eval mode."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                      stride=conv.stride, padding=conv.padding, bias=True)
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((b - bn.running_mean) * scale + bn.bias)
    return fused.to(conv.weight.device)


# ---------------------------------------------------------------------- torchvision models
def _resolve_weights(arch: str, weights):
    """A torchvision ``WeightsEnum`` member from a member, its name (``IMAGENET1K_V1``,
    ``VGG16_Weights.IMAGENET1K_V1``, ``DEFAULT``), or None."""
    import torchvision

    if weights is None or weights == "":
        return None
    if not isinstance(weights, str):
        return weights
    try:
        if "." in weights:
            return torchvision.models.get_weight(weights)
        enum = torchvision.models.get_model_weights(arch)
        return enum.DEFAULT if weights.upper() == "DEFAULT" else enum[weights]
    except (KeyError, ValueError, AttributeError) as exc:
        try:
            names = ", ".join(w.name for w in torchvision.models.get_model_weights(arch))
        except ValueError:
            names = "none"
        raise CNPError(f"unknown weights {weights!r} for {arch}; torchvision has: {names} (or pass a file path)") from exc


def load_torchvision_model(
    arch: str = "vgg16",
    weights=None,
    *,
    weights_path: str | Path | None = None,
    expected_sha256: str | None = None,
    allow_download: bool = False,
    num_classes: int | None = None,
) -> nn.Module:
    """A torchvision classification model with pretrained weights, offline by default.

    Parameters
    ----------
    arch : str
        A ``torchvision.models`` name: ``vgg16`` (returned as :class:`VGG`, the paper's layout
        with its layer names), ``vgg16_bn``, ``resnet18``, ``resnet50`` ...
    weights : WeightsEnum, str or None
        torchvision weights: a member (``VGG16_Weights.IMAGENET1K_V1``) or its name
        (``"IMAGENET1K_V1"``, ``"VGG16_Weights.IMAGENET1K_V1"``, ``"DEFAULT"``). The file is
        looked up in torch's hub cache; it is downloaded only with ``allow_download=True``.
    weights_path : path, optional
        A local state-dict file instead (torchvision's file, or your own fine-tuned weights).
    expected_sha256 : str, optional
        Check the file's SHA-256. For torchvision's own files the hash prefix in the file name
        (``vgg16-397923af.pth``) is checked when this is not given.
    allow_download : bool
        Let torchvision download missing weights into the hub cache.
    num_classes : int, optional
        Output classes of a model built for a user file (default: 1000).

    Raises
    ------
    CNPError
        Unknown architecture or weights, a missing file (with the URL to fetch on a machine with
        internet), a wrong hash, or weights that do not fit the architecture.
    """
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise CNPError(f"unknown torchvision classification model {arch!r}; e.g. vgg16, vgg16_bn, resnet18, resnet50")
    w = _resolve_weights(arch, weights)
    if w is not None and weights_path:
        raise CNPError("give either weights (a torchvision enum) or weights_path (a file), not both")
    check_prefix = None
    if w is not None:
        url = w.url
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if not path.is_file():
            if not allow_download:
                raise CNPError(f"{arch} weights {w} are not in torch's hub cache ({path}). Download {url} on a "
                               "machine with internet and pass weights_path=<file> (or put it in that cache), or "
                               "set allow_download=True to let torchvision fetch it")
            w.get_state_dict(progress=True)  # downloads into the hub cache
        weights_path = path
        stem = Path(url).stem
        check_prefix = stem.rsplit("-", 1)[-1] if "-" in stem else None
        num_classes = len(w.meta.get("categories") or []) or 1000
    if arch == "vgg16" and weights_path is not None and (num_classes in (None, 1000)):
        sha = expected_sha256 if expected_sha256 is not None else (VGG16_IMAGENET_SHA256 if check_prefix else None)
        return load_torchvision_vgg16(weights_path, expected_sha256=sha)
    model = (full_vgg16(num_classes or 1000) if arch == "vgg16"
             else tag_torchvision(torchvision.models.get_model(arch, weights=None, num_classes=num_classes or 1000), arch))
    if weights_path is None:
        return model.eval()
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise CNPError(f"weights file {weights_path} does not exist")
    if expected_sha256 is not None or check_prefix:
        digest = sha256_file(weights_path)
        ok = digest == expected_sha256 if expected_sha256 is not None else digest.startswith(check_prefix)
        if not ok:
            raise CNPError(f"weights file {weights_path} has SHA-256 {digest}, expected "
                           f"{expected_sha256 or check_prefix + '...'}: the file is corrupt or another model's; "
                           "download it again, or pass expected_sha256=None for your own weights")
    state = safe_torch_load(weights_path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CNPError(f"{weights_path} does not hold {arch} weights: {exc}") from exc
    return model.eval()
