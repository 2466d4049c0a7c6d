"""Do two sweeps of the same runs agree within the seed-to-seed spread?

For a change that alters the arithmetic (a memory layout, a precision, a batch size) the numbers
cannot stay bit-identical; what must hold is that they move less than one seed differs from the
next. Given two sweep directories of the same pair and seeds (A: before, B: after), this prints,
for every method and metric at the target rate (after the final fine-tune) and before pruning:
A's mean and seed standard deviation, B's, and the paired difference B - A per seed (mean, 95 %
t-interval, seeds), and whether |mean difference| is below A's seed standard deviation over all
the seeds A holds (A may hold more seeds than are compared: the spread is better measured on
them). It also
prints the comparison the claims rest on (CNP - vanilla on c0w1) in both.

Example
-------
::

    python bench/compare_runs.py runs/evidence/reproduce runs/fast --pair carton-dugong --seeds 0 1 2 3 4 \
        --out bench/results/arithmetic_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnp.results import at_target, load_runs  # noqa: E402
from cnp.stats import paired  # noqa: E402

METRICS = ("overall", "c0w1", "c1w0")


def _values(root: Path, pair: str, seeds: list[int] | None) -> dict[int, dict]:
    """The runs of ``pair`` under ``root`` by seed (``seeds``: exactly those; None: all)."""
    runs = {r.seed: r.metrics for r in load_runs(root, verbose=False) if r.pair == pair and r.label == pair}
    if seeds is None:
        return dict(sorted(runs.items()))
    missing = [s for s in seeds if s not in runs]
    if missing:
        raise SystemExit(f"{root}: no metrics.json for {pair} seed(s) {missing}")
    return {s: runs[s] for s in seeds}


def _metric(m: dict, method: str | None, key: str) -> float:
    if method is None:
        return float(m["unpruned"]["acc"][key])
    return float(at_target(m["curves"][method])["acc"][key])


def compare(a: dict[int, dict], b: dict[int, dict], methods: list[str], a_all: dict[int, dict] | None = None) -> list[dict]:
    """One row per (method, metric): A and B over the common seeds, B - A paired, A's seed
    standard deviation over ``a_all`` (default: ``a``)."""
    seeds = sorted(a)
    a_all = a_all or a
    rows = []
    for method in [None, *methods]:
        for key in METRICS:
            xa = [_metric(a[s], method, key) for s in seeds]
            xb = [_metric(b[s], method, key) for s in seeds]
            d = paired(xb, xa)
            sd_a = statistics.stdev(xa) if len(xa) > 1 else float("nan")
            x_all = [_metric(m, method, key) for m in a_all.values()]
            sd_all = statistics.stdev(x_all) if len(x_all) > 1 else float("nan")
            rows.append({"method": method or "unpruned", "metric": key, "mean_a": statistics.mean(xa), "sd_a": sd_a,
                         "n_a_all": len(x_all), "mean_a_all": statistics.mean(x_all), "sd_a_all": sd_all,
                         "mean_b": statistics.mean(xb), "sd_b": statistics.stdev(xb) if len(xb) > 1 else float("nan"),
                         "diff": d.mean, "diff_ci": [d.ci_low, d.ci_high], "within_seed_sd": abs(d.mean) <= sd_all})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", type=Path, help="sweep directory A (before)")
    p.add_argument("b", type=Path, help="sweep directory B (after)")
    p.add_argument("--pair", default="carton-dugong")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", nargs="+", default=["cnp", "vanilla"])
    p.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    a, b = _values(args.a, args.pair, args.seeds), _values(args.b, args.pair, args.seeds)
    a_all = _values(args.a, args.pair, None)
    rows = compare(a, b, args.methods, a_all)
    print(f"{args.pair}, seeds {args.seeds}: A = {args.a}, B = {args.b}; A's spread over its {len(a_all)} seeds")
    print(f"{'method':10} {'metric':8} {'A mean':>7} {'A sd':>6} {'B mean':>7} {'B sd':>6} {'B - A [95 % CI]':>26}"
          f" {'A all: mean':>11} {'sd':>6}  |B - A| <= sd")
    for r in rows:
        print(f"{r['method']:10} {r['metric']:8} {r['mean_a']:7.3f} {r['sd_a']:6.3f} {r['mean_b']:7.3f} {r['sd_b']:6.3f} "
              f"{r['diff']:+8.3f} [{r['diff_ci'][0]:+.3f}, {r['diff_ci'][1]:+.3f}] {r['mean_a_all']:11.3f} {r['sd_a_all']:6.3f}"
              f"  {'yes' if r['within_seed_sd'] else 'NO'}")
    claim = {}
    for name, runs in (("A", a), ("B", b)):
        seeds = sorted(runs)
        d = paired([_metric(runs[s], "cnp", "c0w1") for s in seeds], [_metric(runs[s], "vanilla", "c0w1") for s in seeds])
        claim[name] = {"mean": d.mean, "ci": [d.ci_low, d.ci_high], "p": d.p, "favour": d.favour, "n": d.n}
        print(f"CNP - vanilla on c0w1 in {name}: {d.text()}")
    result = {"pair": args.pair, "seeds": args.seeds, "a": str(args.a), "b": str(args.b), "rows": rows,
              "cnp_minus_vanilla_c0w1": claim}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.out)
    return result


if __name__ == "__main__":
    main()
