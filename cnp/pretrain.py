"""Pretraining the embedded benchmark's backbone (the stand-in for ImageNet-pretrained VGG-16).

A VGG-16-topology network of reduced width is trained on the multi-class synthetic corpus
(:mod:`cnp.data.synthetic`) with two losses: object class (cross-entropy) and watermark
presence (binary cross-entropy of an auxiliary head on the penultimate features). BatchNorm is
used while pretraining (it makes the small network learn objects as well as the watermark) and
folded into the convolutions afterwards, so the result is a plain :class:`cnp.models.VGG` with
torchvision's layer names. The backbone is built once and cached under a hash of its recipe.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnp.data.synthetic import CorpusConfig, make_corpus_split
from cnp.images import normalize_images
from cnp.io import (
    CNPError,
    atomic_torch_save,
    cache_dir,
    load_or_build,
    recipe_hash,
    safe_torch_load,
    tensor_hash,
)
from cnp.models import (
    BLOCK_SIZES,
    CONV_NAMES,
    VGG,
    block_widths_to_conv_widths,
    fold_batchnorm,
    layer_outputs,
    load_model,
    save_model,
    tag_torchvision,
)
from cnp.runtime import fixed_threads, progress, seed_everything

PRETRAIN_VERSION = 3
WM_HEADS = ("dense", "global", "both")
#: intra-op threads used for pretraining, whatever the machine has: the backbone is cached and
#: shared, and its bytes depend on the thread count (see :func:`cnp.runtime.fixed_threads`)
PRETRAIN_THREADS = 2


@dataclass(frozen=True)
class BackboneConfig:
    """Recipe of the embedded backbone.

    Parameters
    ----------
    block_widths : tuple of 5 ints
        Conv widths per VGG block (full VGG-16: 64, 128, 256, 512, 512).
    hidden : int
        Width of fc6/fc7.
    pool_size : int
        Adaptive average pool output side before fc6 (1 at 48 px: conv5 maps are 3x3).
    epochs : int
        Pretraining epochs.
    batch_size, lr, weight_decay : training hyper-parameters (AdamW, cosine schedule).
    wm_loss_weight : float
        Weight of the auxiliary watermark BCE loss.
    batchnorm : bool
        Use BatchNorm while pretraining (folded afterwards).
    wm_head : str
        ``dense``: a 1x1-conv head on ``wm_head_layer`` predicts, at every position, whether a
        watermark covers it (the images' watermark masks are the targets), so that layer
        carries a localised watermark feature, as an ImageNet backbone's conv4_3 carries
        text/watermark detectors among its many concepts. ``global``: one watermark logit from
        the pooled last conv features (the watermark reaches the classifier's input).
        ``both`` (default): the two heads together.
    wm_head_layer : str
        The activation the dense head reads (``relu4_3``, the DRSA layer).
    wm_global_weight : float
        Relative weight of the global head's loss (with ``both``); lower values let the
        backbone's pooled features carry the watermark less strongly than the objects.
    seed : int
        Initialisation and shuffling seed.
    corpus : CorpusConfig
        The pretraining corpus.
    """

    block_widths: tuple[int, int, int, int, int] = (16, 32, 64, 128, 128)
    hidden: int = 256
    pool_size: int = 1
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    wm_loss_weight: float = 1.0
    batchnorm: bool = True
    dropout: float = 0.3
    wm_head: str = "both"
    wm_head_layer: str = "relu4_3"
    wm_global_weight: float = 0.3
    seed: int = 0
    corpus: CorpusConfig = field(default_factory=CorpusConfig)

    def recipe(self) -> dict:
        d = asdict(self)
        d["version"] = PRETRAIN_VERSION
        d["corpus"] = self.corpus.recipe()
        return d

    @property
    def image_size(self) -> int:
        return self.corpus.image_size


def init_vgg_weights(module: nn.Module) -> None:
    """torchvision's VGG initialisation (Kaiming-normal convs, small normal linears)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class _PretrainNet(nn.Module):
    """VGG with optional BatchNorm after each conv, plus a watermark head."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        widths = block_widths_to_conv_widths(cfg.block_widths)
        layers: list[nn.Module] = []
        c_in = 3
        it = iter(widths)
        for n in BLOCK_SIZES:
            for _ in range(n):
                w = next(it)
                layers.append(nn.Conv2d(c_in, w, 3, padding=1))
                if cfg.batchnorm:
                    layers.append(nn.BatchNorm2d(w))
                layers.append(nn.ReLU())
                c_in = w
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((cfg.pool_size, cfg.pool_size))
        n_cls = len(cfg.corpus.classes)
        self.classifier = nn.Sequential(
            nn.Linear(c_in * cfg.pool_size ** 2, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, n_cls),
        )
        if cfg.wm_head not in WM_HEADS:
            raise CNPError(f"wm_head must be one of {WM_HEADS}, got {cfg.wm_head!r}")
        self._tap = None
        if cfg.wm_head in ("dense", "both"):
            name = cfg.wm_head_layer
            if not (name.startswith("relu") and "conv" + name[4:] in CONV_NAMES):
                raise CNPError(f"wm_head_layer must be a ReLU output such as 'relu4_3', got {name!r}")
            self._tap = CONV_NAMES.index("conv" + name[4:])  # index among the ReLUs
            self.wm_dense = nn.Conv2d(widths[self._tap], 1, kernel_size=1)
        if cfg.wm_head in ("global", "both"):
            self.wm_global = nn.Sequential(nn.Linear(c_in * cfg.pool_size ** 2, cfg.hidden), nn.ReLU(),
                                           nn.Linear(cfg.hidden, 1))
        self.cfg = cfg
        init_vgg_weights(self)

    def forward(self, x):
        """Class logits and a dict of watermark logits (``dense``: (n, h, w); ``global``: (n,))."""
        tap, n_relu = None, 0
        for m in self.features:
            x = m(x)
            if isinstance(m, nn.ReLU):
                if n_relu == self._tap:
                    tap = x
                n_relu += 1
        h = torch.flatten(self.avgpool(x), 1)
        wm = {}
        if tap is not None:
            wm["dense"] = self.wm_dense(tap).squeeze(1)
        if hasattr(self, "wm_global"):
            wm["global"] = self.wm_global(h).squeeze(1)
        return self.classifier(h), wm

    def wm_loss(self, wm_logits: dict, masks: torch.Tensor, wm: torch.Tensor) -> torch.Tensor:
        """BCE of each watermark head: per-position coverage > 10 % (dense), the image flag (global)."""
        loss = torch.zeros(())
        bce = nn.functional.binary_cross_entropy_with_logits
        if "dense" in wm_logits:
            out = wm_logits["dense"]
            cover = nn.functional.adaptive_avg_pool2d(masks[:, None].float(), out.shape[-2:])[:, 0]
            loss = loss + bce(out, (cover > 0.1).float())
        if "global" in wm_logits:
            loss = loss + self.cfg.wm_global_weight * bce(wm_logits["global"], wm.float())
        return loss

    @staticmethod
    def wm_predict(wm_logits: dict) -> torch.Tensor:
        if "global" in wm_logits:
            return wm_logits["global"] > 0
        return wm_logits["dense"].flatten(1).amax(1) > 0

    def to_vgg(self) -> VGG:
        """Fold BatchNorm and return the plain VGG (the watermark head is dropped)."""
        cfg = self.cfg
        vgg = VGG(block_widths_to_conv_widths(cfg.block_widths), num_classes=len(cfg.corpus.classes),
                  hidden=cfg.hidden, pool_size=cfg.pool_size, dropout=cfg.dropout)
        convs = []
        mods = list(self.features)
        for i, m in enumerate(mods):
            if isinstance(m, nn.Conv2d):
                nxt = mods[i + 1]
                convs.append(fold_batchnorm(m, nxt) if isinstance(nxt, nn.BatchNorm2d) else m)
        for dst, src in zip(vgg.convs, convs):
            dst.load_state_dict(src.state_dict())
        vgg.classifier.load_state_dict(self.classifier.state_dict())
        return vgg.eval()


@dataclass
class BackboneReport:
    """Held-out quality of a pretrained backbone."""

    object_acc: float
    watermark_acc: float
    conv4_3_rank99: int
    conv4_3_width: int
    train_seconds: float

    def __str__(self) -> str:
        return (f"backbone: held-out object accuracy {self.object_acc:.3f}, watermark accuracy "
                f"{self.watermark_acc:.3f}, conv4_3 rank (99% energy) {self.conv4_3_rank99} of "
                f"{self.conv4_3_width}, pretraining {self.train_seconds:.0f} s")


def activation_rank(model: VGG, images_uint8: torch.Tensor, layer: str = "relu4_3",
                    energy: float = 0.99, max_images: int = 500) -> int:
    """Number of principal directions holding ``energy`` of the centred activations at ``layer``."""
    (out,) = layer_outputs(model, layer, [normalize_images(images_uint8[:max_images])])
    a = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]).double()
    a = a - a.mean(0)
    ev = torch.linalg.eigvalsh(a.T @ a).flip(0).clamp(min=0)
    cum = torch.cumsum(ev, 0) / ev.sum()
    return int((cum < energy).sum().item()) + 1


def train_backbone(cfg: BackboneConfig, verbose: bool = True) -> tuple[VGG, BackboneReport]:
    """Pretrain a backbone from its recipe (no caching; see :func:`load_backbone`).

    Runs with :data:`PRETRAIN_THREADS` threads so that the result does not depend on the machine's
    core count (same torch build and CPU instruction set: same bytes).
    """
    with fixed_threads(PRETRAIN_THREADS):
        return _train_backbone(cfg, verbose)


def _fit_heads(net: nn.Module, cfg: BackboneConfig, g: torch.Generator, train, val, desc: str,
               verbose: bool) -> tuple[float, float]:
    """Train ``net`` (class logits + watermark heads) on the corpus; object and watermark accuracy
    on the held-out images. AdamW with a one-cycle schedule, a horizontal flip per batch."""
    x_tr, y_tr, w_tr, m_tr = train
    x_va, y_va, w_va = val
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(y_tr) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.15)
    ce = nn.CrossEntropyLoss()
    for _epoch in progress(range(cfg.epochs), desc=desc, disable=not verbose):
        net.train()
        perm = torch.randperm(len(y_tr), generator=g)
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            x = normalize_images(x_tr[idx])
            masks = m_tr[idx]
            if torch.rand(1, generator=g).item() < 0.5:  # horizontal flip augmentation (per batch)
                x, masks = x.flip(3), masks.flip(2)
            logits, wm_logits = net(x)
            loss = ce(logits, y_tr[idx]) + cfg.wm_loss_weight * net.wm_loss(wm_logits, masks, w_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        logits, wm_pred = [], []
        for start in range(0, len(y_va), 256):
            a, b = net(normalize_images(x_va[start:start + 256]))
            logits.append(a)
            wm_pred.append(net.wm_predict(b))
        obj_acc = (torch.cat(logits).argmax(1) == y_va).float().mean().item()
        wm_acc = (torch.cat(wm_pred) == w_va).float().mean().item()
    return obj_acc, wm_acc


def _train_backbone(cfg: BackboneConfig, verbose: bool) -> tuple[VGG, BackboneReport]:
    t0 = time.perf_counter()
    g = seed_everything(cfg.seed)
    x_tr, y_tr, w_tr, m_tr = make_corpus_split(cfg.corpus, "train")
    x_va, y_va, w_va, _ = make_corpus_split(cfg.corpus, "val")
    net = _PretrainNet(cfg)
    obj_acc, wm_acc = _fit_heads(net, cfg, g, (x_tr, y_tr, w_tr, m_tr), (x_va, y_va, w_va), "pretrain backbone",
                                 verbose)
    vgg = net.to_vgg()
    rank = activation_rank(vgg, x_va)
    report = BackboneReport(obj_acc, wm_acc, rank, vgg.conv_widths[9], time.perf_counter() - t0)
    return vgg, report


def backbone_path(cfg: BackboneConfig) -> Path:
    return cache_dir() / "backbones" / f"vgg16-synthetic-{recipe_hash(cfg.recipe())}.pt"


def load_backbone(cfg: BackboneConfig | None = None, use_cache: bool = True,
                  verbose: bool = True) -> tuple[VGG, BackboneReport]:
    """The pretrained backbone for ``cfg``: from the cache, or trained and cached.

    The cache file stores the recipe and a content hash of the weights; a stale or corrupt file
    is detected, reported and rebuilt.
    """
    cfg = cfg or BackboneConfig()
    recipe = _jsonable(cfg.recipe())

    def build():
        if verbose:
            print(f"[cnp] pretraining the embedded backbone ({cfg.epochs} epochs on "
                  f"{len(cfg.corpus.classes)} classes x {cfg.corpus.n_per_class} images); cached afterwards")
        model, report = train_backbone(cfg, verbose=verbose)
        if verbose:
            print(f"[cnp] {report}")
        return model, {"recipe": recipe, "report": asdict(report), "weights_hash": _weights_hash(model)}

    model, extra = load_or_build(backbone_path(cfg), build, what="cached backbone", load=_read_model,
                                 save=lambda path, obj: save_model(obj[0], path, **obj[1]),
                                 check=lambda obj: _stale(obj[0], obj[1], recipe), use_cache=use_cache,
                                 verbose=verbose)
    return model.eval(), BackboneReport(**extra["report"])


def _read_model(path: Path) -> tuple[nn.Module, dict]:
    """:func:`~cnp.models.load_model`, with every way a file can fail to load as a CNPError."""
    try:
        return load_model(path)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CNPError(f"{type(exc).__name__}: {exc}") from exc


def _stale(model: nn.Module, extra: dict, recipe: dict) -> str | None:
    """Why a cached backbone cannot be used (``None``: it can)."""
    ok_recipe = extra.get("recipe") == recipe
    ok_hash = extra.get("weights_hash") == _weights_hash(model)
    if ok_recipe and ok_hash and "report" in extra:
        return None
    return f"is stale or corrupt (recipe ok: {ok_recipe}, weights hash ok: {ok_hash})"


def _weights_hash(model: nn.Module) -> str:
    return tensor_hash(*[v for _, v in sorted(model.state_dict().items())])


def _jsonable(obj):
    """Tuples to lists, recursively (what a round trip through a checkpoint gives back)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ------------------------------------------------------------------ other torchvision architectures
#: torchvision architectures the embedded corpus can pretrain (any classification CNN of
#: ``torchvision.models`` works; these are the ones the tests and documented runs use)
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn", "vgg16")


class _TorchvisionPretrainNet(nn.Module):
    """A torchvision model with the embedded backbone's two watermark heads.

    ``dense``: a 1x1 conv on the output of ``tap`` (the DRSA layer, e.g. ``layer3``) predicts
    per position whether a watermark covers it; ``global``: one logit from the input of the last
    linear layer (the pooled features). Same losses as the VGG backbone's (see :class:`BackboneConfig`).
    """

    def __init__(self, arch: str, num_classes: int, tap: str, cfg: BackboneConfig) -> None:
        super().__init__()
        import torchvision

        from cnp.warmup import last_linear

        self.cfg = cfg
        self.net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        self._grab: dict[str, torch.Tensor] = {}
        tap_mod = dict(self.net.named_modules()).get(tap)
        if tap_mod is None:
            raise CNPError(f"{arch} has no module {tap!r} for the watermark head; use e.g. 'layer3'")
        _, head = last_linear(self.net)
        with torch.no_grad():
            probe = {}
            h1 = tap_mod.register_forward_hook(lambda m, i, o: probe.setdefault("tap", o))
            h2 = head.register_forward_pre_hook(lambda m, i: probe.setdefault("pooled", i[0]))
            was = self.net.training
            self.net.eval()
            self.net(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
            self.net.train(was)
            h1.remove()
            h2.remove()
        self.wm_dense = nn.Conv2d(probe["tap"].shape[1], 1, 1)
        self.wm_global = nn.Linear(probe["pooled"].shape[1], 1)
        tap_mod.register_forward_hook(lambda m, i, o: self._grab.__setitem__("tap", o))
        head.register_forward_pre_hook(lambda m, i: self._grab.__setitem__("pooled", i[0]))

    def forward(self, x):
        logits = self.net(x)
        wm = {}
        if self.cfg.wm_head in ("dense", "both"):
            wm["dense"] = self.wm_dense(self._grab["tap"]).squeeze(1)
        if self.cfg.wm_head in ("global", "both"):
            wm["global"] = self.wm_global(self._grab["pooled"]).squeeze(1)
        return logits, wm

    wm_loss = _PretrainNet.wm_loss
    wm_predict = staticmethod(_PretrainNet.wm_predict)


def _train_torchvision(arch: str, tap: str, cfg: BackboneConfig, verbose: bool) -> tuple[nn.Module, dict]:
    t0 = time.perf_counter()
    g = seed_everything(cfg.seed)
    x_tr, y_tr, w_tr, m_tr = make_corpus_split(cfg.corpus, "train")
    x_va, y_va, w_va, _ = make_corpus_split(cfg.corpus, "val")
    net = _TorchvisionPretrainNet(arch, len(cfg.corpus.classes), tap, cfg)
    obj_acc, wm_acc = _fit_heads(net, cfg, g, (x_tr, y_tr, w_tr, m_tr), (x_va, y_va, w_va), f"pretrain {arch}",
                                 verbose)
    model = net.net
    model._forward_hooks.clear()
    for m in model.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    report = {"arch": arch, "object_accuracy": obj_acc, "watermark_accuracy": wm_acc,
              "seconds": time.perf_counter() - t0}
    return model.eval(), report


def torchvision_backbone_path(arch: str, tap: str, cfg: BackboneConfig) -> Path:
    return cache_dir() / "backbones" / f"{arch}-synthetic-{recipe_hash({'arch': arch, 'tap': tap, **cfg.recipe()})}.pt"


def load_torchvision_backbone(arch: str = "resnet18", tap: str = "layer3", cfg: BackboneConfig | None = None,
                              use_cache: bool = True, verbose: bool = True) -> tuple[nn.Module, dict]:
    """A torchvision architecture (``resnet18`` ...) pretrained on the embedded corpus, cached.

    The same corpus, losses and schedule as the VGG-16-topology backbone (:func:`load_backbone`),
    with the dense watermark head on ``tap`` (the DRSA layer). BatchNorm stays in the model (LRP
    merges it through zennit's canonizers). Returns the model (eval mode, one output per corpus
    class) and a report (object and watermark accuracy on held-out corpus images, seconds).
    """
    import torchvision


    cfg = cfg or BackboneConfig()
    recipe = _jsonable({"arch": arch, "tap": tap, **cfg.recipe()})

    def read(path: Path) -> tuple[nn.Module, dict]:
        blob = safe_torch_load(path)
        try:
            model = torchvision.models.get_model(arch, weights=None, num_classes=len(cfg.corpus.classes))
            model.load_state_dict(blob["state_dict"])
        except (KeyError, TypeError, RuntimeError) as exc:
            raise CNPError(f"{type(exc).__name__}: {exc}") from exc
        return model, blob

    def build() -> tuple[nn.Module, dict]:
        if verbose:
            print(f"[cnp] pretraining {arch} on the embedded corpus ({cfg.epochs} epochs); cached afterwards")
        with fixed_threads(PRETRAIN_THREADS):
            model, report = _train_torchvision(arch, tap, cfg, verbose)
        if verbose:
            print(f"[cnp] {arch}: object accuracy {report['object_accuracy']:.3f}, watermark accuracy "
                  f"{report['watermark_accuracy']:.3f} ({report['seconds']:.0f} s)")
        return model, {"arch": arch, "recipe": recipe, "report": report, "weights_hash": _weights_hash(model)}

    def save(path: Path, obj: tuple[nn.Module, dict]) -> None:
        state = {k: v.detach().cpu() for k, v in obj[0].state_dict().items()}
        atomic_torch_save(path, {**obj[1], "state_dict": state})

    model, blob = load_or_build(torchvision_backbone_path(arch, tap, cfg), build, what="cached backbone", load=read,
                                save=save, check=lambda obj: _stale(obj[0], obj[1], recipe), use_cache=use_cache,
                                verbose=verbose)
    tag_torchvision(model, arch)
    return model.eval(), blob["report"]
