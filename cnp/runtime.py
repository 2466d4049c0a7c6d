"""Runtime helpers: seeding, devices, threads, progress bars and stage timers."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator

import numpy as np
import torch

from cnp.io import CNPError


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded with ``seed``."""
    if not isinstance(seed, int) or seed < 0:
        raise CNPError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``'auto'`` gives CUDA when available, else the CPU; anything else is checked.

    Raises
    ------
    CNPError
        When CUDA is requested but not available.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CNPError(f"device {device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    return dev


#: values of the ``precision`` parameter (the fine-tunes' arithmetic; ranking, LRP and evaluation
#: are always fp32): ``auto`` and ``bf16`` = bf16 autocast on every device that computes bf16
#: natively (:func:`bf16_native`: CUDA, CPUs with AVX512-BF16 or AMX; fp32 elsewhere, where bf16
#: would be emulated and slower); ``fp32`` everywhere. (Before version 0.5, ``auto`` was fp32 on
#: every CPU.)
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")
#: values of the ``memory_format`` parameter (the layout of the convolutions' weights and activations)
MEMORY_FORMATS: tuple[str, ...] = ("channels_last", "contiguous")


def bf16_native(device: str | torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA device that supports it, or a CPU with
    AVX512-BF16 or AMX (elsewhere bf16 is emulated, slower than fp32, and not used)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(f()) for f in checks if f is not None)


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The arithmetic of the fine-tunes for a ``precision`` parameter (:data:`PRECISIONS`) on
    ``device``: ``"bf16"`` (autocast) or ``"fp32"``.

    ``auto`` (like ``bf16``) is bf16 where the device computes it natively: on a CPU with AMX the
    fine-tunes of the embedded benchmark run 2.1x faster (docs/performance.md, where the 10-seed
    comparison with fp32 fine-tunes is), and the arithmetic is that of CUDA's bf16 autocast.
    """
    if precision not in PRECISIONS:
        raise CNPError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return "fp32"
    return "bf16" if bf16_native(device) else "fp32"


def set_memory_format(model: torch.nn.Module, memory_format: str = "channels_last") -> torch.nn.Module:
    """Put ``model``'s 4-D weights into ``memory_format`` (in place; returns ``model``).

    With channels_last weights every convolution computes in NHWC whatever its input's layout
    (oneDNN on the CPU, cuDNN on CUDA): on the embedded benchmark's narrow VGG-16 evaluation
    runs 1.7x and fine-tuning 1.2x faster than in NCHW on the CPU. The kernels differ, so the
    float rounding differs from ``"contiguous"`` (the layout of earlier versions).
    """
    if memory_format not in MEMORY_FORMATS:
        raise CNPError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    return model.to(memory_format=fmt)


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads (default: ``CNP_THREADS`` or all cores); return the value."""
    if num_threads is None:
        env = os.environ.get("CNP_THREADS")
        num_threads = int(env) if env else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, int(num_threads)))
    return torch.get_num_threads()


@contextlib.contextmanager
def fixed_threads(num_threads: int) -> Iterator[int]:
    """Run a block with exactly ``num_threads`` intra-op threads, then restore the previous count.

    Float reductions in torch's CPU kernels are split by thread count, so training with 1 and with
    2 threads gives (slightly, and after chaotic training visibly) different weights. Work whose
    result is cached and shared (the pretrained backbone) pins its thread count with this so that
    every machine with the same torch build and CPU instruction set gets the same bytes.
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, int(num_threads)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(prev)


def progress(iterable=None, **kwargs):
    """``tqdm.auto`` progress bar; disabled when ``CNP_PROGRESS=0``."""
    from tqdm.auto import tqdm

    if os.environ.get("CNP_PROGRESS", "1") == "0":
        kwargs["disable"] = True
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


class StageTimer:
    """Accumulates wall time per named stage: ``with timer('drsa'): ...``."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t0


def stage_breakdown(stages: dict[str, float], parts: dict[str, dict[str, float]] | None = None,
                    cached: set[str] | frozenset[str] = frozenset(), title: str = "time per stage") -> str:
    """A table of seconds per stage, with an optional breakdown of some stages into parts.

    ``stages``: stage -> seconds; ``parts``: stage -> {part: seconds} printed indented under the
    stage (e.g. a pruning method's rank / remove / fine-tune / evaluate); ``cached``: stages whose
    results were loaded rather than computed in this call (their recorded time is shown, marked).
    """
    lines = [title]
    total = 0.0
    for name, sec in stages.items():
        total += sec
        mark = "  (recorded earlier, not rerun)" if name in cached else ""
        lines.append(f"  {name:<22s} {sec:9.1f} s{mark}")
        for part, psec in (parts or {}).get(name, {}).items():
            share = f"{100 * psec / sec:5.1f} %" if sec > 0 else ""
            lines.append(f"    {part:<20s} {psec:9.1f} s  {share}")
    lines.append(f"  {'total':<22s} {total:9.1f} s")
    return "\n".join(lines)

