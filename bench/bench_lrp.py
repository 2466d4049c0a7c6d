"""LRP ranking throughput: ``cnp.lrp.LRP.attribute(..., filters=True)`` against zennit's own attribution.

All variants explain the positive logit (index 1) of the same model on the same batch, timed
interleaved (one call of each variant per round, median over rounds):

* ``forward``            inference only (a floor);
* ``forward+backward``   plain autograd gradient to the input (what any attribution costs at least);
* ``zennit AlphaBeta``   ``zennit.attribution.Gradient`` with the composite a zennit user writes for
                         the paper's rules (``SpecialFirstLayerMapComposite``: ZBox on the first
                         conv, ``AlphaBeta(alpha=1, beta=0)`` on the convs, epsilon on the linears,
                         ``Norm`` on the average pool, ``Pass`` on the ReLUs, biases zeroed). This is
                         the baseline of the target;
* ``zennit ZPlus``       the same composite with ``ZPlus`` (= alpha1beta0 with two instead of four
                         modified passes per conv; what ``cnp.lrp`` uses for ``alpha1beta0``);
* ``cnp filters=False``  ``LRP.attribute`` without per-filter collection;
* ``cnp filters=True``   ``LRP.attribute(..., filters=True)``: both per-filter sums (signed and
                         absolute) of every conv (the judged variant);
* ``cnp ranking``        ``filters='abs'``: only the sum the default ranking uses (what
                         :func:`cnp.pruning.lrp_filter_scores` runs).

The relative difference of cnp's input relevance to zennit's (AlphaBeta) is printed as a check
that the variants compute the same thing.

Target: the per-filter collection adds <= 10 % over zennit's own attribution, i.e.
time(cnp filters=True) <= 1.10 x time(zennit AlphaBeta); the collection's own cost is shown as
time(cnp filters=True) / time(cnp filters=False).

Examples
--------
CPU smoke (seconds)::

    python bench/bench_lrp.py --model reduced --batch 16

GPU, the paper's model::

    python bench/bench_lrp.py --device cuda --model full --batch 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnp.images import input_bounds  # noqa: E402
from cnp.io import atomic_write_json  # noqa: E402
from cnp.lrp import LRP, LRPConfig  # noqa: E402
from cnp.models import VGG, block_widths_to_conv_widths, full_vgg16  # noqa: E402
from cnp.runtime import resolve_device  # noqa: E402

TARGET_OVERHEAD = 1.10
REDUCED = {"block_widths": (16, 32, 64, 128, 128), "hidden": 256, "pool_size": 1, "size": 48}


def make_model(kind: str, seed: int = 0) -> tuple[nn.Module, int]:
    torch.manual_seed(seed)
    if kind == "full":
        return full_vgg16(2).eval(), 224
    m = VGG(block_widths_to_conv_widths(REDUCED["block_widths"]), num_classes=2, hidden=REDUCED["hidden"],
            pool_size=REDUCED["pool_size"])
    return m.eval(), REDUCED["size"]


def zennit_composite(cfg: LRPConfig, device, zplus: bool):
    """The zennit composite equivalent to ``cnp.lrp``'s default rules."""
    from zennit.composites import SpecialFirstLayerMapComposite
    from zennit.rules import AlphaBeta, Epsilon, Norm, Pass, ZBox, ZPlus

    low, high = input_bounds(device)
    conv_rule = (ZPlus(stabilizer=cfg.stabilizer, zero_params="bias") if zplus else
                 AlphaBeta(alpha=1.0, beta=0.0, stabilizer=cfg.stabilizer, zero_params="bias"))
    layer_map = [
        (nn.ReLU, Pass()),
        (nn.AdaptiveAvgPool2d, Norm(stabilizer=cfg.stabilizer)),
        (nn.Conv2d, conv_rule),
        (nn.Linear, Epsilon(epsilon=cfg.linear_epsilon, zero_params="bias")),
    ]
    first_map = [(nn.Conv2d, ZBox(low=low, high=high, stabilizer=cfg.stabilizer, zero_params="bias"))]
    return SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=first_map)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=["full", "reduced"], default="full")
    p.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 8 on the CPU")
    p.add_argument("--size", type=int, default=None, help="default: 224 (full), 48 (reduced)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (CPU 5, GPU 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (CPU 1, GPU 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, default_size = make_model(args.model)
    size = args.size or default_size
    batch = args.batch or (64 if device.type == "cuda" else 8)
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    model = model.to(device)
    for prm in model.parameters():  # as in the ranking: parameters keep requires_grad
        prm.requires_grad_(True)
    cfg = LRPConfig()
    g = torch.Generator().manual_seed(0)
    x = ((torch.randint(0, 256, (batch, 3, size, size), generator=g).float() / 255.0
          - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
         / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)).to(device)
    target = 1

    def forward():
        with torch.inference_mode():
            return model(x)

    def fwd_bwd():
        xin = x.detach().requires_grad_(True)
        out = model(xin)
        (grad,) = torch.autograd.grad(out[:, target].sum(), xin)
        return grad

    from zennit.attribution import Gradient

    def zennit_fn(zplus: bool):
        composite = zennit_composite(cfg, device, zplus)

        def run():
            with Gradient(model=model, composite=composite) as attributor:
                _, rel = attributor(x, lambda out: out * torch.eye(out.shape[1], device=out.device)[[target]])
            return rel
        return run

    lrp = LRP(model, cfg)

    def cnp_fn(filters: bool):
        def run():
            return lrp.attribute(x, target, filters=filters).input_relevance
        return run

    variants = {
        "forward": forward,
        "forward+backward": fwd_bwd,
        "zennit AlphaBeta(1,0)": zennit_fn(False),
        "zennit ZPlus": zennit_fn(True),
        "cnp filters=False": cnp_fn(False),
        "cnp filters=True": cnp_fn(True),
        "cnp ranking (filters='abs')": cnp_fn("abs"),
    }
    times = {k: [] for k in variants}
    outs = {}
    for r in range(warmup + repeats):
        for name, fn in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            o = fn()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
            if r == 0:
                outs[name] = o.detach() if isinstance(o, torch.Tensor) else o
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = outs["zennit AlphaBeta(1,0)"].double()

    def rel_diff(name):
        o = outs[name].double()
        return float((o - ref).norm() / ref.norm().clamp(min=1e-30))

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    load = os.getloadavg()
    base = med["zennit AlphaBeta(1,0)"]
    ratio = med["cnp filters=True"] / base
    collection = med["cnp filters=True"] / med["cnp filters=False"]
    vs_zplus = med["cnp filters=True"] / med["zennit ZPlus"]
    print(f"LRP throughput: model={args.model} ({size} px), batch={batch}, device={device} ({dev_name}), "
          f"torch {torch.__version__}, threads={torch.get_num_threads()}, load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores, median of {repeats} rounds")
    print(f"target: time(cnp filters=True) <= {TARGET_OVERHEAD:.2f} x time(zennit's own attribution)")
    hdr = f"{'variant':<28s} {'ms/batch':>10s} {'img/s':>9s} {'vs zennit':>9s} {'rel diff':>9s}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for name in variants:
        rd = rel_diff(name) if name.startswith(("zennit", "cnp")) else None
        print(f"{name:<28s} {1e3 * med[name]:10.1f} {batch / med[name]:9.1f} {med[name] / base:8.2f}x "
              f"{'-' if rd is None else f'{rd:9.1e}':>9s}")
        rows.append({"variant": name, "median_s": med[name], "images_per_s": batch / med[name],
                     "vs_zennit": med[name] / base, "rel_diff_to_zennit": rd, "times_s": times[name]})
    ok = ratio <= TARGET_OVERHEAD
    print(f"cnp filters=True / zennit AlphaBeta(1,0) = {ratio:.3f}  -> {'PASS' if ok else 'FAIL'} "
          f"(<= {TARGET_OVERHEAD:.2f})")
    print(f"cnp filters=True / zennit ZPlus (same arithmetic) = {vs_zplus:.3f}; "
          f"per-filter collection: filters=True / filters=False = {collection:.3f}")
    out = {
        "bench": "lrp", "device": str(device), "device_name": dev_name, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "model": args.model, "size": size, "batch": batch,
        "repeats": repeats, "loadavg": load, "rows": rows, "ratio_vs_zennit": ratio,
        "ratio_vs_zennit_zplus": vs_zplus, "collection_overhead": collection,
        "target": TARGET_OVERHEAD, "pass": ok,
    }
    if args.out is not None:
        atomic_write_json(args.out, out)
        print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
