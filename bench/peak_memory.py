"""Peak memory of a whole process tree (e.g. ``make reproduce``: the sweep plus its kernels).

``/usr/bin/time -v`` reports the largest *single* process; the memory target bounds the whole
reproduction, which runs several notebook kernels at once. This runs a command and samples, every
``--interval`` seconds, the sum over the command's process tree of

* RSS (``VmRSS``: counts shared library pages once per process, so it over-counts), and
* PSS (``Pss`` of ``/proc/<pid>/smaps_rollup``: shared pages split between the processes that
  map them; the fair measure of what the tree costs the machine),

and writes the peaks to ``--out`` (JSON, atomically) and stdout.

Usage::

    python bench/peak_memory.py --out bench/results/peak_memory.json -- make reproduce
    python bench/peak_memory.py --bound-gb 4 -- python -m cnp.sweep --preset reproduce ...

Exit status: the command's, or 1 when ``--bound-gb`` is given and the PSS peak exceeds it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnp.io import atomic_write_json  # noqa: E402  (torch-free import)
from cnp.sweep import descendants  # noqa: E402  (torch-free import)


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (:func:`cnp.sweep.descendants`)."""
    return [pid, *descendants(pid)]


def _field(path: str, name: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def sample(pid: int) -> tuple[int, int, int]:
    """(RSS kB, PSS kB, number of processes) summed over the tree of ``pid``."""
    pids = tree(pid)
    rss = sum(_field(f"/proc/{p}/status", "VmRSS") for p in pids)
    pss = sum(_field(f"/proc/{p}/smaps_rollup", "Pss") for p in pids)
    return rss, pss, len(pids)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="JSON file for the result (written atomically)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("--bound-gb", type=float, help="fail (exit 1) when the PSS peak exceeds this")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command to measure after --, e.g. -- make reproduce")
    if not Path("/proc/self/smaps_rollup").exists():
        ap.error("needs Linux /proc/<pid>/smaps_rollup")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd)
    peak = {"rss_kb": 0, "pss_kb": 0, "processes": 0, "at_s": 0.0}
    while proc.poll() is None:
        rss, pss, n = sample(proc.pid)
        if pss > peak["pss_kb"]:
            peak.update(pss_kb=pss, at_s=round(time.monotonic() - t0, 1))
        peak["rss_kb"] = max(peak["rss_kb"], rss)
        peak["processes"] = max(peak["processes"], n)
        time.sleep(args.interval)
    result = {"command": cmd, "returncode": proc.returncode, "wall_s": round(time.monotonic() - t0, 1),
              "peak_pss_gb": round(peak["pss_kb"] / 2**20, 3), "peak_rss_sum_gb": round(peak["rss_kb"] / 2**20, 3),
              "peak_processes": peak["processes"], "peak_pss_at_s": peak["at_s"],
              "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result, indent=1), flush=True)
    if args.out:
        atomic_write_json(args.out, result, indent=1)
    if proc.returncode:
        return proc.returncode
    if args.bound_gb is not None and result["peak_pss_gb"] > args.bound_gb:
        print(f"peak PSS {result['peak_pss_gb']} GB exceeds the bound {args.bound_gb} GB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
