"""The same command at two commits (or two code paths), alternating, in one invocation.

Each commit is checked out once into its own git worktree under a temporary folder; the command
then runs ``--repeats`` times per commit, alternating A, B, A, B, ... so that a change in the
machine's load hits both alike, with ``PYTHONPATH`` set to that worktree (``import cnp`` resolves
there, not to an installed copy) and its own empty output folder per run. Printed: each run's
wall time, then per commit min / median / max and the ratio A / B of each alternating pair
(min / median / max): a ratio of 2 means B takes half A's time.

The default command is one easy-pair run at the ``reproduce`` settings (seed 0, notebooks 01-05,
the backbone taken from ``$CNP_CACHE``) with one torch thread; ``{out}`` in ``--cmd`` is replaced
by the run's output folder.

Examples
--------
::

    python bench/compare_commits.py 9170764 HEAD                       # the reproduce run, 3 repeats
    python bench/compare_commits.py main HEAD --repeats 5 --out bench/results/compare.json
    python bench/compare_commits.py HEAD HEAD --cmd "python -c 'import cnp'"   # the noise floor

Two code paths of one commit: give the same commit twice and put the switch into ``--cmd-b``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CMD = (f"{shlex.quote(sys.executable)} -m cnp.sweep --preset reproduce --pairs carton-dugong --seeds 0 "
               "--workers 1 --threads 1 --out {out} --no-figures")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def summary(values: list[float]) -> dict[str, float]:
    """min / median / max of ``values``."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def pair_ratios(times_a: list[float], times_b: list[float]) -> list[float]:
    """A / B of each alternating pair (the i-th run of A with the i-th of B)."""
    if len(times_a) != len(times_b) or not times_a:
        raise ValueError("need the same, non-zero number of runs of A and B")
    return [a / b for a, b in zip(times_a, times_b)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("commit_a", help="the baseline commit (e.g. 9170764)")
    p.add_argument("commit_b", help="the commit to compare (e.g. HEAD)")
    p.add_argument("--repeats", type=int, default=3, help="runs per commit (>= 3 for min / median / max)")
    p.add_argument("--cmd", default=DEFAULT_CMD, help="command run in each worktree; {out} = a fresh output folder")
    p.add_argument("--cmd-b", default=None, help="a different command for B (two code paths of one commit)")
    p.add_argument("--keep", action="store_true", help="keep the worktrees and outputs (printed at the end)")
    p.add_argument("--out", type=Path, default=None, help="write the times and ratios as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    shas = {"A": _git("rev-parse", args.commit_a), "B": _git("rev-parse", args.commit_b)}
    cmds = {"A": args.cmd, "B": args.cmd_b or args.cmd}
    tmp = Path(tempfile.mkdtemp(prefix="cnp-compare-"))
    trees = {}
    try:
        for k, sha in shas.items():
            trees[k] = tmp / f"tree_{k}"
            _git("worktree", "add", "--detach", "-f", str(trees[k]), sha)
        times: dict[str, list[float]] = {"A": [], "B": []}
        for i in range(args.repeats):
            for k in ("A", "B"):
                out = tmp / f"out_{k}{i}"
                env = {**os.environ, "PYTHONPATH": str(trees[k]), "PYTHONHASHSEED": "0"}
                t0 = time.perf_counter()
                res = subprocess.run(cmds[k].format(out=shlex.quote(str(out))), shell=True,
                                     cwd=trees[k], env=env, capture_output=True, text=True)
                dt = time.perf_counter() - t0
                if res.returncode != 0:
                    print(res.stdout[-2000:], res.stderr[-2000:], sep="\n", file=sys.stderr)
                    raise SystemExit(f"{k} ({shas[k][:10]}) failed with exit code {res.returncode}")
                times[k].append(dt)
                print(f"run {i + 1}/{args.repeats} {k} {shas[k][:10]}: {dt:.1f} s", flush=True)
        ratios = pair_ratios(times["A"], times["B"])
        result = {"commits": shas, "commands": cmds, "times_s": times,
                  "A": summary(times["A"]), "B": summary(times["B"]), "ratio_a_over_b": summary(ratios),
                  "ratios": ratios, "load_average": os.getloadavg(), "cpus": os.cpu_count()}
        r = result["ratio_a_over_b"]
        print(f"A {shas['A'][:10]}: min {result['A']['min']:.1f} / median {result['A']['median']:.1f} / "
              f"max {result['A']['max']:.1f} s")
        print(f"B {shas['B'][:10]}: min {result['B']['min']:.1f} / median {result['B']['median']:.1f} / "
              f"max {result['B']['max']:.1f} s")
        print(f"ratio A / B: min {r['min']:.2f} / median {r['median']:.2f} / max {r['max']:.2f} "
              f"({args.repeats} alternating pairs)")
        if args.out:
            sys.path.insert(0, str(REPO))
            from cnp.io import atomic_write_json

            atomic_write_json(args.out, result)
        return result
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            for t in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(t)], cwd=REPO, capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
