"""How strong is the watermark shortcut for each watermark text? (validation split only)

For every text and seed: generate the easy pair with that watermark text, warm the model up on
the biased training set (stage 01) and report the shortcut on the *validation* split,
c0w0 - c0w1 of the unpruned model. ``--random-text-rate`` pretrains a backbone whose corpus
draws that share of its watermark texts at random (``StyleDistribution.random_text_rate``)
instead of the default backbone; that backbone is cached like the default one.

    python bench/shortcut_by_text.py --texts stock demo PROOF copyright dreamstime --seeds 0 1 2
    python bench/shortcut_by_text.py --random-text-rate 0.75 --texts stock demo PROOF --seeds 0 1 2

Prints one JSON line per (text, seed) and a per-text mean; run directories go to ``--out``.
Never pass the held-out test styles of ``--preset styles`` here: this script is for choosing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace

from cnp.data.watermark import StyleDistribution
from cnp.pipeline import Run, backbone_config, make_params, open_run, run_warmup
from cnp.pretrain import load_backbone
from cnp.sweep import REPRODUCE_PARAMS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", nargs="+", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--random-text-rate", type=float, default=0.0)
    ap.add_argument("--out", default="runs/shortcut_by_text")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sizes = {k: v for k, v in REPRODUCE_PARAMS.items() if k.startswith("n_")}
    base = backbone_config(make_params(**sizes))
    cfg = replace(base, corpus=replace(base.corpus, wm_styles=StyleDistribution(random_text_rate=args.random_text_rate)))
    backbone, report = load_backbone(cfg)
    print(f"# backbone (random_text_rate {args.random_text_rate}): {report}", flush=True)
    gaps: dict[str, list[float]] = {}
    for text in args.texts:
        for seed in args.seeds:
            p = make_params(**sizes, wm_text=text, seed=seed, threads=args.threads,
                            run_dir=f"{args.out}/rtr-{args.random_text_rate}/{text}/seed{seed}")
            run: Run = open_run(p)
            run._backbone = backbone
            val = run_warmup(run, verbose=False)["val_acc"]
            gap = val["c0w0"] - val["c0w1"]
            gaps.setdefault(text, []).append(gap)
            print(json.dumps({"text": text, "seed": seed, "val_gap": round(gap, 3), "val_c0w1": round(val["c0w1"], 3),
                              "val_c1w0": round(val["c1w0"], 3), "val_overall": round(val["overall"], 3)}), flush=True)
    for text, g in gaps.items():
        print(f"# {text!r}: val c0w0 - c0w1 {statistics.mean(g):.3f} over {len(g)} seeds")


if __name__ == "__main__":
    main()
