"""The paper's claims as statistical tests over a sweep's ``metrics.json`` files.

Every comparison is paired by seed (the same data, warmed-up model and subspaces for both
methods) and reported with its mean, a 95 % confidence interval of the paired difference, the
one-sided p-value of a paired t-test and the number of seeds that favour CNP
(:func:`cnp.stats.paired`). The targets are fixed in advance, not tuned:

1. **Shortcut** (warmed-up, unpruned model, easy pair): c0w0 - c0w1 >= 0.20 (mean over seeds).
2. **Latent analysis finds it**: the best subspace's watermark AP on the validation positives
   >= 0.85 (mean over seeds).
3. **Easy pair at the target rate, after the final fine-tune**: c0w1 CNP - vanilla has a mean
   >= +0.05 *and* a 95 % CI whose lower bound is above 0; overall CNP - vanilla >= -0.01 (mean).
4. **Heatmaps, on the OOD subgroup c0w1**: CNP's share of relevance on watermark pixels in excess
   of the no-shortcut control's is at most half of vanilla's excess (means over seeds):
   ``(cnp - ctl) <= 0.5 (vanilla - ctl)``. Per seed ``cnp_i - 0.5 vanilla_i - 0.5 ctl`` is
   tested against 0 (its CI is reported). Needs control runs; without them the claim is ``n/a``.
5. **Hard pair**: whether the paper's negative result (no OOD gain) reproduces: "no gain" unless
   claim 3's c0w1 test passes; vanilla's overall accuracy at the target rate is reported beside
   it (the result only speaks about the mechanism where vanilla keeps >= 0.65).
6. **Held-out watermark styles and the mean ablation**: claim 3's tests for every run group whose
   label names a watermark style or ablation mode (e.g. a ``styles`` sweep).

Claims 3, 5 and 6 are ``n/a`` (not judged) for a run group in which no seed has both a CNP and
a vanilla curve, e.g. a sweep run with other ``methods=``.

A **no-shortcut control** (runs whose training set has the watermark in both classes at the same
rate, ``wm_rate_pos == wm_rate_neg``; ``python -m cnp.sweep --preset control``) is not a claim:
it is the reference claims 3 and 4 need - the c0w1 accuracy and the share of relevance on
watermark pixels that the same network, pruned the same way, reaches when it never had the
shortcut. Control runs are recognised by their parameters wherever they lie in the sweep (or
passed separately as ``control=``) and are reported in their own row, never as a claim-6 style.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from cnp.results import RunRecord, at_target, group_runs, load_runs
from cnp.stats import clean, mean_ci, p_text, paired

EASY, HARD = "carton-dugong", "crate-packet"
#: fixed targets of the claims (see the module doc)
SHORTCUT_GAP = 0.20
AP_FLOOR = 0.85
OOD_MARGIN = 0.05
OVERALL_MARGIN = -0.01
SHARE_FRACTION = 0.5
HARD_VANILLA_OVERALL = 0.65


def is_control(run: RunRecord) -> bool:
    """True for a no-shortcut control run: the watermark is as frequent in the negative class as
    in the positive one (``wm_rate_pos == wm_rate_neg`` in its ``params``)."""
    p = run.metrics.get("params", {})
    a, b = p.get("wm_rate_pos"), p.get("wm_rate_neg")
    try:
        return a is not None and b is not None and math.isclose(float(a), float(b))
    except (TypeError, ValueError):
        return False


def _ms(values: Sequence[float]) -> tuple[float, float, int]:
    v = clean(values)
    if not v:
        return float("nan"), float("nan"), 0
    a = np.asarray(v)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0, len(a)


def _fmt(m: float, s: float, n: int) -> str:
    if n == 0 or math.isnan(m):
        return "n/a"
    return f"{m:.3f} ± {s:.3f}" if n > 1 else f"{m:.3f}"


def _mean_ci_text(values: Sequence[float]) -> str:
    """``0.299 [95 % CI 0.233, 0.365]`` of the values' mean."""
    m, lo, hi, n = mean_ci(values)
    if n == 0:
        return "n/a"
    if n == 1:
        return f"{m:.3f} (1 seed)"
    return f"{m:.3f} [95 % CI {lo:.3f}, {hi:.3f}]"


def _final(run: RunRecord, method: str) -> Mapping | None:
    curve = run.metrics.get("curves", {}).get(method)
    return at_target(curve) if curve else None


def _gaps(runs: Sequence[RunRecord]) -> list[float]:
    """Unpruned c0w0 - c0w1 per run (the shortcut's size)."""
    return [r.metrics["unpruned"]["acc"]["c0w0"] - r.metrics["unpruned"]["acc"]["c0w1"] for r in runs]


def claim_shortcut(runs: Sequence[RunRecord]) -> dict:
    gaps = _gaps(runs)
    m, _, n = _ms(gaps)
    return {"claim": 1, "what": "unpruned c0w0 - c0w1 (accuracy points)", "target": f">= {SHORTCUT_GAP:.2f} (mean)",
            "measured": _mean_ci_text(gaps), "holds": bool(n and m >= SHORTCUT_GAP),
            "seeds_holding": f"{sum(g >= SHORTCUT_GAP for g in gaps)}/{n}"}


def claim_latent(runs: Sequence[RunRecord]) -> dict:
    """Claim 2: the best subspace's AP (``drsa.ap_watermark``, computed on the validation
    positives by the ablate stage)."""
    best_ap = [float(np.nanmax(r.metrics["drsa"]["ap_watermark"])) for r in runs]
    m, _, n = _ms(best_ap)
    return {"claim": 2, "what": "best subspace's watermark AP (validation positives)",
            "target": f">= {AP_FLOOR:.2f} (mean)", "measured": _mean_ci_text(best_ap),
            "holds": bool(n and m >= AP_FLOOR), "seeds_holding": f"{sum(a >= AP_FLOOR for a in best_ap)}/{n}"}


def _last_step(run: RunRecord, method: str) -> Mapping | None:
    """The curve's last pruning step, before the final recovery fine-tune (None without one)."""
    steps = [e for e in run.metrics.get("curves", {}).get(method) or [] if e.get("stage") == "step"]
    return steps[-1] if steps and any(e.get("stage") == "final" for e in run.metrics["curves"][method]) else None


def _paired(runs: Sequence[RunRecord], key, a: str = "cnp", b: str = "vanilla", entry=None) -> tuple[list, list]:
    """Per seed ``key(entry)`` of methods ``a`` and ``b`` (runs holding both), by default at the
    target rate after the final fine-tune."""
    entry = entry or _final
    xa, xb = [], []
    for r in runs:
        ea, eb = entry(r, a), entry(r, b)
        if ea is not None and eb is not None:
            xa.append(key(ea))
            xb.append(key(eb))
    return xa, xb


def ood_test(runs: Sequence[RunRecord], a: str = "cnp", b: str = "vanilla") -> dict:
    """Claim 3's statistics for methods ``a`` vs ``b``: the paired c0w1 and overall tests
    (:class:`cnp.stats.Paired`) and the verdict (mean c0w1 difference >= ``OOD_MARGIN``, its
    CI's lower bound > 0, mean overall difference >= ``OVERALL_MARGIN``)."""
    c_a, c_b = _paired(runs, lambda e: e["acc"]["c0w1"], a, b)
    o_a, o_b = _paired(runs, lambda e: e["acc"]["overall"], a, b)
    c, o = paired(c_a, c_b), paired(o_a, o_b)
    # no seed with both methods (e.g. a sweep without CNP runs): not judged
    holds = (c.mean >= OOD_MARGIN and c.ci_low > 0 and o.mean >= OVERALL_MARGIN) if c.n else None
    return {"c0w1": c, "overall": o, "holds": holds, "c0w1_a": _ms(c_a), "c0w1_b": _ms(c_b),
            "overall_a": _ms(o_a), "overall_b": _ms(o_b)}


def claim_ood(runs: Sequence[RunRecord], number: int = 3,
              control: Sequence[RunRecord] | None = None) -> dict:
    """Claims 3, 5 and 6: c0w1 at the target rate, CNP vs vanilla, with the overall margin.

    With ``control`` (no-shortcut control runs of the same pair), their mean vanilla c0w1 at the
    target rate is appended to the measured text as the reference a shortcut-free model reaches
    (not judged)."""
    t = ood_test(runs)
    c, o = t["c0w1"], t["overall"]
    measured = (f"c0w1 {_fmt(*t['c0w1_a'])} vs {_fmt(*t['c0w1_b'])}, diff {c.text()}; overall "
                f"{_fmt(*t['overall_a'])} vs {_fmt(*t['overall_b'])}, diff {o.text()}" if c.n else "n/a")
    before = paired(*_paired(runs, lambda e: e["acc"]["c0w1"], entry=_last_step))
    if c.n and before.n:
        measured += f"; before the final fine-tune c0w1 diff {before.text()} (not judged)"
    ref = _control_mean(control or [], "vanilla", lambda e: e["acc"]["c0w1"])
    if c.n and not math.isnan(ref):
        measured += f"; no-shortcut control c0w1 {ref:.3f} (not judged)"
    return {"claim": number, "what": "c0w1 at the target rate: CNP vs vanilla (overall: CNP - vanilla)",
            "target": f"c0w1 diff mean >= +{OOD_MARGIN:.2f} and CI low > 0; overall diff >= {OVERALL_MARGIN:+.2f}",
            "measured": measured, "holds": t["holds"], "seeds_holding": f"{c.favour}/{c.n} seeds CNP > vanilla"}


def _control_mean(control: Sequence[RunRecord], method: str, key) -> float:
    """Mean of ``key(entry at the target rate)`` of ``method`` over control runs (nan if none)."""
    vals = [key(e) for e in (_final(r, method) for r in control) if e is not None]
    return _ms(vals)[0]


def _sub_share(entry: Mapping, group: str) -> float:
    return float(entry.get("wm_relevance_share_by_subgroup", {}).get(group, math.nan))


def claim_heatmap(runs: Sequence[RunRecord], control: Sequence[RunRecord] | None = None) -> dict:
    """Claim 4 on the OOD subgroup c0w1: CNP's watermark share in excess of the no-shortcut
    control's is at most ``SHARE_FRACTION`` of vanilla's excess (means over seeds).

    The test statistic per seed is ``cnp_i - f vanilla_i - (1 - f) ctl`` (``f`` = 0.5, ``ctl``
    the control's mean vanilla share on c0w1 at the target rate); the claim holds when the
    ratio of the mean excesses is <= ``f`` (equivalently the statistic's mean is <= 0), and its
    CI and one-sided p-value (H1: below 0) say how firmly. The share over all watermarked images
    and on c1w1 are appended for reference (not judged)."""
    control = control or []
    s_cnp, s_van = [list(v) for v in _paired(runs, lambda e: _sub_share(e, "c0w1"))]
    keep = [i for i in range(len(s_cnp)) if not (math.isnan(s_cnp[i]) or math.isnan(s_van[i]))]
    s_cnp, s_van = [s_cnp[i] for i in keep], [s_van[i] for i in keep]
    ctl = _control_mean(control, "vanilla", lambda e: _sub_share(e, "c0w1"))
    row = {"claim": 4, "what": "c0w1 share of relevance on watermark pixels in excess of the no-shortcut "
                               "control's at the target rate: CNP vs vanilla",
           "target": f"CNP excess <= {SHARE_FRACTION} x vanilla excess (means)"}
    cm, cs, n = _ms(s_cnp)
    vm, vs, _ = _ms(s_van)
    if not n:
        why = "no per-subgroup shares" if _paired(runs, lambda e: 0.0)[0] else "no seed with both CNP and vanilla"
        return {**row, "measured": f"n/a ({why})", "holds": None, "seeds_holding": "0/0"}
    measured = f"c0w1 share {_fmt(cm, cs, n)} vs {_fmt(vm, vs, n)}"
    if math.isnan(ctl):
        measured += "; no control runs, the excess is undefined"
        holds, seeds = None, f"{n} seeds"
    else:
        f = SHARE_FRACTION
        stat = paired([a - f * b - (1 - f) * ctl for a, b in zip(s_cnp, s_van)], None, alternative="less")
        ratio = (cm - ctl) / (vm - ctl) if vm > ctl else float("nan")
        measured += (f"; control {ctl:.3f}; excess {cm - ctl:.3f} vs {vm - ctl:.3f} (ratio {ratio:.2f}); "
                     f"cnp - {f} vanilla - {1 - f} control: {stat.text()}")
        holds = bool(vm > ctl and stat.mean <= 0)
        seeds = f"{stat.favour}/{stat.n} seeds below half"
    for g, key in (("all watermarked images", lambda e: e["wm_relevance_share"]),
                   ("c1w1", lambda e: _sub_share(e, "c1w1"))):
        a, b = _paired(runs, key)
        am, _, an = _ms(a)
        bm, _, _ = _ms(b)
        if an:
            c = _control_mean(control, "vanilla", key)
            measured += f"; {g}: {am:.3f} vs {bm:.3f}" + ("" if math.isnan(c) else f", control {c:.3f}")
    return {**row, "measured": measured + " (these two not judged)", "holds": holds, "seeds_holding": seeds}


def claim_hard(runs: Sequence[RunRecord]) -> dict:
    """Claim 5: the hard pair's c0w1 test (claim 3's); "no OOD gain" reproduces unless it passes.
    Vanilla's overall accuracy at the target rate is reported: below ``HARD_VANILLA_OVERALL`` the
    pruned models are near a constant classifier and the result says nothing about CNP."""
    t = ood_test(runs)
    row = claim_ood(runs, number=5)
    unpruned = _ms([r.metrics["unpruned"]["acc"]["c0w1"] for r in runs])
    vm = t["overall_b"][0]
    usable = bool(t["c0w1"].n and vm >= HARD_VANILLA_OVERALL)
    row.update({
        "what": f"hard pair: c0w1 at the target rate, CNP vs vanilla (unpruned c0w1 {_fmt(*unpruned)}; "
                f"vanilla overall {vm:.3f}, {'>=' if usable else 'below'} {HARD_VANILLA_OVERALL})",
        "target": "paper: no OOD gain (claim 3's c0w1 test fails)",
        "holds": (not (t["c0w1"].mean >= OOD_MARGIN and t["c0w1"].ci_low > 0)) if t["c0w1"].n else None,
    })
    return row


def claim_control(control: Sequence[RunRecord]) -> dict:
    """The no-shortcut control's row (a reference, not a claim): unpruned c0w0 - c0w1, and at the
    target rate c0w1 and the watermark share of relevance (all watermarked images, c0w1),
    vanilla / CNP."""
    g = _ms(_gaps(control))
    c_cnp, c_van = _paired(control, lambda e: e["acc"]["c0w1"])
    s_cnp, s_van = _paired(control, lambda e: e["wm_relevance_share"])
    o_cnp, o_van = _paired(control, lambda e: _sub_share(e, "c0w1"))
    n = len(c_van)
    measured = (f"unpruned gap {_fmt(*g)}; c0w1 {_fmt(*_ms(c_van))} / {_fmt(*_ms(c_cnp))}; "
                f"share {_fmt(*_ms(s_van))} / {_fmt(*_ms(s_cnp))}" if n else f"unpruned gap {_fmt(*g)}")
    if n and _ms(o_van)[2]:
        measured += f"; c0w1 share {_fmt(*_ms(o_van))} / {_fmt(*_ms(o_cnp))}"
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
            # "the effect holds" for a style or ablation mode: claim 3's tests, not merely the
            # direction; the style's own shortcut size is reported beside them
            row = claim_ood(rs, number=6)
            row["what"] = f"{label}: " + row["what"]
            row["measured"] = f"unpruned gap {_mean_ci_text(_gaps(rs))}; " + row["measured"]
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
        st = paired(d)
        rows.append({"variant": name, "seeds": n,
                     "val c0w1, CNP - vanilla": f"{dm:+.3f} ± {ds:.3f}" if n > 1 else (f"{dm:+.3f}" if n else "n/a"),
                     "95 % CI, p": (f"[{st.ci_low:+.3f}, {st.ci_high:+.3f}], {p_text(st.p)}" if n > 1 else "n/a"),
                     "CNP ahead": f"{sum(x > 0 for x in d)}/{n}",
                     "val overall, CNP - vanilla": f"{om:+.3f}" if n else "n/a",
                     "val c0w1 CNP / vanilla": (f"{_ms(c_cnp)[0]:.3f} / {_ms(c_van)[0]:.3f}" if n else "n/a")})
    return rows


SELECTION_COLUMNS = ("variant", "seeds", "val c0w1, CNP - vanilla", "95 % CI, p", "CNP ahead",
                     "val overall, CNP - vanilla", "val c0w1 CNP / vanilla")


#: the beyond-paper target (see :func:`methods_table`): c0w1 within this of the control's
CONTROL_MARGIN = 0.05


def methods_table(runs: Sequence[RunRecord] | str, control: Sequence[RunRecord] | str | None = None,
                  pair: str = EASY, split: str = "acc", baseline: str = "vanilla",
                  label: str | None = None) -> list[dict]:
    """Every pruning method of the runs against ``baseline``, paired by seed, at the target rate
    after the final fine-tune.

    One row per method (``baseline`` included, as the reference): c0w1 and overall (mean ± std),
    c0w1 method - baseline with its 95 % CI, one-sided p and the seeds ahead, the c0w1 share of
    relevance on watermark pixels and the MACs per image. ``split="val_acc"`` reads the
    validation split (what a choice is made on). With ``control`` runs, the beyond-paper target
    is judged per method: mean c0w1 within :data:`CONTROL_MARGIN` of the control's (its vanilla
    c0w1 at the same rate), overall >= baseline + :data:`OVERALL_MARGIN`, and the c0w1
    difference's CI above 0. Only the run group ``label`` is read (default: ``pair``'s runs
    without a grid variant).
    """
    rs = [r for r in _as_runs(runs) if r.pair == pair and not is_control(r) and r.label == (label or pair)]
    ctl = [r for r in _as_runs(control if control is not None else runs) if is_control(r)]
    ctl_c0w1 = _control_mean([r for r in ctl if r.pair == pair], "vanilla", lambda e: e[split]["c0w1"])
    methods: list[str] = []
    for r in rs:
        methods += [m for m in r.metrics.get("curves", {}) if m not in methods]
    rows = []
    for m in [baseline] + [m for m in methods if m != baseline]:
        ca, cb = _paired(rs, lambda e: e[split]["c0w1"], m, baseline)
        oa, ob = _paired(rs, lambda e: e[split]["overall"], m, baseline)
        sa, _ = _paired(rs, lambda e: _sub_share(e, "c0w1"), m, baseline)
        macs, _ = _paired(rs, lambda e: float(e.get("macs", math.nan)), m, baseline)
        if not ca:
            continue
        c, o = paired(ca, cb), paired(oa, ob)
        row = {"method": m, "seeds": len(ca), "c0w1": _fmt(*_ms(ca)), "overall": _fmt(*_ms(oa)),
               "c0w1 share": _fmt(*_ms(sa)), "MMACs": f"{_ms(macs)[0] / 1e6:.2f}"}
        if m == baseline:
            row.update({"c0w1 - " + baseline: "(reference)", "CI, p": "", "ahead": "", "overall - " + baseline: "",
                        "target": ""})
        else:
            row.update({"c0w1 - " + baseline: f"{c.mean:+.3f}",
                        "CI, p": (f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}], {p_text(c.p)}" if c.n > 1 else "n/a"),
                        "ahead": f"{c.favour}/{c.n}", "overall - " + baseline: f"{o.mean:+.3f}"})
            if math.isnan(ctl_c0w1):
                row["target"] = "n/a (no control)"
            else:
                ok = (_ms(ca)[0] >= ctl_c0w1 - CONTROL_MARGIN and o.mean >= OVERALL_MARGIN and c.n > 1
                      and c.ci_low > 0)
                row["target"] = ("met" if ok else "not met") + f" (control c0w1 {ctl_c0w1:.3f})"
        rows.append(row)
    return rows


def methods_columns(baseline: str = "vanilla") -> tuple[str, ...]:
    """The column order of :func:`methods_table`."""
    return ("method", "seeds", "c0w1", "overall", "c0w1 - " + baseline, "CI, p", "ahead", "overall - " + baseline,
            "c0w1 share", "MMACs", "target")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cnp.claims SWEEP_DIR [--control DIR]``: the claims table (Markdown);
    ``python -m cnp.claims SWEEP_DIR --methods [--split val] [--control DIR]``: every pruning
    method against vanilla; ``python -m cnp.claims --select NAME=DIR [NAME=DIR ...]``: the
    validation selection table (NAME may contain ``=``; the directory is after the last one)."""
    import argparse

    from cnp.io import CNPError
    from cnp.results import to_markdown

    ap = argparse.ArgumentParser(
        prog="python -m cnp.claims", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The paper's claims as statistical tests over a sweep directory (Markdown on stdout).",
        epilog="examples:\n"
               "  python -m cnp.claims runs/evidence/reproduce              the claims table\n"
               "  python -m cnp.claims runs/evidence/reproduce --methods    every pruning method against vanilla\n"
               "  python -m cnp.claims --select K=4=runs/var_K4 K=8=runs/var_K8\n"
               "                                                           the validation selection table")
    ap.add_argument("sweep_dir", nargs="?", help="a sweep directory (claims table)")
    ap.add_argument("--control", help="a sweep directory holding no-shortcut control runs")
    ap.add_argument("--select", nargs="+", metavar="NAME=DIR", help="variants to compare on the validation split")
    ap.add_argument("--methods", action="store_true",
                    help="the pruning methods table (every method against vanilla) instead of the claims")
    ap.add_argument("--split", choices=("test", "val"), default="test", help="split of the methods table")
    ap.add_argument("--label", help="run group of the methods table, e.g. carton-dugong/rr_lambda-10 "
                                    "(default: the easy pair's runs without a grid variant)")
    args = ap.parse_args(argv)
    try:
        if args.methods:
            if not args.sweep_dir:
                ap.error("--methods needs a sweep directory")
            split = "acc" if args.split == "test" else "val_acc"
            print(to_markdown(methods_table(args.sweep_dir, control=args.control, split=split, label=args.label),
                              methods_columns()))
        elif args.select:
            bad = [v for v in args.select if "=" not in v]
            if bad:
                raise CNPError(f"--select takes NAME=DIR, got {bad[0]!r}")
            variants = dict(v.rsplit("=", 1) for v in args.select)
            print(to_markdown(selection_table(variants), SELECTION_COLUMNS))
        elif args.sweep_dir:
            print(to_markdown(claims_table(args.sweep_dir, control=args.control), CLAIM_COLUMNS))
        else:
            ap.error("give a sweep directory (a folder with the runs' metrics.json files, e.g. "
                     "runs/evidence/reproduce) or --select NAME=DIR ...")
    except CNPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
