"""How close do a run's convolutions come to what this CPU can compute? A roofline check.

A run's cost on the CPU is the fine-tunes, evaluations and LRP passes of the pruning schedule,
and the profiles (``bench/results/profile-prune-*``) put 75-85 % of it inside the convolutions and
their gradients. Whether a run can be made 2x faster without changing what it computes is then a
question of how far those are from the machine's arithmetic peak. This script measures, side by
side in one process and on one thread:

* the practical fp32 peak: a square fp32 matrix product (``--gemm`` x ``--gemm``), the fastest
  kernel oneDNN/MKL has on this core, in GMAC/s (multiply-accumulates per second);
* the reduced VGG-16 of the embedded benchmark (48 px, block widths 16-32-64-128-128, the layout
  a run uses: channels_last) unpruned and with the same share of every conv's filters removed
  (``--pruned``: 0.4 and 0.8 by default, the middle and the end of the schedule), each timed for
  - a training step (forward, backward, SGD with momentum; batch 64, as the fine-tunes), counted
    as 3 x the forward MACs minus the first conv's input gradient (never computed);
  - an inference forward pass (batch 256 under ``torch.inference_mode``, as the evaluations);
* and prints each as a share of the GEMM peak. Calls are interleaved round-robin (GEMM, model A,
  model B, ...) so that other load on the machine hits all alike; figures are medians.

Reading it: if training steps run at a share ``e`` of the peak, no change that keeps the
arithmetic can make them more than ``1 / e`` times faster on this core; a 2x faster run needs
``e <= 0.5`` or less work. The last lines weight the levels as the pruning schedule does (its
default levels are those of the ``reproduce`` settings, 10 % steps to 80 %): one fine-tune after
each step and one more at the last level, one evaluation before the first step, after each step
and after the final fine-tune. With uniform removal this approximates the schedule's own
(global, layer-uneven) choice of filters.

Example::

    python bench/bench_efficiency.py --threads 1 --out bench/results/efficiency_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnp.io import atomic_write_json  # noqa: E402
from cnp.models import VGG, block_widths_to_conv_widths, count_macs  # noqa: E402
from cnp.pruning import remove_filters  # noqa: E402
from cnp.runtime import set_memory_format  # noqa: E402

#: the embedded backbone's architecture (cnp.pretrain.BackboneConfig): block widths, fc width, image size
BLOCK_WIDTHS = (16, 32, 64, 128, 128)
HIDDEN = 256
SIZE = 48


def reduced_vgg(removed: float, seed: int = 0) -> VGG:
    """The reduced VGG-16 with ``removed`` of every conv's filters removed (a random choice)."""
    torch.manual_seed(seed)
    model = VGG(block_widths_to_conv_widths(BLOCK_WIDTHS), num_classes=2, hidden=HIDDEN, pool_size=1, dropout=0.3)
    if removed > 0:
        g = torch.Generator().manual_seed(seed + 1)
        remove = {}
        for i, c in enumerate(model.convs):
            n_keep = max(1, int(round((1.0 - removed) * c.out_channels)))
            remove[i] = torch.randperm(c.out_channels, generator=g)[: c.out_channels - n_keep]
        model = remove_filters(model, remove)
    return set_memory_format(model, "channels_last")


def training_macs(model: VGG, size: int) -> int:
    """MACs of one training step per image: forward, input gradients (but the first conv's) and
    weight gradients, each as many MACs as the forward pass of its layer."""
    first = model.convs[0]
    first_macs = size * size * first.in_channels * first.out_channels * first.kernel_size[0] * first.kernel_size[1]
    return 3 * count_macs(model, size) - first_macs


def gemm_call(n: int):
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)

    def call():
        torch.mm(a, b, out=out)
    return call, n ** 3


def train_call(model: VGG, batch: int, size: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def call():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return call, training_macs(model, size) * batch


def infer_call(model: VGG, batch: int, size: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    model = model.eval()

    def call():
        with torch.inference_mode():
            model(x)
    return call, count_macs(model, size) * batch


def tag(removed: float) -> str:
    return "unpruned" if removed == 0 else f"{removed:.0%} removed"


def schedule_bounds(rows: list[dict], levels: list[float]) -> dict[str, dict]:
    """Seconds per batch of the schedule's fine-tunes (one per level, one more at the last) and
    evaluations (unpruned, one per level, one more at the last), measured and at the GEMM rate."""
    by = {r["what"]: r for r in rows}
    peak = by["gemm"]["gmac_per_s"] * 1e9
    plan = {"fine-tunes": ("train", [*levels, levels[-1]] if levels else []),
            "evaluations": ("infer", [0.0, *levels, levels[-1]] if levels else [0.0])}
    out = {}
    for name, (kind, at) in plan.items():
        picked = [by[f"{kind} {tag(r)}"] for r in at]
        if not picked:
            continue
        now = sum(r["median_s"] for r in picked)
        best = sum(r["macs"] for r in picked) / peak
        out[name] = {"levels": at, "seconds_per_batch": now, "seconds_at_gemm_rate": best, "bound": now / best}
    return out


def time_interleaved(calls: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    times = {k: [] for k in calls}
    for r in range(warmup + repeats):
        for name, (call, _macs) in calls.items():
            t0 = time.perf_counter()
            call()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: as a run of the sweep)")
    p.add_argument("--pruned", type=float, nargs="*", default=[round(0.1 * k, 1) for k in range(1, 9)],
                   help="shares of filters removed: the schedule's levels (default 0.1 ... 0.8)")
    p.add_argument("--gemm", type=int, default=1024, help="side of the square fp32 GEMM (the peak)")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--infer-batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a smoke test: 3 repeats, small GEMM and batches")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.gemm, args.train_batch, args.infer_batch = 3, 1, 256, 8, 16
    if min(args.repeats, args.train_batch, args.infer_batch, args.gemm, args.threads) < 1:
        p.error("--repeats, --train-batch, --infer-batch, --gemm and --threads must be >= 1")
    if any(not 0 <= r < 1 for r in args.pruned):
        p.error("--pruned takes shares in [0, 1)")
    torch.set_num_threads(args.threads)

    calls = {"gemm": gemm_call(args.gemm)}
    for removed in [0.0, *sorted(set(args.pruned) - {0.0})]:
        calls[f"train {tag(removed)}"] = train_call(reduced_vgg(removed), args.train_batch, SIZE)
        calls[f"infer {tag(removed)}"] = infer_call(reduced_vgg(removed), args.infer_batch, SIZE)
    load = os.getloadavg()
    print(f"efficiency: reduced VGG-16 at {SIZE} px (channels_last) vs a {args.gemm}^3 fp32 GEMM, "
          f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
          f"load average {load[0]:.2f} on {os.cpu_count()} cores")
    times = time_interleaved(calls, args.repeats, args.warmup)
    rows = []
    peak = None
    for name, (_call, macs) in calls.items():
        med = statistics.median(times[name])
        rate = macs / med / 1e9
        peak = rate if name == "gemm" else peak
        rows.append({"what": name, "macs": int(macs), "median_s": med, "min_s": min(times[name]),
                     "max_s": max(times[name]), "gmac_per_s": rate, "share_of_gemm": rate / peak})
    hdr = f"{'what':<20s} {'GMAC/call':>10s} {'ms/call':>9s} {'GMAC/s':>8s} {'of GEMM':>8s}  bound on a speed-up"
    print(hdr + "\n" + "-" * len(hdr))
    for r in rows:
        bound = "" if r["what"] == "gemm" else f"{1 / r['share_of_gemm']:.2f}x"
        print(f"{r['what']:<20s} {r['macs'] / 1e9:>10.3f} {r['median_s'] * 1e3:>9.1f} {r['gmac_per_s']:>8.1f} "
              f"{r['share_of_gemm']:>8.2f}  {bound}")
    schedule = schedule_bounds(rows, sorted(set(args.pruned)))
    for name, b in schedule.items():
        print(f"schedule {name}: {b['seconds_per_batch']:.2f} s per batch over its levels, "
              f"{b['seconds_at_gemm_rate']:.2f} s at the GEMM rate: at most {b['bound']:.2f}x faster")
    result = {"bench": "efficiency", "torch": torch.__version__, "threads": args.threads, "size": SIZE,
              "block_widths": list(BLOCK_WIDTHS), "gemm": args.gemm, "train_batch": args.train_batch,
              "infer_batch": args.infer_batch, "repeats": args.repeats, "loadavg": list(load),
              "processor": platform.processor() or platform.machine(), "rows": rows, "schedule": schedule}
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
