"""Cost of the kept ablation (method ``cnp-keep``): MACs and latency of the deployed correction.

``cnp-keep`` deploys ``a' = a - U_K' U_K'^T a`` after relu4_3 (:class:`cnp.virtual_layer.KeptAblation`,
``r = |K'| d_k`` columns). This script builds the 80 %-pruned network (conv4_3 kept, the same share
of every other conv removed: what the schedule ends with), attaches the correction with a random
orthonormal ``U_K'`` of ``r`` columns, and times the network with and without it, interleaved, in
one process. Printed per network: MACs per image without / with the correction, the relative
MAC increase, and the latency ratio (median over repeats; min and max beside it).

Networks: ``reduced`` (the embedded benchmark's VGG-16 with 4x narrower blocks, 48 px, D = 128,
K = 8: one subspace is r = 16 columns) and ``vgg16`` (VGG-16 at 224 px, D = 512, the paper's
K = 4: r = 128).

Examples
--------
::

    python bench/bench_kept_ablation.py                     # both networks, CPU
    python bench/bench_kept_ablation.py --quick             # a smoke test (seconds)
    python bench/bench_kept_ablation.py --device cuda --out bench/results/kept_gpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pruned_speed import time_interleaved  # noqa: E402

from cnp.drsa import random_orthogonal  # noqa: E402
from cnp.io import atomic_write_json  # noqa: E402
from cnp.lrp import attach_site  # noqa: E402
from cnp.models import (  # noqa: E402
    VGG,
    block_widths_to_conv_widths,
    conv_index,
    count_macs,
    full_vgg16,
    get_layer,
)
from cnp.pruning import remove_filters  # noqa: E402
from cnp.pruning.schedule import _feature_size  # noqa: E402
from cnp.runtime import resolve_device  # noqa: E402
from cnp.virtual_layer import KeptAblation  # noqa: E402

NETWORKS = {
    "reduced": {"size": 48, "K": 8, "block_widths": (16, 32, 64, 128, 128), "hidden": 256},
    "vgg16": {"size": 224, "K": 4},
}


def build(name: str, ratio: float = 0.8, seed: int = 0) -> tuple[VGG, int, int]:
    """The pruned network, its image size and the correction's rank r (one subspace)."""
    spec = NETWORKS[name]
    torch.manual_seed(seed)
    if name == "vgg16":
        model = full_vgg16(2)
    else:
        model = VGG(block_widths_to_conv_widths(spec["block_widths"]), num_classes=2, hidden=spec["hidden"], pool_size=1)
    model.eval()
    protected = conv_index(model, "conv4_3")
    g = torch.Generator().manual_seed(seed + 1)
    remove = {}
    for i, c in enumerate(model.convs):
        if i != protected:
            n_keep = max(1, int(round((1 - ratio) * c.out_channels)))
            remove[i] = torch.randperm(c.out_channels, generator=g)[: c.out_channels - n_keep]
    model = remove_filters(model, remove).eval()
    D = model.convs[protected].out_channels
    return model, spec["size"], D // spec["K"]


def measure(name: str, batch: int, repeats: int, warmup: int, device: torch.device, size: int | None = None) -> dict:
    model, default_size, r = build(name)
    size = size or default_size
    model = model.to(device)
    D = model.convs[conv_index(model, "conv4_3")].out_channels
    W = random_orthogonal(D, seed=2)[0].float()[:, :r]
    kept = attach_site(model, "relu4_3", KeptAblation(W))
    h = _feature_size(model, get_layer(model, "relu4_3"), size)
    macs_plain = count_macs(model, size)
    macs_kept = macs_plain + kept.extra_macs(h, h)

    class Toggle(torch.nn.Module):
        def __init__(self, on):
            super().__init__()
            self.on = on

        def forward(self, x):
            kept.enabled = self.on
            return model(x)

    x = torch.randn(batch, 3, size, size, device=device)
    times = time_interleaved({"plain": Toggle(False), "kept": Toggle(True)}, x, repeats, warmup, bf16=False,
                             channels_last=False)
    ratios = [k / p for k, p in zip(times["kept"], times["plain"])]
    out = {"network": name, "size": size, "batch": batch, "D": D, "r": r, "macs_plain": macs_plain,
           "macs_kept": macs_kept, "mac_increase": macs_kept / macs_plain - 1,
           "latency_plain_ms": 1000 * statistics.median(times["plain"]),
           "latency_kept_ms": 1000 * statistics.median(times["kept"]),
           "latency_ratio_median": statistics.median(ratios), "latency_ratio_min": min(ratios),
           "latency_ratio_max": max(ratios), "repeats": repeats, "device": str(device)}
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke test: 64 px VGG-16, 2 repeats")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = []
    for name in args.networks:
        size = 64 if (args.quick and name == "vgg16") else None
        reps = 2 if args.quick else args.repeats
        row = measure(name, args.batch, reps, 1 if args.quick else args.warmup, device, size=size)
        rows.append(row)
        print(f"{name:8s} {row['size']:4d} px batch {row['batch']}: r = {row['r']} of D = {row['D']}; "
              f"MACs {row['macs_plain'] / 1e6:.1f} -> {row['macs_kept'] / 1e6:.1f} M (+{100 * row['mac_increase']:.1f} %); "
              f"latency {row['latency_plain_ms']:.1f} -> {row['latency_kept_ms']:.1f} ms, ratio "
              f"{row['latency_ratio_median']:.3f} (min {row['latency_ratio_min']:.3f}, max {row['latency_ratio_max']:.3f})",
              flush=True)
    if args.out:
        atomic_write_json(args.out, {"results": rows, "torch": torch.__version__, "threads": torch.get_num_threads()})
    return rows


if __name__ == "__main__":
    main()
