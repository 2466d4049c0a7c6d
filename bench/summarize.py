"""One table of every performance figure next to its target, from the benches' JSON files.

Reads ``drsa*.json``, ``lrp*.json``, ``full_run*.json``, ``pruned_speed*.json`` and ``kept_ablation*.json`` in a folder
(as written by the benches' ``--out``), prints a table and writes it as Markdown (with the
machine: CPU model, cores, torch, load average, GPU name) and JSON.

    python bench/summarize.py bench/results/cpu-2026-11-27 --md bench/results/cpu-2026-11-27.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def _load(folder: Path, prefix: str) -> list[dict]:
    out = []
    for p in sorted(folder.glob(f"{prefix}*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        d["_file"] = p.name
        out.append(d)
    return out


def _verdict(ok) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def rows_for(folder: Path) -> list[dict]:
    rows: list[dict] = []

    def add(figure, value, target, ok, where, note=""):
        rows.append({"figure": figure, "value": value, "target": target, "verdict": _verdict(ok), "where": where,
                     "note": note})

    for d in _load(folder, "drsa"):
        a = d["args"]
        size = f"D={a['D']} N={a['N']} K={a['K']} {a['steps']} steps x {a['restarts']}"
        where = f"{d['device']} ({d['device_name']}), {d['threads']} threads"
        paper = (a["D"], a["N"], a["K"], a["steps"], a["restarts"]) == (512, 10000, 4, 5000, 3)
        quick = (a["D"], a["N"], a["steps"]) == (256, 5000, 300)
        # the speed ratio is judged where the bench is meant to run: the CPU preset (--quick)
        # or the paper's size on a GPU; tiny smoke sizes are reported only
        judged = paper if d["device"].startswith("cuda") else (quick or paper)
        ref = d["reference"]["seconds"]
        add(f"DRSA reference algorithm [{size}]", f"{ref:.1f} s", "-", None, where)
        for f in d["fits"]:
            name = f["name"].split(" (")[0]
            # the targets are the default's; another precision is shown beside it, not judged
            default = name == "fit default"
            add(f"DRSA {name}: speed-up over the reference", f"{f['speed_ratio']:.2f}x",
                f">= {d['targets']['speed_ratio']:g}x", f["pass"]["speed_ratio"] if judged and default else None,
                where, size if judged else size + " (smoke size, not judged)")
            add(f"DRSA {name}: final J vs reference", f"{100 * f['J_rel_diff']:.3f} %", "<= 0.5 %",
                f["pass"]["J_rel_diff"], where)
            if d["device"].startswith("cuda"):
                add(f"DRSA {name}: fit time", f"{f['seconds']:.1f} s", "<= 10 s (paper size)",
                    f["pass"]["gpu_paper_size_fit_seconds"] if paper and default else None, where,
                    "" if paper else "not paper size")
    for d in _load(folder, "lrp"):
        where = f"{d['device']} ({d['device_name']}), {d['threads']} threads, load {d['loadavg'][0]:.2f}"
        rate = next(r for r in d["rows"] if r["variant"] == "cnp filters=True")["images_per_s"]
        zen = next(r for r in d["rows"] if r["variant"].startswith("zennit AlphaBeta"))["images_per_s"]
        add(f"LRP ranking, {d['model']} VGG-16 {d['size']} px, batch {d['batch']}: cnp filters=True / zennit",
            f"{d['ratio_vs_zennit']:.3f} ({rate:.3g} vs {zen:.3g} img/s)", "<= 1.10", d["pass"], where,
            f"vs zennit ZPlus {d['ratio_vs_zennit_zplus']:.3f}; collection {d['collection_overhead']:.3f}")
    for d in _load(folder, "full_run"):
        where = f"{d['device']} ({d['device_name']})"
        if "threads" in d:
            where += f", {d['threads']} threads, load {d['loadavg'][0]:.2f}"
        paper_gpu = d["preset"] == "paper" and d["device"].startswith("cuda")
        for r in d["results"]:
            st = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
            ok = r.get("pass", (r["seconds"] <= 90.0) if paper_gpu else None)
            add(f"full run [{d['preset']}] {r['method']}", f"{r['seconds']:.1f} s", "<= 90 s (paper, GPU)",
                ok, where, st)
        if d.get("complete", True):
            add(f"full run [{d['preset']}] projection: 2 pairs x methods x 5 seeds",
                f"{d['projection_paper_s'] / 60:.1f} min", "<= 30 min (paper, GPU)", d.get("pass_paper"), where)
        else:
            add(f"full run [{d['preset']}]", "incomplete (stopped by its time limit)", "-", False, where)
    for d in _load(folder, "pruned_speed"):
        where = f"{d['device']} ({d['device_name']}), {d['threads']} threads, load {d['loadavg_before'][0]:.2f}"
        for r in d["results"]:
            if r["config"] == "unpruned":
                continue
            add(f"80 %-pruned VGG-16 [{r['config']}] {r['mode']} batch {r['batch']} {d['size']} px: speed-up",
                f"{r['speedup']:.2f}x ({r['gmacs_per_image']:.2f} GMACs, {r['mac_ratio']:.1f}x fewer)",
                ">= 8x (CPU, batch 8, 224 px)" if r["judged"] else "(info)", r["pass"], where)
    for d in _load(folder, "kept_ablation"):
        for r in d["results"]:
            add(f"cnp-keep correction, {r['network']} {r['size']} px batch {r['batch']}: latency with / without",
                f"{r['latency_ratio_median']:.3f}x ({r['latency_plain_ms']:.1f} -> {r['latency_kept_ms']:.1f} ms)",
                "(info)", None, f"{r['device']}, {d['threads']} threads",
                f"MACs +{100 * r['mac_increase']:.1f} % (r = {r['r']} of D = {r['D']})")
    return rows


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    info["loadavg"] = list(os.getloadavg())
    return info


def render(rows: list[dict], info: dict, title: str) -> str:
    lines = [f"# {title}", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             "| figure | measured | target | verdict | where | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['figure']} | {r['value']} | {r['target']} | {r['verdict']} | {r['where']} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--md", type=Path, default=None, help="write the Markdown table here")
    p.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("--title", default="Benchmarks")
    p.add_argument("--notes", default="", help="text appended to the Markdown (e.g. the load during the runs)")
    args = p.parse_args(argv)
    rows = rows_for(args.folder)
    info = machine()
    w = max([len(r["figure"]) for r in rows] + [6])
    print(f"{'figure':<{w}s}  {'measured':<34s} {'target':<26s} verdict")
    print("-" * (w + 72))
    for r in rows:
        print(f"{r['figure']:<{w}s}  {r['value']:<34s} {r['target']:<26s} {r['verdict']}")
    md = render(rows, info, args.title) + (f"\n{args.notes}\n" if args.notes else "")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
        print(f"wrote {args.md}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
