"""One full paper run of the pruning schedule per method, timed stage by stage.

The paper's setting (Appendix A.1): VGG-16 at 224 px with a 2-way head, 650 training images per
class, 500 ranking images, 16 steps of 5 % up to 80 % of the prunable filters (``conv4_3``
protected), 2 fine-tuning epochs per step, a final 2-epoch recovery fine-tune, and an evaluation
after every step (balanced test set of 4 x 500 images, validation set of 4 x 150, the share of
relevance on the watermark for 200 test images). Weights are random and the images random
uint8 (``--data random``, the default) or the embedded benchmark's (``--data synthetic``): the
time does not depend on what the images show. Each method runs through
:func:`cnp.pruning.run_pruning` exactly as the pipeline calls it: ``cnp`` with a random
orthonormal basis U at ``relu4_3`` (K = 4) and subspace 0 ablated, ``vanilla`` without it.

Printed per method: seconds in rank / remove / fine-tune / evaluate (the schedule's own timers)
and setup (copying and hashing the inputs); then the projection for the whole paper
(2 pairs x {CNP, vanilla} x 5 seeds = 10 x the sum over methods).

Targets, on one H100/H200: <= 90 s per method; whole paper <= 30 min.

Presets
-------
``paper``     the setting above (GPU; hours on a CPU);
``embedded``  the embedded benchmark's default network (reduced-width VGG-16, 48 px) with the
              paper's split sizes and schedule: what ``make reproduce`` runs per method and seed;
``quick``     tiny network and data, 16 steps (a smoke test: < 1 minute on one CPU core).

Examples
--------
::

    python bench/bench_full_run.py --preset quick
    python bench/bench_full_run.py --preset paper --device cuda --out bench/results/full_run_gpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnp.data.splits import SUBGROUPS, PairData, Split  # noqa: E402
from cnp.drsa import random_orthogonal  # noqa: E402
from cnp.io import atomic_write_json  # noqa: E402
from cnp.models import VGG, block_widths_to_conv_widths, count_macs, full_vgg16, get_layer  # noqa: E402
from cnp.pruning import PruneConfig, run_pruning  # noqa: E402
from cnp.runtime import resolve_device  # noqa: E402

TARGET_METHOD_S = 90.0
TARGET_PAPER_S = 30 * 60.0
PAPER_RUNS = {"pairs": 2, "seeds": 5}

PRESETS = {
    "paper": {"model": "full", "size": 224, "n_train_per_class": 650, "n_rank": 500, "n_drsa": 500,
              "n_val_per_subgroup": 150, "n_test_per_subgroup": 500, "step": 0.05, "target": 0.8,
              "epochs_per_step": 2, "final_epochs": 2, "wm_share_images": 200, "batch_size": 64},
    "embedded": {"model": "reduced", "size": 48, "n_train_per_class": 650, "n_rank": 500, "n_drsa": 500,
                 "n_val_per_subgroup": 150, "n_test_per_subgroup": 500, "step": 0.05, "target": 0.8,
                 "epochs_per_step": 2, "final_epochs": 2, "wm_share_images": 200, "batch_size": 64},
    "quick": {"model": "tiny", "size": 32, "n_train_per_class": 16, "n_rank": 8, "n_drsa": 8,
              "n_val_per_subgroup": 2, "n_test_per_subgroup": 4, "step": 0.05, "target": 0.8,
              "epochs_per_step": 2, "final_epochs": 2, "wm_share_images": 4, "batch_size": 16},
}
MODELS = {
    "reduced": {"block_widths": (16, 32, 64, 128, 128), "hidden": 256, "pool_size": 1},
    "tiny": {"block_widths": (8, 16, 16, 32, 32), "hidden": 32, "pool_size": 1},
}


def make_model(kind: str, seed: int = 0) -> VGG:
    torch.manual_seed(seed)
    if kind == "full":
        return full_vgg16(2).eval()
    spec = MODELS[kind]
    return VGG(block_widths_to_conv_widths(spec["block_widths"]), num_classes=2, hidden=spec["hidden"],
               pool_size=spec["pool_size"]).eval()


def _random_split(name: str, counts: dict[str, int], size: int, g: torch.Generator) -> Split:
    """Random uint8 images with the given subgroup counts; watermark masks are a corner block."""
    labels, wm = [], []
    for sg in SUBGROUPS:
        labels += [int(sg[1])] * counts.get(sg, 0)
        wm += [sg[3] == "1"] * counts.get(sg, 0)
    n = len(labels)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    wm_t = torch.tensor(wm, dtype=torch.bool)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    s = max(1, size // 5)
    masks[wm_t, size - s:, size - 2 * s:] = True
    return Split(images=images, labels=torch.tensor(labels, dtype=torch.long), wm=wm_t, masks=masks, name=name)


def _biased(n_pos: int, n_neg: int, rate_pos: float = 0.9, rate_neg: float = 0.05) -> dict[str, int]:
    p1, n1 = int(round(n_pos * rate_pos)), int(round(n_neg * rate_neg))
    return {"c1w1": p1, "c1w0": n_pos - p1, "c0w1": n1, "c0w0": n_neg - n1}


def make_data(kind: str, pr: dict, seed: int = 0) -> PairData:
    size = pr["size"]
    if kind == "synthetic":
        from cnp.data.synthetic import PairConfig, make_pair

        return make_pair(PairConfig(pair="carton-dugong", seed=seed, image_size=size,
                                    n_train_per_class=pr["n_train_per_class"], n_drsa=pr["n_drsa"],
                                    n_rank=pr["n_rank"], n_val_per_subgroup=pr["n_val_per_subgroup"],
                                    n_test_per_subgroup=pr["n_test_per_subgroup"]))
    g = torch.Generator().manual_seed(seed)
    n = pr["n_train_per_class"]
    splits = {
        "train": _random_split("train", _biased(n, n), size, g),
        "drsa": _random_split("drsa", _biased(pr["n_drsa"], 0), size, g),
        "rank": _random_split("rank", _biased(pr["n_rank"], 0), size, g),
        "val": _random_split("val", dict.fromkeys(SUBGROUPS, pr["n_val_per_subgroup"]), size, g),
        "test": _random_split("test", dict.fromkeys(SUBGROUPS, pr["n_test_per_subgroup"]), size, g),
    }
    return PairData(pair="random", positive="pos", negative="neg", splits=splits)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="paper")
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", nargs="+", default=["cnp", "vanilla"], choices=["cnp", "vanilla", "l1", "random"])
    p.add_argument("--data", choices=["random", "synthetic"], default="random")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", type=Path, default=None,
                   help="checkpoint every step there, as the pipeline does (default: no checkpoints)")
    p.add_argument("--no-amp", action="store_true", help="fine-tune in fp32 on CUDA (default: bf16 autocast)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its algorithms per shape (the shapes change at every pruning step)")
    for key in ("step", "target"):
        p.add_argument(f"--{key}", type=float, default=None)
    for key in ("epochs_per_step", "final_epochs", "wm_share_images", "batch_size", "n_train_per_class",
                "n_rank", "n_val_per_subgroup", "n_test_per_subgroup", "size"):
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    pr = dict(PRESETS[args.preset])
    for k in list(pr):
        if getattr(args, k, None) is not None:
            pr[k] = getattr(args, k)

    t0 = time.perf_counter()
    data = make_data(args.data, pr, args.seed)
    t_data = time.perf_counter() - t0
    model = make_model(pr["model"], args.seed)
    D = get_layer(model, "conv4_3").out_channels
    U = random_orthogonal(D, seed=args.seed + 7)[0].float()
    concept = {"U": U, "K": 4, "ablated": [0], "mode": "zero", "mean_activation": None, "layer": "relu4_3"}
    cfg = PruneConfig(step=pr["step"], target=pr["target"], epochs_per_step=pr["epochs_per_step"],
                      final_epochs=pr["final_epochs"], wm_share_images=pr["wm_share_images"],
                      batch_size=pr["batch_size"], amp=not args.no_amp)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    load = os.getloadavg()
    n_images = {k: len(s) for k, s in data.splits.items()}
    print(f"full run: preset={args.preset} model={pr['model']} ({pr['size']} px, "
          f"{count_macs(model, pr['size']) / 1e6:.1f} MMACs/img) data={args.data} {n_images}, "
          f"{cfg.n_steps} steps of {cfg.step:.0%} to {cfg.target:.0%}, {cfg.epochs_per_step} epochs/step, "
          f"final {cfg.final_epochs}, batch {cfg.batch_size}, amp={cfg.amp and device.type == 'cuda'}")
    print(f"device={device} ({dev_name}), torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores; "
          f"data made in {t_data:.1f} s")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    results = []
    for method in args.methods:
        run_dir = args.run_dir / method if args.run_dir is not None else None
        if run_dir is not None and (run_dir / f"prune_{method}.pt").exists():
            (run_dir / f"prune_{method}.pt").unlink()  # time a fresh run, not a resumed one
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        res = run_pruning(model, data, method, cfg, concept_state=concept if method == "cnp" else None,
                          seed=args.seed, device=device, run_dir=run_dir, verbose=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - t0
        stages = dict(res.timings)
        stages["setup"] = total - sum(stages.values())
        results.append({"method": method, "seconds": total, "stages": stages,
                        "final_filters": res.curve[-1]["filters"], "final_macs": res.curve[-1]["macs"],
                        "final_acc": res.curve[-1]["acc"]["overall"]})
        print(f"  {method}: {total:.1f} s  " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
        if args.out is not None:  # partial results survive a time limit on the next method
            atomic_write_json(args.out, {"bench": "full_run", "preset": args.preset, "settings": pr,
                                         "device": str(device), "device_name": dev_name, "complete": False,
                                         "results": results})

    names = ["rank", "remove", "fine-tune", "evaluate", "checkpoint", "setup"]
    names += sorted({k for r in results for k in r["stages"]} - set(names))
    names = [n for n in names if any(n in r["stages"] for r in results)]
    paper_size = args.preset == "paper" and device.type == "cuda"
    hdr = f"{'method':<9s}" + "".join(f"{n:>12s}" for n in names) + f"{'total':>10s}  target <= {TARGET_METHOD_S:g} s"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        ok = r["seconds"] <= TARGET_METHOD_S
        verdict = ("PASS" if ok else "FAIL") if paper_size else "(info: target is for the paper preset on a GPU)"
        r["pass"] = ok if paper_size else None
        print(f"{r['method']:<9s}" + "".join(f"{r['stages'].get(n, 0.0):12.1f}" for n in names)
              + f"{r['seconds']:10.1f}  {verdict}")
    per_pair_seed = sum(r["seconds"] for r in results)
    runs = PAPER_RUNS["pairs"] * PAPER_RUNS["seeds"]
    projection = runs * per_pair_seed
    both = {"cnp", "vanilla"} <= {r["method"] for r in results}
    ok_paper = projection <= TARGET_PAPER_S
    print(f"projection for the paper ({PAPER_RUNS['pairs']} pairs x {{{', '.join(r['method'] for r in results)}}} x "
          f"{PAPER_RUNS['seeds']} seeds): {runs} x {per_pair_seed:.1f} s = {projection / 60:.1f} min "
          f"(pruning only; warm-up and DRSA not included)  target <= {TARGET_PAPER_S / 60:g} min: "
          + (("PASS" if ok_paper else "FAIL") if (paper_size and both) else "(info)"))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if peak is not None:
        print(f"peak GPU memory allocated: {peak:.1f} GiB")
    out = {
        "bench": "full_run", "complete": True, "preset": args.preset, "settings": pr, "data": args.data,
        "device": str(device),
        "device_name": dev_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "loadavg": load, "loadavg_after": os.getloadavg(), "data_seconds": t_data, "results": results,
        "projection_paper_s": projection, "targets": {"method_s": TARGET_METHOD_S, "paper_s": TARGET_PAPER_S},
        "pass_paper": ok_paper if (paper_size and both) else None, "peak_gpu_gib": peak,
    }
    if args.out is not None:
        atomic_write_json(args.out, out)
        print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
