"""The paper's claims as measurable checks over a sweep's ``metrics.json`` files.

Each claim of the results issue is restated as a number with a threshold, computed from the runs
of a sweep (mean ± std over seeds). The thresholds are the issue's, not tuned:

1. **Shortcut** (warmed-up, unpruned model): c0w1 accuracy at least 20 points below c0w0.
2. **Latent analysis finds it**: one DRSA subspace has AP >= 0.85 for watermark presence on the
   positive class, and that subspace has the largest share of relevance on watermark pixels.
3. **Easy pair, at the target rate** (after the final fine-tune): CNP's mean c0w1 accuracy at
   least 10 points above vanilla LRP pruning, and its overall accuracy at most 1 point below.
4. **Heatmaps**: CNP at least halves the share of relevance on watermark pixels vs vanilla.
5. **Hard pair**: whether the paper's negative result (no OOD gain) reproduces — reported, no
   threshold (a gain below 10 points counts as "no gain", as in claim 3).
6. **Robustness**: claim 3 (same margins) for every run group
   whose label names a watermark style or ablation mode (e.g. a ``styles`` sweep).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from cnp.figures import RunRecord, at_target, group_runs, load_runs

EASY, HARD = "carton-dugong", "crate-packet"


def _ms(values: Sequence[float]) -> tuple[float, float, int]:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return float("nan"), float("nan"), 0
    a = np.asarray(v)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0, len(a)


def _fmt(m: float, s: float, n: int) -> str:
    if n == 0 or math.isnan(m):
        return "n/a"
    return f"{m:.3f} ± {s:.3f}" if n > 1 else f"{m:.3f}"


def _final(run: RunRecord, method: str) -> Mapping | None:
    curve = run.metrics.get("curves", {}).get(method)
    return at_target(curve) if curve else None


def claim_shortcut(runs: Sequence[RunRecord]) -> dict:
    gaps = [r.metrics["unpruned"]["acc"]["c0w0"] - r.metrics["unpruned"]["acc"]["c0w1"] for r in runs]
    m, s, n = _ms(gaps)
    return {"claim": 1, "what": "unpruned c0w0 - c0w1 (accuracy points)", "target": ">= 0.20",
            "measured": _fmt(m, s, n), "holds": bool(n and m >= 0.20),
            "seeds_holding": f"{sum(g >= 0.20 for g in gaps)}/{n}"}


def claim_latent(runs: Sequence[RunRecord]) -> dict:
    best_ap, ok = [], []
    for r in runs:
        d = r.metrics["drsa"]
        ap = [a for a in d["ap_watermark"]]
        share = d["wm_relevance_share"]
        k = int(np.nanargmax(ap))
        best_ap.append(ap[k])
        ok.append(ap[k] >= 0.85 and int(np.nanargmax(share)) == k)
    m, s, n = _ms(best_ap)
    return {"claim": 2, "what": "best subspace AP (watermark); and it has the largest watermark share",
            "target": "AP >= 0.85 and largest share", "measured": _fmt(m, s, n),
            "holds": bool(n and sum(ok) == n), "seeds_holding": f"{sum(ok)}/{n}"}


def _paired(runs: Sequence[RunRecord], key, a: str = "cnp", b: str = "vanilla") -> tuple[list, list]:
    xa, xb = [], []
    for r in runs:
        ea, eb = _final(r, a), _final(r, b)
        if ea is not None and eb is not None:
            xa.append(key(ea))
            xb.append(key(eb))
    return xa, xb


def claim_ood(runs: Sequence[RunRecord], number: int = 3) -> dict:
    c_cnp, c_van = _paired(runs, lambda e: e["acc"]["c0w1"])
    o_cnp, o_van = _paired(runs, lambda e: e["acc"]["overall"])
    dm, ds, n = _ms([a - b for a, b in zip(c_cnp, c_van)])
    om_c, _, _ = _ms(o_cnp)
    om_v, _, _ = _ms(o_van)
    cm, cs, _ = _ms(c_cnp)
    vm, vs, _ = _ms(c_van)
    holds = bool(n and (cm - vm) >= 0.10 and (om_c - om_v) >= -0.01)
    return {"claim": number, "what": "c0w1 at the target rate: CNP vs vanilla (overall: CNP - vanilla)",
            "target": "CNP - vanilla >= 0.10; overall >= -0.01",
            "measured": f"{_fmt(cm, cs, n)} vs {_fmt(vm, vs, n)} (diff {_fmt(dm, ds, n)}; overall "
                        f"{om_c - om_v:+.3f})" if n else "n/a",
            "holds": holds, "seeds_holding": f"{sum(a > b for a, b in zip(c_cnp, c_van))}/{n} seeds CNP > vanilla"}


def _area(runs: Sequence[RunRecord]) -> float:
    """Mean watermark area fraction of the runs' share images (nan for runs that predate it)."""
    return _ms([r.metrics["unpruned"].get("wm_area_fraction", float("nan")) for r in runs])[0]


def claim_heatmap(runs: Sequence[RunRecord]) -> dict:
    """Claim 4, with the issue's target (ratio of shares <= 0.5).

    Also reported, not judged: the area-corrected ratio ``(CNP - area) / (vanilla - area)``, where
    ``area`` is the watermark's mean pixel fraction (``unpruned.wm_area_fraction``), the share of a
    heatmap with no preference for the watermark. When vanilla's share is below twice the area,
    the issue's target asks CNP to put *less* relevance on the watermark than an indifferent model
    would, and the corrected ratio says how much of the watermark's excess relevance CNP removed.
    """
    s_cnp, s_van = _paired(runs, lambda e: e["wm_relevance_share"])
    cm, cs, n = _ms(s_cnp)
    vm, vs, _ = _ms(s_van)
    ratio = cm / vm if n and vm > 0 else float("nan")
    area = _area(runs)
    measured = f"{_fmt(cm, cs, n)} vs {_fmt(vm, vs, n)} (ratio {ratio:.2f})" if n else "n/a"
    if n and not math.isnan(area) and vm > area:
        measured += (f"; watermark area {area:.3f}, excess over area {cm - area:.3f} vs {vm - area:.3f} "
                     f"(ratio {(cm - area) / (vm - area):.2f}, not judged)")
    return {"claim": 4, "what": "share of relevance on watermark pixels at the target rate: CNP vs vanilla",
            "target": "CNP <= 0.5 x vanilla", "measured": measured, "holds": bool(n and ratio <= 0.5),
            "seeds_holding": f"{sum(a <= 0.5 * b for a, b in zip(s_cnp, s_van))}/{n}"}


def claim_hard(runs: Sequence[RunRecord]) -> dict:
    row = claim_ood(runs, number=5)
    c_cnp, c_van = _paired(runs, lambda e: e["acc"]["c0w1"])
    gain = (np.mean(c_cnp) - np.mean(c_van)) if c_cnp else float("nan")
    unpruned = _ms([r.metrics["unpruned"]["acc"]["c0w1"] for r in runs])
    row.update({
        "what": "hard pair: c0w1 at the target rate, CNP vs vanilla (unpruned c0w1 "
                f"{_fmt(*unpruned)})",
        "target": "paper: no OOD gain (report)",
        "holds": bool(c_cnp and gain < 0.10),
    })
    return row


def claims_table(runs: Sequence[RunRecord] | str) -> list[dict]:
    """One row per claim (1-6) from the runs of a sweep (a list or a sweep directory).

    Groups are run labels (``carton-dugong``, ``crate-packet``, ``carton-dugong/wm_text-...``);
    claims 1-4 use the easy pair's canonical group, 5 the hard pair, 6 every other group of the
    easy pair.
    """
    if isinstance(runs, str) or hasattr(runs, "__fspath__"):
        runs = load_runs(runs, verbose=False)
    groups = group_runs(runs)
    rows: list[dict] = []
    easy = groups.get(EASY, [])
    if easy:
        rows += [claim_shortcut(easy), claim_latent(easy), claim_ood(easy), claim_heatmap(easy)]
    hard = groups.get(HARD, [])
    if hard:
        rows.append(claim_hard(hard))
    for label, rs in groups.items():
        if rs[0].pair == EASY and label != EASY:
            # "the effect holds" for a style or ablation mode: claim 3's margins (c0w1 +0.10,
            # overall no more than 1 point lower), not merely the direction
            row = claim_ood(rs, number=6)
            row["what"] = f"{label}: " + row["what"]
            rows.append(row)
    for r in rows:
        r["holds"] = "yes" if r["holds"] else "no"
    return rows


CLAIM_COLUMNS = ("claim", "what", "target", "measured", "seeds_holding", "holds")
