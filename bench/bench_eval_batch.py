"""Which batch size should a network that only predicts run at? Evaluation's forward passes, timed.

The schedule evaluates every pruned network on the test and validation splits (1,600 images at
the ``reproduce`` settings) after every step. A per-image forward pass does not depend on the
batch it is in, so the batch size is a matter of speed only; this script measures it, side by
side in one process: the reduced VGG-16 of the embedded benchmark (48 px, channels_last, one
thread by default) unpruned and with a share of every conv's filters removed, a forward pass over
``--images`` images under ``torch.inference_mode`` at each batch size in ``--batches``, calls
interleaved round-robin so that other load hits all alike; figures are medians. It also checks
that the logits are the same to the bit at every batch size (the premise).

Example::

    python bench/bench_eval_batch.py --out bench/results/eval_batch_cpu.json
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_efficiency import SIZE, reduced_vgg, tag  # noqa: E402

from cnp.io import atomic_write_json  # noqa: E402
from cnp.training import PREDICT_BATCH  # noqa: E402


def forward_all(model, x: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: as a run of the sweep)")
    p.add_argument("--pruned", type=float, nargs="*", default=[0.4, 0.7], help="shares of filters removed")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--images", type=int, default=1200, help="images per pass (the reproduce test split: 1200)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="a smoke test: 2 repeats of 64 images")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.images = 2, 64
    if min(args.repeats, args.images, args.threads, *args.batches) < 1:
        p.error("--repeats, --images, --threads and --batches must be >= 1")
    torch.set_num_threads(args.threads)
    x = torch.randn(args.images, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    load = os.getloadavg()
    print(f"forward passes over {args.images} images, reduced VGG-16 at {SIZE} px (channels_last), "
          f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
          f"load average {load[0]:.2f} on {os.cpu_count()} cores; cnp.training.PREDICT_BATCH = {PREDICT_BATCH}")
    rows = []
    for removed in [0.0, *sorted(set(args.pruned) - {0.0})]:
        model = reduced_vgg(removed).eval()
        ref = forward_all(model, x, args.batches[0])
        same = {b: bool(torch.equal(forward_all(model, x, b), ref)) for b in args.batches}
        times: dict[int, list[float]] = {b: [] for b in args.batches}
        for _ in range(args.repeats):
            for b in args.batches:
                t0 = time.perf_counter()
                forward_all(model, x, b)
                times[b].append(time.perf_counter() - t0)
        med = {b: statistics.median(v) for b, v in times.items()}
        base = med[max(args.batches)]
        for b in args.batches:
            rows.append({"network": tag(removed), "batch": b, "median_s": med[b], "min_s": min(times[b]),
                         "max_s": max(times[b]), "speedup_vs_largest": base / med[b],
                         f"logits_identical_to_batch_{args.batches[0]}": same[b]})
        print(f"{tag(removed):>12}: " + "  ".join(f"batch {b}: {med[b]:.3f} s ({base / med[b]:.2f}x)"
                                                  for b in args.batches)
              + ("" if all(same.values()) else f"  LOGITS DIFFER: {same}"))
    out = {"threads": args.threads, "images": args.images, "repeats": args.repeats, "load_average": list(load),
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "predict_batch": PREDICT_BATCH, "rows": rows}
    if args.out:
        atomic_write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
