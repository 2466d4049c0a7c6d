"""The paper's figures and tables, built from the run directories of a sweep.

Analogues of the paper's figures (saved as PNG and PDF, atomically):

==========================  ===================================================================
file                        content
==========================  ===================================================================
``fig1_basketball``         Figure 1: image, overall LRP heatmap, the K subspace heatmaps and
                            the heatmap of the CNP-pruned network (basketball demo)
``fig2_subspaces_<pair>``   Figure 2: subspace heatmaps of the easy pair (carton-dugong)
``fig3_accuracy_<pair>``    Figure 3: overall and c0w1 accuracy vs pruning rate (easy pair),
                            mean +- std over seeds, CNP vs vanilla LRP and other baselines
``fig4_accuracy_<pair>``    Figure 4: the same for the hard pair (crate-packet)
``fig5_subspaces_<pair>``   Figure 5: subspace heatmaps of the hard pair
``table_subspaces``         AP of each subspace's R(k) against watermark labels, its share of
                            relevance on watermark pixels, whether it was ablated (md + csv)
``table_summary``           per group and method: accuracy and watermark relevance share at the
                            target pruning rate, mean +- std over seeds (md + csv)
==========================  ===================================================================

Every other group of runs (another pair, a Table 1 variant) gets ``accuracy_<label>`` and
``subspaces_<label>``. Functions that draw take data (arrays, dicts), not paths, so they can be
tested without a run; :func:`load_runs` and :func:`load_heatmaps` read a sweep directory and
:func:`make_all` writes everything. Figures are :class:`matplotlib.figure.Figure` objects made
without pyplot (rendered with Agg when saved), so nothing depends on the notebook's backend.

Standard deviations are sample standard deviations over seeds (``ddof=1``); with one seed they
are 0. Subspaces are numbered from 0, as the ``ablate`` parameter numbers them (the paper's
"subspace 4" is ``U_3`` here).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure as _MplFigure

from cnp.data.splits import SUBGROUPS  # noqa: F401  (the subgroups in the paper's order; c0w1 is the OOD one)
from cnp.io import CNPError, atomic_write_bytes, atomic_write_text, safe_torch_load
from cnp.results import RunRecord, at_target, group_runs, load_runs, to_markdown  # noqa: F401  (re-exported)

#: Plot order and colours of the pruning methods.
METHOD_STYLE = {
    "cnp": {"color": "#1f77b4", "label": "CNP (ablated subspaces)"},
    "vanilla": {"color": "#d62728", "label": "vanilla LRP pruning"},
    "l1": {"color": "#2ca02c", "label": "L1-norm pruning"},
    "random": {"color": "#7f7f7f", "label": "random pruning"},
    "cnp-keep": {"color": "#9467bd", "label": "CNP, ablation kept (beyond the paper)"},
    "cnp-rr": {"color": "#ff7f0e", "label": "CNP, concept-penalised fine-tuning (beyond the paper)"},
    "cnp-recompute": {"color": "#8c564b", "label": "CNP, DRSA recomputed (beyond the paper)"},
    "cnp-refit": {"color": "#e377c2", "label": "CNP, DRSA fitted afresh each step (beyond the paper)"},
    "cnp-keep-refit": {"color": "#17becf", "label": "CNP, kept ablation following fresh fits (beyond the paper)"},
    "cnp-rr-refit": {"color": "#bcbd22", "label": "CNP, penalty following fresh fits (beyond the paper)"},
    "cnp-posthoc": {"color": "#000000", "label": "CNP, then a fresh fit's ablation kept (beyond the paper)"},
    "vanilla-posthoc": {"color": "#ff9896", "label": "vanilla, then a fresh fit's ablation kept (beyond the paper)"},
}
#: Paper numbering of the canonical pairs: pair -> (subspace figure, accuracy figure).
PAPER_FIGURES = {"carton-dugong": ("fig2_subspaces", "fig3_accuracy"),
                 "crate-packet": ("fig5_subspaces", "fig4_accuracy")}
DEMO_PAIR = "basketball"


# ============================================================================ loading

class Figure(_MplFigure):
    """A pyplot-free matplotlib figure that notebooks show as PNG (``_repr_png_``), with no
    formatter to register and no global state touched by importing this module."""

    def _repr_png_(self) -> bytes:
        return figure_png(self)


def load_heatmaps(run_dir: str | Path) -> dict | None:
    """The example heatmaps of a run as numpy arrays, or None when the ablate stage has none.

    Keys: ``images`` (n, H, W, 3) uint8, ``masks`` (n, H, W) bool, ``subspaces`` (n, K, H, W),
    ``overall`` (n, H, W), ``extra_masks`` {name: (n, H, W)}, and ``pruned`` (n, H, W) (the
    CNP-pruned model's overall heatmaps) when the prune stage wrote them.
    """
    run_dir = Path(run_dir)
    path = run_dir / "ablate" / "heatmaps.pt"
    if not path.exists():
        return None
    h = safe_torch_load(path)
    out = {
        "images": h["images"].permute(0, 2, 3, 1).numpy(),
        "masks": h["masks"].numpy().astype(bool),
        "subspaces": h["subspaces"].float().numpy(),
        "overall": h["overall"].float().numpy(),
        "extra_masks": {k: v.numpy().astype(bool) for k, v in h.get("extra_masks", {}).items()},
    }
    pruned = run_dir / "prune" / "heatmaps_cnp.pt"
    if pruned.exists():
        out["pruned"] = safe_torch_load(pruned)["overall"].float().numpy()
    return out


# ============================================================================ statistics
def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))],
                   dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return float(v.mean()), std, int(v.size)


def _entry_value(entry: Mapping, metric: str) -> float:
    if metric == "wm_relevance_share":
        return float(entry.get("wm_relevance_share", float("nan")))
    return float(entry["acc"].get(metric, float("nan")))


def curve_stats(curves: Sequence[Sequence[Mapping]], metric: str = "overall") -> dict[str, np.ndarray]:
    """Mean and std over seeds of one method's curve.

    Points are matched across seeds by ``(stage, step)`` (their actual pruning rates differ
    slightly with rounding); ``metric`` is a subgroup key of ``acc`` (``overall``, ``c0w1``, ...)
    or ``wm_relevance_share``.

    Returns
    -------
    dict
        ``pruned``, ``mean``, ``std``, ``n`` (arrays over the step points, by pruning rate) and
        ``final_pruned``, ``final_mean``, ``final_std``, ``final_n`` (the point after the final
        fine-tuning; NaN when absent).
    """
    points: dict[tuple, dict[str, list]] = {}
    for curve in curves:
        for k, e in enumerate(curve):
            stage = e.get("stage", "step")
            key = (stage, int(e.get("step", k)))
            p = points.setdefault(key, {"pruned": [], "value": []})
            p["pruned"].append(float(e["pruned"]))
            p["value"].append(_entry_value(e, metric))
    steps = sorted((k for k in points if k[0] != "final"), key=lambda k: k[1])
    rows = []
    for k in steps:
        m, s, n = _mean_std(points[k]["value"])
        rows.append((float(np.mean(points[k]["pruned"])), m, s, n))
    arr = np.asarray(rows, dtype=float).reshape(-1, 4)
    out = {"pruned": arr[:, 0], "mean": arr[:, 1], "std": arr[:, 2], "n": arr[:, 3].astype(int)}
    finals = [k for k in points if k[0] == "final"]
    if finals:
        k = max(finals, key=lambda k: k[1])
        m, s, n = _mean_std(points[k]["value"])
        out.update(final_pruned=float(np.mean(points[k]["pruned"])), final_mean=m, final_std=s, final_n=n)
    else:
        out.update(final_pruned=float("nan"), final_mean=float("nan"), final_std=float("nan"), final_n=0)
    return out


def method_order(methods: Iterable[str]) -> list[str]:
    """Methods in plot order (known ones first, then the rest alphabetically)."""
    ms = set(methods)
    return [m for m in METHOD_STYLE if m in ms] + sorted(ms - set(METHOD_STYLE))


def group_curve_stats(metrics: Sequence[Mapping], metric: str = "overall") -> dict[str, dict]:
    """:func:`curve_stats` for every method present in any of ``metrics`` (one dict per seed)."""
    methods = method_order(m for mm in metrics for m in mm.get("curves", {}))
    return {m: curve_stats([mm["curves"][m] for mm in metrics if m in mm.get("curves", {})], metric)
            for m in methods}


# ============================================================================ drawing helpers
def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(mean: float, std: float, n: int, digits: int = 3) -> str:
    if n == 0 or math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _image_hwc(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.transpose(1, 2, 0)
    return img


def _show_heatmap(ax, hm: np.ndarray, scale: float) -> None:
    scale = scale if scale > 0 else 1.0
    ax.imshow(hm, cmap="bwr", vmin=-scale, vmax=scale, interpolation="nearest")
    if not np.any(hm):
        ax.text(0.5, 0.5, "no relevance\n(all zero)", ha="center", va="center", fontsize=7, color="gray",
                transform=ax.transAxes)


def _outline(ax, mask: np.ndarray | None, color: str) -> None:
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=color, linewidths=0.8)


def _clear_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def mask_share_np(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per-image share of positive relevance on ``masks`` pixels (numpy; 0 without relevance)."""
    pos = np.clip(heatmaps, 0, None)
    on = (pos * masks).reshape(*pos.shape[:-2], -1).sum(-1)
    tot = pos.reshape(*pos.shape[:-2], -1).sum(-1)
    return np.where(tot > 0, on / np.maximum(tot, 1e-12), 0.0)


# ============================================================================ figures
def fig_subspaces(
    images: np.ndarray, overall: np.ndarray, subspaces: np.ndarray, *, pruned: np.ndarray | None = None,
    masks: np.ndarray | None = None, extra_masks: Mapping[str, np.ndarray] | None = None,
    ablated: Sequence[int] = (), ap: Sequence[float] | None = None, title: str = "",
    max_images: int = 4, pruned_label: str = "after CNP pruning", outline: Sequence[str] = ("ball",),
) -> Figure:
    """Figures 1, 2 and 5: per image, the image, the overall heatmap, the K subspace heatmaps
    and (Figure 1) the heatmap of the CNP-pruned network.

    Heatmaps are red for positive and blue for negative relevance; the image, overall and
    subspace heatmaps of a row share one colour scale (so the subspaces' magnitudes compare),
    the pruned network's heatmap has its own. Watermark masks are outlined in yellow on the
    image, the part masks named in ``outline`` (default: the basketball demo's ball) in cyan.
    Column titles give each subspace's AP against watermark labels (``ap``) and the share of its
    positive relevance on the watermark and on every part mask (``extra_masks``) of these images;
    ablated subspaces (``K'``) are marked. An all-zero heatmap is labelled as such.

    Parameters
    ----------
    images : (n, H, W, 3) or (n, 3, H, W) uint8
    overall : (n, H, W)
    subspaces : (n, K, H, W)
    pruned : (n, H, W), optional
    """
    n = min(len(images), max_images)
    if n == 0:
        raise CNPError("fig_subspaces needs at least one image")
    K = subspaces.shape[1]
    ncols = 2 + K + (pruned is not None)
    fig = Figure(figsize=(1.6 * ncols, 1.7 * n + 0.7), layout="constrained")
    axes = np.asarray(fig.subplots(n, ncols, squeeze=False))
    part_masks = dict(extra_masks or {})
    share_masks = {"wm": masks} if masks is not None and np.asarray(masks).any() else {}
    share_masks.update(part_masks)
    for i in range(n):
        row = axes[i]
        scale = float(max(np.abs(overall[i]).max(), np.abs(subspaces[i]).max()))
        row[0].imshow(_image_hwc(images[i]), interpolation="nearest")
        _outline(row[0], None if masks is None else np.asarray(masks[i]), "yellow")
        for name in outline:
            if name in part_masks:
                _outline(row[0], np.asarray(part_masks[name][i]), "cyan")
        _show_heatmap(row[1], overall[i], scale)
        for k in range(K):
            _show_heatmap(row[2 + k], subspaces[i, k], scale)
        if pruned is not None:
            _show_heatmap(row[-1], pruned[i], float(np.abs(pruned[i]).max()))
        for ax in row:
            _clear_axes(ax)
    top = axes[0]
    top[0].set_title("image", fontsize=8)
    top[1].set_title("overall", fontsize=8)
    for k in range(K):
        lines = [f"$U_{{{k}}}$" + (" (ablated)" if k in ablated else "")]
        if ap is not None and k < len(ap):
            lines.append(f"AP(wm) {_fmt(ap[k], 2)}")
        for name, m in share_masks.items():
            share = float(mask_share_np(subspaces[:n, k], np.asarray(m[:n])).mean())
            lines.append(f"{name} share {share:.2f}")
        top[2 + k].set_title("\n".join(lines), fontsize=7, color="#b00" if k in ablated else "black")
    if pruned is not None:
        top[-1].set_title(pruned_label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def fig_accuracy(
    stats_overall: Mapping[str, Mapping], stats_ood: Mapping[str, Mapping], title: str = "",
    n_seeds: int | None = None,
) -> Figure:
    """Figures 3 and 4: (top) overall accuracy, (bottom) c0w1 accuracy vs pruning rate.

    ``stats_*`` map a method to :func:`curve_stats` output. Lines are the mean over seeds with a
    band of +- one std; the point after the final fine-tuning is drawn as a star. One seed or
    one method is fine (the band is then flat).
    """
    fig = Figure(figsize=(6.0, 6.2), layout="constrained")
    ax_top, ax_bot = fig.subplots(2, 1, sharex=True)
    for ax, stats, ylabel in ((ax_top, stats_overall, "overall accuracy\n(balanced test set)"),
                              (ax_bot, stats_ood, "c0w1 accuracy\n(OOD: negatives with watermark)")):
        for method in method_order(stats):
            s = stats[method]
            style = METHOD_STYLE.get(method, {"color": None, "label": method})
            x, m, sd = 100 * s["pruned"], s["mean"], s["std"]
            (line,) = ax.plot(x, m, marker="o", ms=3, lw=1.5, color=style["color"], label=style["label"])
            ax.fill_between(x, m - sd, m + sd, color=line.get_color(), alpha=0.18, lw=0)
            if s.get("final_n", 0):
                ax.errorbar([100 * s["final_pruned"]], [s["final_mean"]], yerr=[s["final_std"]], fmt="*", ms=9,
                            color=line.get_color(), capsize=3)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    ax_bot.set_xlabel("pruned filters (%)  (★: after final fine-tuning)", fontsize=9)
    if stats_overall:
        ax_top.legend(fontsize=8, loc="lower left")
    if title or n_seeds:
        seeds = f" (mean ± std over n = {n_seeds} seed{'s' if n_seeds != 1 else ''})" if n_seeds else ""
        # long group labels (grid variants) are wrapped, not clipped at the figure's edges
        fig.suptitle("\n".join(textwrap.wrap(f"{title}{seeds}", 70)), fontsize=10)
    return fig


def fig_examples(images: np.ndarray, subgroups: Sequence[str], masks: np.ndarray | None = None,
                 per_group: int = 4, title: str = "") -> Figure:
    """A few images of each subgroup (rows c0w0, c0w1, c1w0, c1w1), watermark outlined."""
    groups = [g for g in SUBGROUPS if g in set(subgroups)]
    if not groups:
        raise CNPError("fig_examples needs images of at least one subgroup")
    fig = Figure(figsize=(1.5 * per_group + 0.6, 1.5 * len(groups) + 0.4), layout="constrained")
    axes = np.asarray(fig.subplots(len(groups), per_group, squeeze=False))
    for r, g in enumerate(groups):
        idx = [i for i, s in enumerate(subgroups) if s == g][:per_group]
        for c in range(per_group):
            ax = axes[r, c]
            _clear_axes(ax)
            if c < len(idx):
                ax.imshow(_image_hwc(images[idx[c]]), interpolation="nearest")
                if masks is not None:
                    _outline(ax, np.asarray(masks[idx[c]]), "yellow")
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(g, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def fig_history(values: Sequence[float], ylabel: str = "DRSA objective J", title: str = "") -> Figure:
    """A line plot of an optimisation history (e.g. the DRSA objective over steps)."""
    fig = Figure(figsize=(4.5, 2.8), layout="constrained")
    ax = fig.subplots()
    ax.plot(np.arange(len(values)), np.asarray(values, dtype=float), lw=1.5)
    ax.set_xlabel("recorded step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def fig_explorer(result: Mapping[str, Any], images: np.ndarray, title: str = "") -> Figure:
    """The live ablation widget's picture: :func:`fig_subspaces` for one explorer update, with
    the positive-class probability of each image in the row label."""
    fig = fig_subspaces(images, result["overall"], result["subspaces"], ablated=result["ablated"],
                        max_images=len(images), title=title)
    for i, ax in enumerate(fig.axes[:: 2 + result["subspaces"].shape[1]]):
        ax.set_ylabel(f"p(pos) {result['p_positive'][i]:.2f}", fontsize=8)
    return fig


# ============================================================================ saving
def save_figure(fig: Figure, out_dir: str | Path, name: str, formats: Sequence[str] = ("png", "pdf"),
                dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.<fmt>`` for every format, each atomically."""
    paths = []
    for fmt in formats:
        buf = io.BytesIO()
        meta = {"CreationDate": None} if fmt == "pdf" else {}
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=meta)
        paths.append(atomic_write_bytes(Path(out_dir) / f"{name}.{fmt}", buf.getvalue()))
    return paths


def to_csv(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    cols = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def save_table(rows: Sequence[Mapping], out_dir: str | Path, name: str, columns: Sequence[str] | None = None,
               title: str = "") -> list[Path]:
    """Write ``name.md`` (markdown, with an optional title line) and ``name.csv`` atomically."""
    md = (f"{title}\n\n" if title else "") + to_markdown(rows, columns)
    return [atomic_write_text(Path(out_dir) / f"{name}.md", md),
            atomic_write_text(Path(out_dir) / f"{name}.csv", to_csv(rows, columns))]


# ============================================================================ tables
def table_subspaces(runs: Sequence[RunRecord]) -> list[dict]:
    """One row per (run, subspace): AP against watermark labels, watermark relevance share, ablated."""
    rows = []
    for r in sorted(runs, key=lambda r: (r.label, r.seed)):
        d = r.metrics.get("drsa", {})
        ap, share, abl = d.get("ap_watermark", []), d.get("wm_relevance_share", []), set(d.get("ablated", []))
        for k in range(int(d.get("K", len(ap)))):
            rows.append({"group": r.label, "seed": r.seed, "subspace": k,
                         "AP_watermark": _fmt(ap[k] if k < len(ap) else float("nan")),
                         "wm_relevance_share": _fmt(share[k] if k < len(share) else float("nan")),
                         "ablated": "yes" if k in abl else ""})
    return rows


def _varied_params(groups: Mapping[str, Sequence[RunRecord]]) -> list[str]:
    """Parameters whose value differs between groups (the grid axes), excluding run bookkeeping."""
    skip = {"run_dir", "seed", "threads", "device", "pair"}
    values: dict[str, set] = {}
    for runs in groups.values():
        for k, v in runs[0].metrics.get("params", {}).items():
            if k not in skip:
                values.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
    return sorted(k for k, v in values.items() if len(v) > 1)


def table_summary(groups: Mapping[str, Sequence[RunRecord]]) -> list[dict]:
    """Per group and method: values at the target rate (mean ± std over seeds) and unpruned ones."""
    varied = _varied_params(groups)
    rows = []
    for label, runs in groups.items():
        metrics = [r.metrics for r in runs]
        base = {"group": label, "pair": runs[0].pair, "seeds": len(runs)}
        for k in varied:
            base[k] = runs[0].metrics.get("params", {}).get(k, "")
        un = [m.get("unpruned", {}) for m in metrics]
        rows.append({**base, "method": "unpruned", "pruned": _fmt(0.0, 2),
                     "overall": _pm(*_mean_std([u.get("acc", {}).get("overall") for u in un])),
                     "c0w1": _pm(*_mean_std([u.get("acc", {}).get("c0w1") for u in un])),
                     "c1w0": _pm(*_mean_std([u.get("acc", {}).get("c1w0") for u in un])),
                     "wm_relevance_share": _pm(*_mean_std([u.get("wm_relevance_share") for u in un]))})
        for method in method_order(m for mm in metrics for m in mm.get("curves", {})):
            pts = [at_target(mm["curves"][method]) for mm in metrics if method in mm.get("curves", {})]
            pts = [p for p in pts if p is not None]
            rows.append({**base, "method": method,
                         "pruned": _fmt(float(np.mean([p["pruned"] for p in pts])) if pts else float("nan"), 2),
                         "overall": _pm(*_mean_std([p["acc"].get("overall") for p in pts])),
                         "c0w1": _pm(*_mean_std([p["acc"].get("c0w1") for p in pts])),
                         "c1w0": _pm(*_mean_std([p["acc"].get("c1w0") for p in pts])),
                         "wm_relevance_share": _pm(*_mean_std([p.get("wm_relevance_share") for p in pts]))})
    return rows


def run_markdown(metrics: Mapping) -> str:
    """A markdown table of one run: unpruned and every method at the target rate."""
    rows = [{"model": "unpruned", "pruned": "0.00",
             **{g: _fmt(metrics["unpruned"]["acc"].get(g, float("nan"))) for g in ("overall", *SUBGROUPS)},
             "wm share": _fmt(metrics["unpruned"].get("wm_relevance_share", float("nan"))),
             "params": "", "MACs": ""}]
    for method in method_order(metrics.get("curves", {})):
        p = at_target(metrics["curves"][method])
        if p is None:
            continue
        rows.append({"model": method, "pruned": _fmt(p["pruned"], 2),
                     **{g: _fmt(p["acc"].get(g, float("nan"))) for g in ("overall", *SUBGROUPS)},
                     "wm share": _fmt(p.get("wm_relevance_share", float("nan"))),
                     "params": f"{p.get('params', 0):,}", "MACs": f"{p.get('macs', 0):,}"})
    return to_markdown(rows)


def subspace_markdown(ap: Sequence[float], wm_share: Sequence[float], ablated: Sequence[int]) -> str:
    """Markdown table of the latent analysis: AP and watermark relevance share per subspace."""
    rows = [{"subspace": f"U_{k}", "AP (R(k) vs watermark)": _fmt(ap[k]),
             "share of R on watermark pixels": _fmt(wm_share[k] if k < len(wm_share) else float("nan")),
             "ablated (K')": "yes" if k in ablated else ""} for k in range(len(ap))]
    return to_markdown(rows)


def acc_markdown(acc: Mapping[str, float], wm_share: float | None = None) -> str:
    """Markdown table of subgroup accuracies (and the watermark relevance share)."""
    row = {g: _fmt(acc.get(g, float("nan"))) for g in ("overall", *SUBGROUPS)}
    if wm_share is not None:
        row["wm relevance share"] = _fmt(wm_share)
    return to_markdown([row])


# ============================================================================ everything
def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", label).strip("_") or "run"


def make_all(runs: Sequence[RunRecord] | str | Path, out_dir: str | Path = "figures",
             verbose: bool = True, max_images: int = 4) -> dict[str, list[Path]]:
    """Every figure and table for the runs of a sweep (a list or a sweep directory).

    Per group of runs (same label, several seeds): an accuracy figure (Figures 3/4) and a
    subspace figure from its first seed (Figures 2/5). The basketball group gives Figure 1; if
    there is none, Figure 1 is skipped with a printed note. Returns ``{name: [paths]}``.
    """
    if not isinstance(runs, list | tuple):
        runs = load_runs(runs, verbose=verbose)
    out_dir = Path(out_dir)
    written: dict[str, list[Path]] = {}

    def note(msg: str) -> None:
        if verbose:
            print(f"[figures] {msg}")

    if not runs:
        note("no finished runs (metrics.json) found: nothing to draw")
        return written
    groups = group_runs(runs)
    by_pair: dict[str, list[str]] = {}
    for label, rs in groups.items():
        by_pair.setdefault(rs[0].pair, []).append(label)

    def canonical(label: str, pair: str) -> bool:
        return label == pair or by_pair[pair] == [label]

    for label, rs in groups.items():
        pair = rs[0].pair
        metrics = [r.metrics for r in rs]
        # accuracy vs pruning rate
        st_all = group_curve_stats(metrics, "overall")
        st_ood = group_curve_stats(metrics, "c0w1")
        names = PAPER_FIGURES.get(pair) if canonical(label, pair) else None
        name = f"{names[1]}_{pair}" if names else f"accuracy_{_slug(label)}"
        if st_all:
            fig = fig_accuracy(st_all, st_ood, title=label, n_seeds=len(rs))
            written[name] = save_figure(fig, out_dir, name)
        else:
            note(f"{label}: no pruning curves; accuracy figure skipped")
        # subspace heatmaps (first seed with heatmaps)
        for r in rs:
            h = load_heatmaps(r.run_dir)
            if h is None:
                continue
            d = r.metrics.get("drsa", {})
            demo = pair == DEMO_PAIR and canonical(label, pair)
            if demo:
                name = "fig1_basketball"
            else:
                name = f"{names[0]}_{pair}" if names else f"subspaces_{_slug(label)}"
            fig = fig_subspaces(
                h["images"], h["overall"], h["subspaces"], masks=h["masks"], extra_masks=h["extra_masks"],
                pruned=h.get("pruned") if demo or names is None else None, ablated=d.get("ablated", []),
                ap=d.get("ap_watermark"), max_images=max_images,
                title=f"{label} (seed {r.seed}): DRSA subspaces at {d.get('layer', '?')}, K = {d.get('K', '?')}",
            )
            written[name] = save_figure(fig, out_dir, name)
            break
        else:
            note(f"{label}: no heatmaps (ablate/heatmaps.pt); subspace figure skipped")
    if not any(rs[0].pair == DEMO_PAIR for rs in groups.values()):
        note("no basketball run in this sweep: Figure 1 (fig1_basketball) skipped")
    written["table_subspaces"] = save_table(
        table_subspaces(runs), out_dir, "table_subspaces",
        title="Latent analysis per subspace: AP of R(k) against watermark labels, share of the "
              "subspace's positive relevance on watermark pixels, ablated set K'.")
    written["table_summary"] = save_table(
        table_summary(groups), out_dir, "table_summary",
        title="At the target pruning rate (after the final fine-tuning), mean ± std over seeds; "
              "'unpruned' is the warmed-up model.")
    sample_run = next((r for r in runs if r.pair == "carton-dugong" and r.metrics.get("dataset") == "synthetic"), None)
    if sample_run is not None:
        try:
            from cnp.pipeline import load_data, make_params

            test = load_data(make_params(**sample_run.metrics["params"]))["test"]
            fig = fig_examples(test.images.permute(0, 2, 3, 1).numpy(), test.subgroups, test.masks.numpy(),
                               per_group=6, title="embedded benchmark, carton-dugong test images per subgroup")
            written["benchmark_samples"] = save_figure(fig, out_dir, "benchmark_samples")
        except (CNPError, KeyError, TypeError) as exc:
            note(f"benchmark sample figure skipped: {exc}")
    from cnp.claims import CLAIM_COLUMNS, claims_table

    claims = claims_table(list(runs))
    if claims:
        written["table_claims"] = save_table(
            claims, out_dir, "table_claims", columns=CLAIM_COLUMNS,
            title="The paper's claims as measurable targets (cnp.claims: paired tests over seeds, fixed targets), "
                  "mean ± std over seeds at the target rate after the final fine-tune.")
    for name, paths in written.items():
        note(f"wrote {name}: {', '.join(p.name for p in paths)}")
    return written


def show(written: Mapping[str, Sequence[Path]]) -> None:
    """Display written PNGs and markdown tables in a notebook (no-op outside IPython)."""
    try:
        from IPython.display import Image, Markdown, display
    except ImportError:  # pragma: no cover - IPython is a dependency
        return
    for name, paths in written.items():
        for p in paths:
            if p.suffix == ".png":
                display(Markdown(f"**{name}**"), Image(filename=str(p)))
            elif p.suffix == ".md":
                display(Markdown(p.read_text()))


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of a figure (Agg)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()



__all__ = [
    "RunRecord", "figure_png", "acc_markdown", "at_target", "curve_stats", "fig_accuracy", "fig_examples", "fig_explorer",
    "fig_history", "fig_subspaces", "group_curve_stats", "group_runs", "load_heatmaps", "load_runs", "make_all",
    "mask_share_np", "method_order", "run_markdown", "save_figure", "save_table", "show", "subspace_markdown",
    "table_subspaces", "table_summary", "to_csv", "to_markdown",
]
