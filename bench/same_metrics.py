"""Are the numbers of two sweeps identical? (A check that a change left the results alone.)

Pairs the ``metrics.json`` files of two sweep directories by their path below the directory and
compares every value in them exactly, except what describes the run rather than its results:
``params`` (the parameters as recorded), ``timings_s`` (seconds) and ``compute`` (device, torch
version). Prints the number of values compared and every difference; exits 1 when any differs
or a run is missing on one side.

Example
-------
::

    python bench/same_metrics.py runs/before runs/after --out bench/results/same_metrics.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SKIP = ("params", "timings_s", "compute")


def _flatten(obj, prefix: str = ""):
    if isinstance(obj, dict):
        for k in sorted(obj):
            yield from _flatten(obj[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def compare(a: Path, b: Path) -> dict:
    """Every difference between the metrics.json files under ``a`` and ``b``."""
    runs_a = {p.relative_to(a).as_posix(): p for p in a.rglob("metrics.json")}
    runs_b = {p.relative_to(b).as_posix(): p for p in b.rglob("metrics.json")}
    out = {"a": str(a), "b": str(b), "runs": sorted(set(runs_a) & set(runs_b)),
           "only_a": sorted(set(runs_a) - set(runs_b)), "only_b": sorted(set(runs_b) - set(runs_a)),
           "values": 0, "differences": []}
    for rel in out["runs"]:
        ma, mb = (json.loads(runs[rel].read_text()) for runs in (runs_a, runs_b))
        fa = dict(_flatten({k: v for k, v in ma.items() if k not in SKIP}))
        fb = dict(_flatten({k: v for k, v in mb.items() if k not in SKIP}))
        for key in sorted(set(fa) | set(fb)):
            out["values"] += 1
            if fa.get(key, "<missing>") != fb.get(key, "<missing>"):
                out["differences"].append({"run": rel, "value": key, "a": fa.get(key, "<missing>"),
                                           "b": fb.get(key, "<missing>")})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="the first sweep directory (e.g. before a change)")
    ap.add_argument("b", type=Path, help="the second sweep directory (after it)")
    ap.add_argument("--out", type=Path, help="also write the result as JSON")
    args = ap.parse_args(argv)
    res = compare(args.a, args.b)
    print(f"{len(res['runs'])} run(s) in both, {res['values']} values compared, "
          f"{len(res['differences'])} differ; only in a: {len(res['only_a'])}, only in b: {len(res['only_b'])}")
    for d in res["differences"][:50]:
        print(f"  {d['run']}: {d['value']}: {d['a']!r} != {d['b']!r}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 1 if res["differences"] or res["only_a"] or res["only_b"] or not res["runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
