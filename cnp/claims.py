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

A **no-shortcut control** (runs whose training set has the watermark in both classes at the same
rate, ``wm_rate_pos == wm_rate_neg``; ``python -m cnp.sweep --preset control``) is not a claim:
it is the reference a reader needs to size claims 3 and 4 - the c0w1 accuracy and the share of
relevance on watermark pixels that the same network, pruned the same way, reaches when it never
had the shortcut. Control runs are recognised by their parameters wherever they lie in the sweep
(or passed separately as ``control=``) and are reported in their own row, never as a claim-6 style.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from cnp.evaluate import WM_SUBGROUPS
from cnp.figures import RunRecord, at_target, group_runs, load_runs

EASY, HARD = "carton-dugong", "crate-packet"


def is_control(run: RunRecord) -> bool:
    """True for a no-shortcut control run: the watermark is as frequent in the negative class as
    in the positive one (``params.wm_rate_pos == params.wm_rate_neg``)."""
    p = run.metrics.get("params", {})
    a, b = p.get("wm_rate_pos"), p.get("wm_rate_neg")
    try:
        return a is not None and b is not None and math.isclose(float(a), float(b))
    except (TypeError, ValueError):
        return False


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


def _gaps(runs: Sequence[RunRecord]) -> list[float]:
    """Unpruned c0w0 - c0w1 per run (the shortcut's size)."""
    return [r.metrics["unpruned"]["acc"]["c0w0"] - r.metrics["unpruned"]["acc"]["c0w1"] for r in runs]


def claim_shortcut(runs: Sequence[RunRecord]) -> dict:
    gaps = _gaps(runs)
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


def claim_ood(runs: Sequence[RunRecord], number: int = 3,
              control: Sequence[RunRecord] | None = None) -> dict:
    """Claims 3, 5 and 6: c0w1 at the target rate, CNP vs vanilla, with the overall margin.

    With ``control`` (no-shortcut control runs of the same pair), their mean vanilla c0w1 at the
    target rate is appended to the measured text as the reference a shortcut-free model reaches
    (not judged)."""
    c_cnp, c_van = _paired(runs, lambda e: e["acc"]["c0w1"])
    o_cnp, o_van = _paired(runs, lambda e: e["acc"]["overall"])
    dm, ds, n = _ms([a - b for a, b in zip(c_cnp, c_van)])
    om_c, _, _ = _ms(o_cnp)
    om_v, _, _ = _ms(o_van)
    cm, cs, _ = _ms(c_cnp)
    vm, vs, _ = _ms(c_van)
    holds = bool(n and (cm - vm) >= 0.10 and (om_c - om_v) >= -0.01)
    measured = (f"{_fmt(cm, cs, n)} vs {_fmt(vm, vs, n)} (diff {_fmt(dm, ds, n)}; overall "
                f"{om_c - om_v:+.3f})" if n else "n/a")
    ref = _control_mean(control or [], "vanilla", lambda e: e["acc"]["c0w1"])
    if n and not math.isnan(ref):
        measured += f"; no-shortcut control {ref:.3f} (not judged)"
    return {"claim": number, "what": "c0w1 at the target rate: CNP vs vanilla (overall: CNP - vanilla)",
            "target": "CNP - vanilla >= 0.10; overall >= -0.01",
            "measured": measured,
            "holds": holds, "seeds_holding": f"{sum(a > b for a, b in zip(c_cnp, c_van))}/{n} seeds CNP > vanilla"}


def _area(runs: Sequence[RunRecord]) -> float:
    """Mean watermark area fraction of the runs' share images (nan for runs that predate it)."""
    return _ms([r.metrics["unpruned"].get("wm_area_fraction", float("nan")) for r in runs])[0]


def _control_mean(control: Sequence[RunRecord], method: str, key) -> float:
    """Mean of ``key(entry at the target rate)`` of ``method`` over control runs (nan if none)."""
    vals = [key(e) for e in (_final(r, method) for r in control) if e is not None]
    return _ms(vals)[0]


def _sub_share(entry: Mapping, group: str) -> float:
    return float(entry.get("wm_relevance_share_by_subgroup", {}).get(group, math.nan))


def _subgroup_share(runs: Sequence[RunRecord], control: Sequence[RunRecord], group: str) -> str:
    """Claim 4's shares on one watermarked subgroup (not judged), as a clause of the measured
    text: CNP vs vanilla (ratio), and the control's vanilla share; empty for runs written before
    ``wm_relevance_share_by_subgroup`` existed."""
    pairs = [(a, b) for a, b in zip(*_paired(runs, lambda e: _sub_share(e, group)))
             if not (math.isnan(a) or math.isnan(b))]
    if not pairs:
        return ""
    cm, cs, n = _ms([a for a, _ in pairs])
    vm, vs, _ = _ms([b for _, b in pairs])
    text = (f"; on {group} alone {_fmt(cm, cs, n)} vs {_fmt(vm, vs, n)} "
            f"(ratio {cm / vm if vm > 0 else math.nan:.2f}, lower for CNP on "
            f"{sum(a < b for a, b in pairs)}/{n}")
    ref = _control_mean(control, "vanilla", lambda e: _sub_share(e, group))
    if not math.isnan(ref):
        text += f"; control {ref:.3f}"
    return text + ", not judged)"


def claim_heatmap(runs: Sequence[RunRecord], control: Sequence[RunRecord] | None = None) -> dict:
    """Claim 4, with the issue's target (ratio of shares <= 0.5).

    Also reported, not judged: the area-corrected ratio ``(CNP - area) / (vanilla - area)``, where
    ``area`` is the watermark's mean pixel fraction (``unpruned.wm_area_fraction``), the share of a
    heatmap with no preference for the watermark. When vanilla's share is below twice the area,
    the issue's target asks CNP to put *less* relevance on the watermark than an indifferent model
    would, and the corrected ratio says how much of the watermark's excess relevance CNP removed.
    With ``control`` (no-shortcut control runs), the share their vanilla-pruned models end with
    is appended: the share of a model that never had the shortcut, an empirical floor (not judged).
    Where the runs record it, the same comparison on each watermarked subgroup alone
    (:data:`WM_SUBGROUPS`: the OOD subgroup ``c0w1`` and the watermarked positives ``c1w1``)
    is appended too (not judged; the target is the issue's, on all watermarked images).
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
    floor = _control_mean(control or [], "vanilla", lambda e: e["wm_relevance_share"])
    if n and not math.isnan(floor):
        measured += (f"; a no-shortcut control ends at {floor:.3f}, halving vanilla means "
                     f"{0.5 * vm:.3f} (not judged)")
    for g in WM_SUBGROUPS:
        measured += _subgroup_share(runs, control or [], g)
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


def claim_control(control: Sequence[RunRecord]) -> dict:
    """The no-shortcut control's row (a reference, not a claim): unpruned c0w0 - c0w1, and at the
    target rate c0w1 and the watermark share of relevance, vanilla / CNP."""
    g = _ms(_gaps(control))
    c_cnp, c_van = _paired(control, lambda e: e["acc"]["c0w1"])
    s_cnp, s_van = _paired(control, lambda e: e["wm_relevance_share"])
    n = len(c_van)
    measured = (f"unpruned gap {_fmt(*g)}; c0w1 {_fmt(*_ms(c_van))} / {_fmt(*_ms(c_cnp))}; "
                f"share {_fmt(*_ms(s_van))} / {_fmt(*_ms(s_cnp))}" if n else f"unpruned gap {_fmt(*g)}")
    return {"claim": "control", "what": "no-shortcut control (watermark equally frequent in both classes): "
                                        "unpruned c0w0 - c0w1; at the target rate c0w1 and watermark share, "
                                        "vanilla / CNP",
            "target": "reference (not judged)", "measured": measured,
            "seeds_holding": f"{len(control)} seeds", "holds": None}


def _as_runs(runs) -> list[RunRecord]:
    if runs is None:
        return []
    if isinstance(runs, str) or hasattr(runs, "__fspath__"):
        return load_runs(runs, verbose=False)
    return list(runs)


def claims_table(runs: Sequence[RunRecord] | str, control: Sequence[RunRecord] | str | None = None) -> list[dict]:
    """One row per claim (1-6) from the runs of a sweep (a list or a sweep directory).

    Groups are run labels (``carton-dugong``, ``crate-packet``, ``carton-dugong/wm_text-...``);
    claims 1-4 use the easy pair's canonical group, 5 the hard pair, 6 every other group of the
    easy pair. No-shortcut control runs (:func:`is_control`: in ``runs`` under any label, or
    ``control``, a list or a sweep directory) are taken out first; the easy pair's give a
    ``control`` row and the references in claims 3 and 4 (``holds`` is ``n/a`` there).
    """
    runs = _as_runs(runs)
    ctl = [r for r in runs + _as_runs(control) if is_control(r)]
    runs = [r for r in runs if not is_control(r)]
    ctl_easy = [r for r in ctl if r.pair == EASY]
    groups = group_runs(runs)
    rows: list[dict] = []
    easy = groups.get(EASY, [])
    if easy:
        rows += [claim_shortcut(easy), claim_latent(easy), claim_ood(easy, control=ctl_easy),
                 claim_heatmap(easy, control=ctl_easy)]
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
    if ctl_easy:
        rows.append(claim_control(ctl_easy))
    for r in rows:
        r["holds"] = "n/a" if r["holds"] is None else ("yes" if r["holds"] else "no")
    return rows


CLAIM_COLUMNS = ("claim", "what", "target", "measured", "seeds_holding", "holds")


def selection_table(variants: Mapping[str, Sequence[RunRecord] | str], pair: str = EASY) -> list[dict]:
    """The validation-split comparison by which the benchmark's defaults were chosen.

    ``variants`` maps a name to its runs (a list, or a sweep directory); only ``pair``'s runs that
    are not controls count. Per variant, from ``val_acc`` at the target rate (after the final
    fine-tune) - test accuracies are never read: c0w1 CNP - vanilla (mean ± std over seeds), the
    seeds where CNP is ahead, and overall CNP - vanilla. This is how K = 8 was chosen (README,
    "Choice of defaults")::

        selection_table({"K=4": "runs/var_K4", "K=8": "runs/var_K8", "K=16": "runs/var_K16"})
    """
    rows = []
    for name, runs in variants.items():
        rs = [r for r in _as_runs(runs) if r.pair == pair and not is_control(r)]
        # a run without validation numbers (older metrics.json) gives nan and is not counted
        c_cnp, c_van = _paired(rs, lambda e: e.get("val_acc", {}).get("c0w1", math.nan))
        o_cnp, o_van = _paired(rs, lambda e: e.get("val_acc", {}).get("overall", math.nan))
        d = [a - b for a, b in zip(c_cnp, c_van) if not math.isnan(a - b)]
        dm, ds, n = _ms(d)
        om = _ms([a - b for a, b in zip(o_cnp, o_van) if not math.isnan(a - b)])[0]
        rows.append({"variant": name, "seeds": n,
                     "val c0w1, CNP - vanilla": f"{dm:+.3f} ± {ds:.3f}" if n > 1 else (f"{dm:+.3f}" if n else "n/a"),
                     "CNP ahead": f"{sum(x > 0 for x in d)}/{n}",
                     "val overall, CNP - vanilla": f"{om:+.3f}" if n else "n/a"})
    return rows


SELECTION_COLUMNS = ("variant", "seeds", "val c0w1, CNP - vanilla", "CNP ahead", "val overall, CNP - vanilla")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cnp.claims SWEEP_DIR [--control DIR]``: the claims table (Markdown);
    ``python -m cnp.claims --select NAME=DIR [NAME=DIR ...]``: the validation selection table
    (NAME may contain ``=``; the directory is after the last one)."""
    import argparse

    from cnp.figures import to_markdown
    from cnp.io import CNPError

    ap = argparse.ArgumentParser(prog="python -m cnp.claims", description=main.__doc__)
    ap.add_argument("sweep_dir", nargs="?", help="a sweep directory (claims table)")
    ap.add_argument("--control", help="a sweep directory holding no-shortcut control runs")
    ap.add_argument("--select", nargs="+", metavar="NAME=DIR", help="variants to compare on the validation split")
    args = ap.parse_args(argv)
    try:
        if args.select:
            bad = [v for v in args.select if "=" not in v]
            if bad:
                raise CNPError(f"--select takes NAME=DIR, got {bad[0]!r}")
            variants = dict(v.rsplit("=", 1) for v in args.select)
            print(to_markdown(selection_table(variants), SELECTION_COLUMNS))
        elif args.sweep_dir:
            print(to_markdown(claims_table(args.sweep_dir, control=args.control), CLAIM_COLUMNS))
        else:
            ap.error("give a sweep directory or --select NAME=DIR ...")
    except CNPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
