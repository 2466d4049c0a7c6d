"""Results of a sweep: its runs' ``metrics.json`` files, grouped, read at the target rate.

The layer below the claims (:mod:`cnp.claims`) and the figures (:mod:`cnp.figures`), which both
read runs through it; it draws nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cnp.io import CNPError


@dataclass
class RunRecord:
    """One finished run of a sweep.

    Attributes
    ----------
    label : str
        Group label: the run directory relative to the sweep directory without its ``seed<k>``
        part (``carton-dugong`` or ``carton-dugong/K-8_step-0.1``); seeds of one group are
        averaged.
    pair, seed : str, int
    run_dir : Path
    metrics : dict
        The run's ``metrics.json`` (the results contract, docs/usage.md).
    """

    label: str
    pair: str
    seed: int
    run_dir: Path
    metrics: dict = field(repr=False)


def load_runs(sweep_dir: str | Path, verbose: bool = True) -> list[RunRecord]:
    """Every ``metrics.json`` under ``sweep_dir`` (recursively), as :class:`RunRecord` s.

    Unreadable files are skipped with a printed note (a run still in progress never leaves a
    partial file: ``metrics.json`` is written atomically).
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise CNPError(f"sweep directory {root} does not exist; run a sweep first (python -m cnp.sweep ...)")
    out = []
    for path in sorted(root.rglob("metrics.json")):
        try:
            m = json.loads(path.read_text())
            pair, seed = str(m["pair"]), int(m["seed"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if verbose:
                print(f"[figures] skipping unreadable {path}: {exc}")
            continue
        rel = path.parent.relative_to(root)
        parts = list(rel.parts)
        if parts and re.fullmatch(r"seed\d+", parts[-1]):
            parts = parts[:-1]
        label = "/".join(parts) or pair
        out.append(RunRecord(label=label, pair=pair, seed=seed, run_dir=path.parent, metrics=m))
    return out


def group_runs(runs: Iterable[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs grouped by label (insertion order: sorted labels), seeds sorted."""
    groups: dict[str, list[RunRecord]] = {}
    for r in sorted(runs, key=lambda r: (r.label, r.seed)):
        groups.setdefault(r.label, []).append(r)
    return groups


def at_target(curve: Sequence[Mapping]) -> Mapping | None:
    """The curve's point at the target rate: after the final fine-tuning, else its last point."""
    if not curve:
        return None
    finals = [e for e in curve if e.get("stage") == "final"]
    return finals[-1] if finals else curve[-1]


def to_markdown(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts); ``columns`` default to the first row's keys."""
    if not rows:
        return "_(no rows)_\n"
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["RunRecord", "at_target", "group_runs", "load_runs", "to_markdown"]
