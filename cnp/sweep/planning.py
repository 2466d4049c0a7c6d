"""Planning a sweep: the notebooks' parameters, jobs from pairs, seeds and grids, the resume check."""

from __future__ import annotations

import ast
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnp.io import CNPError, recipe_hash
from cnp.params import BENCHMARK_DEFAULTS, FIELDS
from cnp.sweep.presets import RESULT_INDEPENDENT, SHORT_NAMES


# ============================================================================ planning
@dataclass(frozen=True)
class Job:
    """One run of a sweep: a (pair, seed, variant) and its parameter overrides."""

    pair: str
    seed: int
    run_dir: str
    overrides: dict = field(hash=False)
    variant: str = ""

    @property
    def label(self) -> str:
        return f"{self.pair}/{self.variant}" if self.variant else self.pair

    def all_params(self) -> dict[str, Any]:
        return {**self.overrides, "pair": self.pair, "seed": self.seed, "run_dir": self.run_dir}


def parse_value(text: str) -> Any:
    """A command-line value: JSON, else a Python literal, else the string itself."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError):
            continue
    return text


def parse_assignments(items: Sequence[str], what: str = "-p") -> dict[str, Any]:
    """``["step=0.1", ...]`` -> ``{"step": 0.1}``; names must be :class:`Params` fields."""
    known = set(FIELDS)
    out = {}
    for item in items:
        if "=" not in item:
            raise CNPError(f"{what} {item!r}: expected name=value")
        name, value = item.split("=", 1)
        name = name.strip()
        if name not in known:
            import difflib

            hint = difflib.get_close_matches(name, known, n=1)
            raise CNPError(f"{what} {item!r}: unknown parameter {name!r}"
                           + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        if name in ("pair", "seed", "run_dir"):
            raise CNPError(f"{what} {name}=...: use --pairs / --seeds / --out instead")
        out[name] = parse_value(value.strip())
    return out


def parse_grid(items: Sequence[str]) -> dict[str, list]:
    """``["K=4,8,16"]`` -> ``{"K": [4, 8, 16]}``."""
    grid = {}
    for name, value in parse_assignments(items, "-g").items():
        if isinstance(value, list | tuple):
            vals = list(value)
        elif isinstance(value, str):
            vals = [parse_value(v.strip()) for v in value.split(",") if v.strip()]
        else:
            vals = [value]
        grid[name] = vals
    return grid


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(value)).strip("-")


def variant_name(values: Mapping[str, Any]) -> str:
    """Directory name of a grid point: ``K-8_lrp-epsilon_ep-2_rank-pos-neg_step-0.1``."""
    return "_".join(f"{SHORT_NAMES.get(k, k)}-{_slug(v)}" for k, v in values.items())


def expand_grid(grid: Mapping[str, Sequence], mode: str = "product",
                selected: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Grid points: the full product, ``one-at-a-time`` around ``selected`` (default: each
    axis's first value; the selected point included), or ``variations`` (the same without the
    selected point itself); duplicates removed, order kept."""
    if not grid:
        return [{}]
    keys = list(grid)
    if mode == "product":
        points = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]
    elif mode in ("one-at-a-time", "variations"):
        base = {k: (selected or {}).get(k, grid[k][0]) for k in keys}
        points = [dict(base)] if mode == "one-at-a-time" else []
        for k in keys:
            for v in grid[k]:
                if v != base[k] or mode == "one-at-a-time":
                    points.append({**base, k: v})
    else:
        raise CNPError(f"grid mode must be 'product', 'one-at-a-time' or 'variations', got {mode!r}")
    seen, out = set(), []
    for p in points:
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def plan(pairs: Sequence[str], seeds: Sequence[int], out: str | Path, params: Mapping[str, Any] | None = None,
         grid: Mapping[str, Sequence] | None = None, grid_mode: str = "product",
         selected: Mapping[str, Any] | None = None,
         pair_params: Mapping[str, Mapping[str, Any]] | None = None,
         pair_seeds: Mapping[str, Sequence[int]] | None = None) -> list[Job]:
    """The runs of a sweep, in order (pairs, then grid points, then seeds).

    A run's values: ``params``, then ``pair_params[pair]`` (a preset's per-pair values), then
    the grid point's. ``pair_seeds[pair]`` (a preset's per-pair seeds) replaces ``seeds`` for
    that pair."""
    if not pairs:
        raise CNPError("no pairs given (--pairs ... or --preset NAME)")
    if not seeds:
        raise CNPError("no seeds given (--seeds ... or --preset NAME)")
    out = Path(out)
    jobs = []
    for pair in pairs:
        for point in expand_grid(grid or {}, grid_mode, selected):
            variant = variant_name(point) if point else ""
            for seed in (pair_seeds or {}).get(pair, seeds):
                d = out / pair / variant / f"seed{int(seed)}" if variant else out / pair / f"seed{int(seed)}"
                jobs.append(Job(pair=str(pair), seed=int(seed), run_dir=str(d),
                                overrides={**(params or {}), **(pair_params or {}).get(pair, {}), **point},
                                variant=variant))
    return jobs


def check_overrides(jobs: Sequence[Job]) -> None:
    """Validate every distinct set of ``-p`` / ``-g`` / preset values before anything runs.

    A bad value (wrong type, K * d_k != D, unknown method, target outside (0, 1), ...) stops the
    sweep with one line; a bad pair name still fails only its own runs (they keep a notebook).

    Raises
    ------
    CNPError
        The first bad value, naming the grid variant it belongs to.
    """
    from cnp.pipeline import make_params

    seen = set()
    for job in jobs:
        key = json.dumps(job.overrides, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            make_params(**{**BENCHMARK_DEFAULTS, **job.overrides})
        except CNPError as exc:
            raise CNPError(f"{exc}" + (f" (grid variant {job.variant})" if job.variant else "")) from None


# ============================================================================ resume check
def params_key(params: Mapping[str, Any]) -> str:
    """Hash of a run's parameters (a ``Params.to_dict()``) without :data:`RESULT_INDEPENDENT`."""
    d = {k: v for k, v in dict(params).items() if k not in RESULT_INDEPENDENT}
    if isinstance(d.get("methods"), tuple):
        d["methods"] = list(d["methods"])
    return recipe_hash(d)


def expected_key(job: Job) -> str:
    """The parameters key a finished run of ``job`` has (raises CNPError for bad parameters)."""
    return params_key(resolved_params(job).to_dict())


def resolved_params(job: Job):
    """The validated :class:`~cnp.pipeline.Params` a run of ``job``'s notebooks resolves: their
    parameters cells hold the benchmark's settings (:data:`cnp.params.BENCHMARK_DEFAULTS`) where
    they differ from ``Params``, and the job's values are injected after them."""
    from cnp.pipeline import make_params

    return make_params(**{**BENCHMARK_DEFAULTS, **job.all_params()})


def job_status(job: Job) -> tuple[str, str]:
    """``("done", "")`` if ``metrics.json`` exists for the same parameters, ``("invalid", msg)``
    for parameters that cannot run, else ``("todo", reason)``."""
    try:
        key = expected_key(job)
    except CNPError as exc:
        return "invalid", str(exc)
    path = Path(job.run_dir) / "metrics.json"
    if not path.exists():
        return "todo", "no metrics.json"
    try:
        found = params_key(json.loads(path.read_text())["params"])
    except (OSError, ValueError, KeyError, TypeError):
        return "todo", "metrics.json unreadable"
    return ("done", "") if found == key else ("todo", "metrics.json is for other parameters")


