"""Does structural pruning pay? The 80 %-pruned VGG-16 against the unpruned one, side by side.

Both networks are built in this process (random weights, 2 classes as in the paper's binary
task) and timed interleaved (unpruned, pruned, unpruned, ...) on the same random batch, so load
from other work on the machine hits both alike; the figure is the ratio of the median latencies.
The pruned networks are made with the package's own surgery (:func:`cnp.pruning.remove_filters`),
keeping the same share of filters in every conv:

* ``uniform``: 20 % of the filters of *every* conv are kept (the setting of REFERENCE.md's
  measurement: 15.50 -> 0.65 GMACs, 11.8x lower latency on this CPU with 2 threads);
* ``paper``: ``conv4_3`` (the DRSA layer) is protected as in the paper's schedule and keeps its
  512 filters; 80 % of the other 3712 (prunable) filters are removed, the same share in every
  other conv. This is what :func:`cnp.pruning.run_pruning` produces at 80 % (its global
  ranking may distribute the removals differently), so the target is judged on it.

Target: >= 8x lower latency on the CPU at batch 8, 224 px.

Examples
--------
CPU (about a minute with the defaults)::

    python bench/bench_pruned_speed.py --threads 2 --out bench/results/pruned_speed_cpu.json

GPU (fp32 and bf16 autocast, batch 8 and 64)::

    python bench/bench_pruned_speed.py --device cuda --batch 8 64 --bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnp.io import atomic_write_json  # noqa: E402
from cnp.models import conv_index, count_macs, count_params, full_vgg16  # noqa: E402
from cnp.pruning import remove_filters  # noqa: E402
from cnp.runtime import resolve_device  # noqa: E402

TARGET_SPEEDUP = 8.0


def pruned_vgg16(ratio: float, protect: tuple[str, ...] = (), seed: int = 0, num_classes: int = 2):
    """Full VGG-16 with ``ratio`` of the filters of every unprotected conv removed (random choice)."""
    torch.manual_seed(seed)
    model = full_vgg16(num_classes).eval()
    protected = {conv_index(model, p) for p in protect}
    g = torch.Generator().manual_seed(seed + 1)
    remove = {}
    for i, c in enumerate(model.convs):
        if i in protected:
            continue
        n_keep = max(1, int(round((1.0 - ratio) * c.out_channels)))
        remove[i] = torch.randperm(c.out_channels, generator=g)[: c.out_channels - n_keep]
    return remove_filters(model, remove).eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(models: dict, x: torch.Tensor, repeats: int, warmup: int, bf16: bool,
                     channels_last: bool) -> dict[str, list[float]]:
    """Per-call latencies [s] of each model, calls interleaved round-robin."""
    device = x.device
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    use_amp = bf16 and device.type == "cuda"
    times = {k: [] for k in models}
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        for r in range(warmup + repeats):
            for name, m in models.items():
                _sync(device)
                t0 = time.perf_counter()
                m(x)
                _sync(device)
                if r >= warmup:
                    times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--ratio", type=float, default=0.8, help="share of filters removed (0.8)")
    p.add_argument("--configs", nargs="+", default=["paper", "uniform"], choices=["paper", "uniform"])
    p.add_argument("--repeats", type=int, default=None, help="timed calls per model (CPU 10, GPU 50)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per model first (CPU 2, GPU 10)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--bf16", action="store_true", help="on CUDA also time bf16 autocast + channels_last")
    p.add_argument("--quick", action="store_true", help="tiny run: 64 px, 3 repeats (a smoke test)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.quick:
        args.size, args.repeats, args.warmup = 64, 3, 1
    repeats = args.repeats or (50 if device.type == "cuda" else 10)
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 2)

    torch.manual_seed(0)
    models = {"unpruned": full_vgg16(2).eval()}
    if "paper" in args.configs:
        models["paper"] = pruned_vgg16(args.ratio, protect=("conv4_3",))
    if "uniform" in args.configs:
        models["uniform"] = pruned_vgg16(args.ratio)
    models = {k: m.to(device) for k, m in models.items()}
    modes = [("fp32", False, False)]
    if args.bf16 and device.type == "cuda":
        modes.append(("bf16+channels_last", True, True))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    load = os.getloadavg()
    print(f"pruned speed: VGG-16, {args.ratio:.0%} of the filters removed, {args.size} px, device={device} "
          f"({dev_name}), torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    print(f"target: >= {TARGET_SPEEDUP:g}x lower latency than the unpruned network on the CPU at batch 8, "
          "224 px ('paper' config)")
    results = []
    macs = {k: count_macs(m, args.size) for k, m in models.items()}
    for name, m in models.items():
        print(f"  {name:<8s} conv widths {m.conv_widths}  {macs[name] / 1e9:.3f} GMACs/img  "
              f"{count_params(m) / 1e6:.2f} M params")
    hdr = (f"{'config':<9s} {'mode':<19s} {'batch':>5s} {'GMACs':>7s} {'MAC ratio':>9s} {'ms/batch':>9s} "
           f"{'img/s':>8s} {'speed-up':>8s}  verdict")
    print(hdr)
    print("-" * len(hdr))
    for batch in args.batch:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, args.size, args.size, generator=g).to(device)
        for mode, bf16, cl in modes:
            ms = models
            if cl:
                ms = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
            times = time_interleaved(ms, x, repeats, warmup, bf16, cl)
            med = {k: statistics.median(v) for k, v in times.items()}
            for name in models:
                sp = med["unpruned"] / med[name]
                judged = (name == "paper" and device.type == "cpu" and batch == 8 and args.size == 224
                          and mode == "fp32")
                verdict = "-" if name == "unpruned" else (
                    ("PASS" if sp >= TARGET_SPEEDUP else "FAIL") if judged else "(info)")
                print(f"{name:<9s} {mode:<19s} {batch:5d} {macs[name] / 1e9:7.3f} "
                      f"{macs['unpruned'] / macs[name]:8.1f}x {1e3 * med[name]:9.1f} {batch / med[name]:8.1f} "
                      f"{sp:7.2f}x  {verdict}")
                results.append({
                    "config": name, "mode": mode, "batch": batch, "gmacs_per_image": macs[name] / 1e9,
                    "mac_ratio": macs["unpruned"] / macs[name], "median_s": med[name],
                    "min_s": min(times[name]), "images_per_s": batch / med[name], "speedup": sp,
                    "judged": judged, "pass": (sp >= TARGET_SPEEDUP) if judged else None,
                    "conv_widths": models[name].conv_widths,
                })
            if cl:
                models = {k: m.to(memory_format=torch.contiguous_format) for k, m in models.items()}
    load_after = os.getloadavg()
    print(f"load average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    out = {
        "bench": "pruned_speed", "device": str(device), "device_name": dev_name, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "size": args.size, "ratio": args.ratio, "repeats": repeats,
        "warmup": warmup, "loadavg_before": load, "loadavg_after": load_after, "results": results,
        "target_speedup": TARGET_SPEEDUP,
    }
    if args.out is not None:
        atomic_write_json(args.out, out)
        print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
