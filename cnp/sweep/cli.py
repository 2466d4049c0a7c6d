"""The command line: ``python -m cnp.sweep``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cnp.io import CNPError, atomic_write_json, atomic_write_text, check_dir_writable
from cnp.params import BENCHMARK_DEFAULTS
from cnp.sweep.planning import Job, check_overrides, job_status, parse_assignments, parse_grid, plan
from cnp.sweep.presets import FIGURES_NOTEBOOK, KERNEL, NOTEBOOK_DIR, PRESETS
from cnp.sweep.runner import (
    CLUSTER_CPUS,
    _error_line,
    _set_thread_env,
    available_cores,
    check_kernel,
    execute,
    injected_parameters,
    prepare_shared,
    run_local,
    run_submitit,
)


# ============================================================================ summary
def summary_rows(results: Sequence[Mapping]) -> tuple[list[dict], list[str]]:
    """Rows of the summary table and its columns (per method: overall and c0w1 at the target)."""
    from cnp.figures import at_target, method_order

    metrics = {}
    for r in results:
        path = Path(r["run_dir"]) / "metrics.json"
        if r["status"] in ("done", "skipped") and path.exists():
            try:
                metrics[r["run_dir"]] = json.loads(path.read_text())
            except (OSError, ValueError):
                pass
    methods = method_order(m for mm in metrics.values() for m in mm.get("curves", {}))
    cols = ["run", "seed", "status", "time_s"]
    for m in methods:
        cols += [f"{m} overall", f"{m} c0w1"]
    rows = []
    for r in results:
        row = {"run": r["label"], "seed": r["seed"], "status": r["status"], "time_s": f"{r['seconds']:.0f}"}
        mm = metrics.get(r["run_dir"], {})
        for m in methods:
            p = at_target(mm.get("curves", {}).get(m, []))
            row[f"{m} overall"] = f"{p['acc']['overall']:.3f}" if p else ""
            row[f"{m} c0w1"] = f"{p['acc']['c0w1']:.3f}" if p else ""
        rows.append(row)
    return rows, cols


def format_table(rows: Sequence[Mapping], cols: Sequence[str]) -> str:
    """A plain, aligned text table."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in cols]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(out)


# ============================================================================ command line
def build_parser() -> argparse.ArgumentParser:
    from cnp import __version__

    width = max(len(k) for k in PRESETS)
    ap = argparse.ArgumentParser(
        prog="python -m cnp.sweep",
        description="Run notebooks 01-05 per (pair, seed) with papermill, then 06 (the figures); resumable.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets (--preset NAME):\n" + "\n".join(
            f"  {k.ljust(width)}  {v['doc']} ({v.get('time', 'time not measured')})" for k, v in PRESETS.items())
        + "\n\n-p NAME=VALUE takes any run parameter; --list-params lists them with type, default and meaning.")
    ap.add_argument("--version", action="version", version=f"cnp {__version__}")
    ap.add_argument("--list-params", action="store_true",
                    help="list every run parameter (-p NAME=VALUE) with its type, default and meaning, and exit")
    ap.add_argument("--pairs", nargs="+", help="pairs (carton-dugong, crate-packet, basketball)")
    ap.add_argument("--seeds", nargs="+", type=int, help="seeds, e.g. 0 1 2")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                    help="a cnp.pipeline.Params value for every run (repeatable)")
    ap.add_argument("-g", "--grid", action="append", default=[], metavar="NAME=V1,V2",
                    help="a grid axis (repeatable); runs go to DIR/<pair>/<variant>/seed<k>")
    ap.add_argument("--grid-mode", choices=["product", "one-at-a-time", "variations"], default=None,
                    help="how grid axes combine (default: the preset's, else product)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a named sweep (see below)")
    ap.add_argument("--workers", type=int, default=1, help="runs at once (threads per run = cores // workers)")
    ap.add_argument("--device", default=None, help="auto, cpu or cuda for every run (the same as -p device=...)")
    ap.add_argument("--out", default="runs", help="sweep directory (default: runs)")
    ap.add_argument("--figures", default=None, help="where 06 writes the figures (default: OUT/figures)")
    ap.add_argument("--no-figures", action="store_true", help="do not run 06 at the end")
    ap.add_argument("--executor", choices=["local", "submitit"], default="local",
                    help="local: the runs as processes on this machine (--workers at once); submitit: one job per "
                         "run through submitit, on the backend --cluster names")
    ap.add_argument("--cluster", choices=["local", "slurm", "debug"], default=None,
                    help="with --executor submitit only: slurm (a SLURM cluster), local (submitit's own local "
                         "executor: all jobs at once as processes here, for testing a cluster setup), debug (in "
                         "this process); default: slurm when available, else local")
    ap.add_argument("--partition", default="", help="SLURM partition (submitit)")
    ap.add_argument("--timeout-min", type=int, default=240, help="job time limit in minutes (submitit)")
    ap.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per job (submitit)")
    ap.add_argument("--cpus-per-task", type=int, default=0,
                    help=f"CPUs (and torch threads) per job (submitit; default {CLUSTER_CPUS}, whatever the cores "
                         "of the machine that submits)")
    ap.add_argument("--mem-gb", type=int, default=16, help="memory per job in GB (submitit)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per run (default: $CNP_THREADS, else cores // workers)")
    ap.add_argument("--kernel", default=KERNEL, help="Jupyter kernel (default: cnp)")
    ap.add_argument("--kernel-per-notebook", action="store_true",
                    help="start a fresh kernel for every notebook (default: a run's notebooks 01-05 share one "
                         "kernel, its namespace cleared between them; the results are the same)")
    ap.add_argument("--notebooks", default=str(NOTEBOOK_DIR), help="folder of the notebooks 01-06")
    ap.add_argument("--force", action="store_true", help="re-execute runs whose metrics.json is up to date")
    ap.add_argument("--dry-run", action="store_true", help="print the planned runs and their status, run nothing")
    return ap


def plan_preset(preset: Mapping[str, Any], out: Path, args: argparse.Namespace, cli: Mapping[str, Any],
                cli_grid: Mapping[str, list]) -> list[Job]:
    """The jobs of one preset (or preset part) into ``out``; ``--pairs``, ``--seeds``, ``-p`` and
    ``-g`` from the command line win over the preset's values (per-pair values included)."""
    pairs = args.pairs or preset.get("pairs")
    seeds = args.seeds if args.seeds is not None else preset.get("seeds")
    params = {**preset.get("params", {}), **cli}
    pair_params = {k: {n: v for n, v in d.items() if n not in cli} for k, d in preset.get("pair_params", {}).items()}
    grid = {**preset.get("grid", {}), **cli_grid}
    mode = args.grid_mode or preset.get("grid_mode", "product")
    pair_seeds = preset.get("pair_seeds", {}) if args.seeds is None else {}
    return plan(pairs or [], seeds or [], out, params, grid, mode, preset.get("selected"), pair_params, pair_seeds)



def list_params() -> str:
    """Every run parameter: name, type, default (the notebooks' where the embedded benchmark
    differs from the paper) and one line of meaning."""
    from cnp.params import FIELDS, PARAM_HELP, type_name

    rows = []
    for name, (section, typ, default) in FIELDS.items():
        default = BENCHMARK_DEFAULTS.get(name, default)
        if isinstance(default, tuple):
            default = ",".join(default)
        rows.append({"name": name, "section": section, "type": type_name(typ), "default": repr(default),
                     "meaning": PARAM_HELP.get(name, "")})
    note = ("defaults: the paper's (cnp.params.Params), except "
            + ", ".join(f"{k}={v!r}" for k, v in BENCHMARK_DEFAULTS.items())
            + " (the embedded benchmark's, cnp.params.BENCHMARK_DEFAULTS, as in the notebooks and presets)")
    return format_table(rows, ["name", "section", "type", "default", "meaning"]) + "\n\n" + note


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_params:
        print(list_params())
        return 0
    if args.cluster and args.executor != "submitit":
        print("error: --cluster chooses submitit's backend; it needs --executor submitit", file=sys.stderr)
        return 2
    try:
        preset = PRESETS[args.preset] if args.preset else {}
        cli = parse_assignments(args.param)
        if args.device:
            cli["device"] = args.device
        cli_grid = parse_grid(args.grid)
        jobs, part_dirs = [], []
        # a preset with parts runs each part into its own sub-directory of --out
        for sub, part in preset.get("parts", [("", preset)]):
            jobs += plan_preset(part, Path(args.out) / sub if sub else Path(args.out), args, cli, cli_grid)
            part_dirs += [sub] if sub not in part_dirs else []
        check_overrides(jobs)
        invalid = [(j, why) for j in jobs for status, why in [job_status(j)] if status == "invalid"]
        if invalid:
            j, why = invalid[0]
            raise CNPError(f"{len(invalid)} of {len(jobs)} run(s) cannot run, e.g. {j.label} seed {j.seed}: {why}")
    except CNPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    workers = max(1, args.workers)
    if args.executor == "submitit":
        threads = args.threads or args.cpus_per_task or CLUSTER_CPUS
        args.cpus_per_task = args.cpus_per_task or threads
    else:
        threads = args.threads or int(os.environ.get("CNP_THREADS") or 0) or max(1, available_cores() // workers)
    out = Path(args.out)
    notebooks = Path(args.notebooks)
    args.figures = args.figures or str(out / "figures")

    if args.dry_run:
        rows = []
        for j in jobs:
            status, why = job_status(j)
            rows.append({"run": j.label, "seed": j.seed, "status": {"done": "skip (up to date)", "todo": "run",
                                                                   "invalid": "run (will fail)"}[status],
                         "why": why, "run_dir": j.run_dir})
        print(format_table(rows, ["run", "seed", "status", "run_dir", "why"]))
        print(f"\n{len(jobs)} run(s); {sum(r['status'].startswith('run') for r in rows)} to execute with "
              f"{workers} worker(s) x {threads} thread(s); then 06 -> {args.figures}")
        return 0

    try:
        check_kernel(args.kernel)
        check_dir_writable(out)
    except CNPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    print(f"[sweep] {len(jobs)} run(s) -> {out} ({workers} worker(s) x {threads} thread(s), "
          f"executor {args.executor})", flush=True)
    try:
        prepare_shared(jobs, verbose=True)
        if args.executor == "submitit":
            results = run_submitit(jobs, args, threads, args.kernel, notebooks)
        else:
            results = run_local(jobs, workers, threads, args.kernel, notebooks, args.force,
                                kernel_per_notebook=args.kernel_per_notebook)
    except CNPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    fig_failed = ""
    if not args.no_figures:
        for sub in part_dirs:
            part_out = out / sub if sub else out
            figures_dir = Path(args.figures) / sub if sub else Path(args.figures)
            if not any(part_out.rglob("metrics.json")):
                print(f"[sweep] no finished run in {part_out}: 06_figures skipped", flush=True)
                continue
            _set_thread_env(threads)
            print(f"[sweep] 06_figures over {part_out} -> {figures_dir}", flush=True)
            try:
                execute(notebooks / FIGURES_NOTEBOOK, part_out / FIGURES_NOTEBOOK,
                        injected_parameters(notebooks / FIGURES_NOTEBOOK,
                                            {"sweep_dir": str(part_out.resolve()),
                                             "figures_dir": str(figures_dir.resolve())}),
                        kernel=args.kernel, cwd=part_out)
            except Exception as exc:  # noqa: BLE001
                fig_failed = fig_failed or _error_line(exc)

    rows, cols = summary_rows(results)
    failed = [r for r in results if r["status"] == "failed"]
    print("\n" + format_table(rows, cols))
    print(f"\n{len(results)} run(s): {sum(r['status'] == 'done' for r in results)} done, "
          f"{sum(r['status'] == 'skipped' for r in results)} skipped (up to date), {len(failed)} failed; "
          f"{time.perf_counter() - t0:.0f} s")
    for r in failed:
        print(f"FAILED {r['label']} seed {r['seed']}: {r['error']}\n       notebook: {r['notebook'] or '-'}")
    if fig_failed:
        print(f"FAILED 06_figures: {fig_failed}\n       notebook: {out / FIGURES_NOTEBOOK}")
    atomic_write_json(out / "sweep_summary.json", {"results": results, "figures_error": fig_failed})
    from cnp.figures import to_markdown

    atomic_write_text(out / "sweep_summary.md", to_markdown(rows, cols))
    return 1 if failed or fig_failed else 0


if __name__ == "__main__":
    sys.exit(main())
