"""Shared fixtures: one CPU thread, a deterministic seed, a tiny VGG with a 2-way head, tiny data.

The tiny VGG has the full VGG-16 topology (13 convs, torchvision layer names, ``features.22`` =
``relu4_3``) at block widths (4, 8, 8, 16, 16), so ``relu4_3`` has D = 16 channels (4 x 4
positions at 32 px). Its weights are He-normal with zero biases (unless asked otherwise) and
its last layer is scaled so that the logits are O(1): with zero biases every unit that is
active has a positive pre-activation made only of ``x_i w_ij`` terms, so LRP-alpha1beta0 finds a
positive denominator everywhere relevance arrives and conserves relevance exactly (up to the
1e-6 stabiliser). See ``test_lrp.py`` for the case where it does not.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

# Two shared cores: one intra-op thread is as fast for these tiny problems and does not fight
# with other work on the machine.
torch.set_num_threads(1)
os.environ.setdefault("CNP_PROGRESS", "0")

TINY_BLOCK_WIDTHS = (4, 8, 8, 16, 16)
TINY_D = 16  # channels at relu4_3 of the tiny VGG


#: The long modules: those whose tests share an expensive module- or session-scoped fixture (a
#: fresh cache with its own pretrained smoke backbone, reference runs in subprocesses) or hold a
#: test of minutes (the sweep killed and resumed, the claims test, the GPU check script at tiny
#: sizes), longest first. ``make test`` spreads the tests over two pytest-xdist workers with
#: ``--dist loadgroup``, for which :func:`pytest_xdist_make_scheduler` below makes each of these
#: modules one unit of work (one worker, so its fixtures are built once) and every other test a
#: unit of its own, handed out in the collection order; these modules are collected first, in
#: this order, so that they start early and the short tests fill the other worker.
LONG_MODULES = ("test_sweep", "test_reliability", "test_claims", "test_api", "test_performance", "test_install",
                "test_imagenet", "test_folder_data", "test_drsa")


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(LONG_MODULES)}
    # a stable sort: each module's tests stay together and in their order
    items.sort(key=lambda item: first.get(item.path.stem, len(first)))


def long_modules_scheduler(config, log, long_modules):
    """pytest-xdist's scope scheduler with the ``long_modules`` as units and every other test alone,
    in the collection order (not reordered by the number of tests per unit).

    What ``--dist loadgroup`` with ``xdist_group`` marks did, without the marks: pytest-xdist 3.8
    passes a test's group in its node id, which pytest 9.2 no longer lets it change, so the marks
    were silently ignored (and a long module's fixtures were built on both workers)."""
    from xdist.scheduler import LoadScopeScheduling

    class LongModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module.rsplit("/", 1)[-1].removesuffix(".py") in long_modules else nodeid

    config.option.loadscopereorder = False
    return LongModulesTogether(config, log)


@pytest.hookimpl(optionalhook=True)   # pytest-xdist's hook: absent without pytest-xdist
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None   # any other --dist: pytest-xdist's own scheduler
    return long_modules_scheduler(config, log, LONG_MODULES)


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    torch.set_num_threads(1)
    os.environ["CNP_PROGRESS"] = "0"
    yield


@pytest.fixture
def seed() -> int:
    """A deterministic seed (the global torch RNG is seeded with it)."""
    torch.manual_seed(0)
    return 0


def init_vgg_(model: nn.Module, seed: int = 0, bias_std: float = 0.0, head_scale: float = 1.0) -> nn.Module:
    """He-normal weights, N(0, bias_std) biases, last linear layer scaled by ``head_scale``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d | nn.Linear):
                fan_in = mod.weight[0].numel()
                mod.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=g)
                if bias_std > 0:
                    mod.bias.normal_(0.0, bias_std, generator=g)
                else:
                    mod.bias.zero_()
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.mul_(head_scale)
    return model.eval()


@pytest.fixture
def make_tiny_vgg():
    """Factory of tiny VGGs: ``make_tiny_vgg(seed=0, bias_std=0.0, pool_size=1, ...)``."""
    from cnp.models import VGG, block_widths_to_conv_widths

    def factory(seed: int = 0, bias_std: float = 0.0, pool_size: int = 1, hidden: int = 16,
                head_scale: float = 4.0, block_widths=TINY_BLOCK_WIDTHS, dropout: float = 0.0):
        model = VGG(block_widths_to_conv_widths(block_widths), num_classes=2, hidden=hidden,
                    pool_size=pool_size, dropout=dropout)
        return init_vgg_(model, seed=seed, bias_std=bias_std, head_scale=head_scale)

    return factory


@pytest.fixture
def tiny_vgg(make_tiny_vgg, seed):
    """Tiny VGG (block widths 4-8-8-16-16), 2 classes, zero biases, O(1) logits."""
    return make_tiny_vgg(seed=seed)


def random_images(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    """uint8 (n, 3, size, size) random images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.fixture
def tiny_x() -> torch.Tensor:
    """Three ImageNet-normalised 32 px images (inside the pixel box that ZBox assumes)."""
    from cnp.images import normalize_images

    return normalize_images(random_images(3, 32, seed=1))


@pytest.fixture
def random_U():
    """Factory of random orthonormal D x D float32 matrices: ``random_U(D, seed)``."""
    from cnp.drsa import random_orthogonal

    def factory(D: int = TINY_D, seed: int = 3) -> torch.Tensor:
        return random_orthogonal(D, seed=seed)[0].float()

    return factory


@pytest.fixture(scope="session")
def tiny_pair():
    """A tiny synthetic carton-dugong PairData at 32 px (train 16, drsa 6, rank 6, val 8, test 12)."""
    from cnp.data.synthetic import PairConfig, make_pair

    return make_pair(PairConfig(pair="carton-dugong", seed=0, image_size=32, n_train_per_class=8,
                                n_drsa=6, n_rank=6, n_val_per_subgroup=2, n_test_per_subgroup=3))


@pytest.fixture
def make_images():
    """``make_images(n, size=32, seed=1)``: random uint8 images."""
    return random_images


@pytest.fixture
def init_vgg():
    """``init_vgg(model, seed=0, bias_std=0.0, head_scale=1.0)``: He-normal re-initialisation."""
    return init_vgg_
