"""Figures and tables from metrics.json files: statistics, drawing, saving, a whole sweep dir."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from cnp import figures
from cnp.io import atomic_torch_save

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _acc(rng, base):
    return {g: float(np.clip(base + rng.normal(0, 0.05), 0, 1)) for g in ("overall", "c0w0", "c0w1", "c1w0", "c1w1")}


def make_metrics(pair="carton-dugong", seed=0, methods=("cnp", "vanilla"), steps=3, K=4, params=None) -> dict:
    """A metrics.json of the results contract with made-up numbers."""
    rng = np.random.default_rng(seed)
    curves = {}
    for m in methods:
        c = []
        for s in range(steps + 1):
            pruned = 0.8 * s / steps + rng.normal(0, 0.002) * (s > 0)
            c.append({"pruned": pruned, "acc": _acc(rng, 0.9 - 0.1 * s), "wm_relevance_share": 0.3,
                      "params": 1000 - 200 * s, "macs": 10000 - 2000 * s, "stage": "step", "step": s})
        c.append({**c[-1], "stage": "final", "step": steps + 1, "acc": _acc(rng, 0.85)})
        curves[m] = c
    return {"pair": pair, "seed": seed, "dataset": "synthetic",
            "params": {"pair": pair, "seed": seed, "K": K, "step": 0.05, "run_dir": f"x/{seed}", **(params or {})},
            "unpruned": {"acc": _acc(rng, 0.9), "wm_relevance_share": 0.4},
            "drsa": {"layer": "conv4_3", "K": K, "d_k": 32, "J": 1.0, "ap_watermark": list(rng.uniform(0.4, 1, K)),
                     "wm_relevance_share": list(rng.uniform(0, 0.5, K)), "ablated": [K - 1]},
            "curves": curves, "timings_s": {"warmup": 1.0}}


def write_run(run_dir, metrics, heatmaps=True, pruned=True, n=2, K=4, size=12, extra_masks=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if heatmaps:
        g = torch.Generator().manual_seed(0)
        masks = torch.zeros(n, size, size, dtype=torch.bool)
        masks[:, 2:5, 2:8] = True
        atomic_torch_save(run_dir / "ablate" / "heatmaps.pt", {
            "index": torch.arange(n), "images": torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
            "masks": masks, "subspaces": torch.randn(n, K, size, size, generator=g),
            "overall": torch.randn(n, size, size, generator=g), "extra_masks": extra_masks or {}})
        if pruned:
            atomic_torch_save(run_dir / "prune" / "heatmaps_cnp.pt", {"overall": torch.randn(n, size, size, generator=g)})
    return run_dir


# ---------------------------------------------------------------------------- statistics
def test_curve_stats_mean_std_over_seeds_and_final_point():
    a = [{"pruned": 0.0, "acc": {"overall": 0.8}, "stage": "step", "step": 0},
         {"pruned": 0.4, "acc": {"overall": 0.6}, "stage": "step", "step": 1},
         {"pruned": 0.4, "acc": {"overall": 0.7}, "stage": "final", "step": 2}]
    b = [{"pruned": 0.0, "acc": {"overall": 0.6}, "stage": "step", "step": 0},
         {"pruned": 0.42, "acc": {"overall": 0.8}, "stage": "step", "step": 1},
         {"pruned": 0.42, "acc": {"overall": 0.9}, "stage": "final", "step": 2}]
    s = figures.curve_stats([a, b], "overall")
    np.testing.assert_allclose(s["pruned"], [0.0, 0.41])
    np.testing.assert_allclose(s["mean"], [0.7, 0.7])
    np.testing.assert_allclose(s["std"], [np.std([0.8, 0.6], ddof=1)] * 2)
    assert list(s["n"]) == [2, 2]
    assert s["final_mean"] == pytest.approx(0.8) and s["final_n"] == 2 and s["final_pruned"] == pytest.approx(0.41)
    one = figures.curve_stats([a], "overall")
    assert list(one["std"]) == [0.0, 0.0] and one["final_std"] == 0.0


def test_curve_stats_without_final_and_nan_subgroups():
    c = [{"pruned": 0.0, "acc": {"overall": 0.5, "c0w1": float("nan")}},
         {"pruned": 0.5, "acc": {"overall": 0.4, "c0w1": 0.2}}]
    s = figures.curve_stats([c], "c0w1")
    assert np.isnan(s["mean"][0]) and s["n"][0] == 0 and s["mean"][1] == pytest.approx(0.2)
    assert s["final_n"] == 0 and np.isnan(s["final_mean"])


def test_at_target_and_method_order():
    c = make_metrics()["curves"]["cnp"]
    assert figures.at_target(c)["stage"] == "final"
    assert figures.at_target(c[:-1]) is c[-2]
    assert figures.at_target([]) is None
    assert figures.method_order(["random", "zzz", "vanilla", "cnp"]) == ["cnp", "vanilla", "random", "zzz"]


# ---------------------------------------------------------------------------- drawing and saving
@pytest.mark.parametrize("methods,seeds", [(("cnp",), [0]), (("cnp", "vanilla", "l1", "random"), [0, 1, 2])])
def test_fig_accuracy_one_or_many_seeds_and_methods(tmp_path, methods, seeds):
    ms = [make_metrics(seed=s, methods=methods) for s in seeds]
    fig = figures.fig_accuracy(figures.group_curve_stats(ms, "overall"), figures.group_curve_stats(ms, "c0w1"),
                               title="t", n_seeds=len(seeds))
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert len(fig.axes[0].get_legend().get_texts()) == len(methods)
    paths = figures.save_figure(fig, tmp_path / "out", "acc")
    assert [p.name for p in paths] == ["acc.png", "acc.pdf"]
    assert paths[0].read_bytes().startswith(PNG_MAGIC) and paths[1].read_bytes().startswith(b"%PDF")
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temp files


def test_fig_accuracy_wraps_a_long_group_label():
    """A grid variant's label is wrapped onto several title lines instead of running off the page."""
    ms = [make_metrics(seed=0)]
    label = "carton-dugong/wm_rate_pos-0.475_wm_rate_neg-0.475"
    fig = figures.fig_accuracy(figures.group_curve_stats(ms, "overall"), figures.group_curve_stats(ms, "c0w1"),
                               title=label, n_seeds=5)
    lines = fig._suptitle.get_text().split("\n")
    assert len(lines) == 2 and all(len(x) <= 70 for x in lines)
    assert "".join(lines).replace(" ", "") == f"{label}(mean±stdovern=5seeds)".replace(" ", "")


def test_fig_subspaces_layout_with_pruned_column_and_titles():
    n, K, H = 3, 4, 10
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 3, H, H), dtype=np.uint8)  # CHW is accepted too
    masks = np.zeros((n, H, H), bool)
    masks[:, :3] = True
    ball = np.zeros((n, H, H), bool)
    ball[:, 5:] = True
    sub = rng.normal(size=(n, K, H, H))
    fig = figures.fig_subspaces(images, sub.sum(1), sub, pruned=rng.normal(size=(n, H, H)), masks=masks,
                                extra_masks={"ball": ball}, ablated=[2], ap=[0.5, 0.6, 0.99, 0.4], max_images=2)
    assert len(fig.axes) == 2 * (2 + K + 1)
    titles = [ax.get_title() for ax in fig.axes[: 2 + K + 1]]
    assert titles[0] == "image" and "ablated" in titles[4] and "AP(wm) 0.99" in titles[4]
    assert "ball share" in titles[2] and "wm share" in titles[2] and titles[-1] == "after CNP pruning"
    assert figures.figure_png(fig).startswith(PNG_MAGIC)
    # notebooks show the figure as PNG through its own _repr_png_ (no formatter registered on import)
    from IPython.core.formatters import DisplayFormatter

    shown, _ = DisplayFormatter().format(fig)
    assert "image/png" in shown
    zero = figures.fig_subspaces(images, sub.sum(1), sub, pruned=np.zeros((n, H, H)), max_images=1)
    assert "no relevance" in zero.axes[-1].texts[0].get_text()


def test_mask_share_np_matches_definition():
    h = np.array([[[1.0, -2.0], [3.0, 0.0]]])
    m = np.array([[[True, True], [False, False]]])
    assert figures.mask_share_np(h, m)[0] == pytest.approx(1 / 4)
    assert figures.mask_share_np(-h.clip(0), m)[0] == 0.0


def test_fig_examples_and_history():
    imgs = np.zeros((6, 8, 8, 3), np.uint8)
    fig = figures.fig_examples(imgs, ["c0w0", "c1w1", "c1w1", "c0w1", "c0w0", "c1w1"], per_group=2)
    assert len(fig.axes) == 3 * 2
    assert len(figures.fig_history([3.0, 2.0, 1.0]).axes) == 1


# ---------------------------------------------------------------------------- tables
def test_tables_markdown_and_csv():
    runs = [figures.RunRecord("carton-dugong", "carton-dugong", s, None, make_metrics(seed=s)) for s in (0, 1)]
    rows = figures.table_subspaces(runs)
    assert len(rows) == 8 and rows[3]["ablated"] == "yes" and rows[0]["ablated"] == ""
    md = figures.to_markdown(rows)
    assert md.splitlines()[0].startswith("| group | seed | subspace | AP_watermark")
    parsed = list(csv.DictReader(io.StringIO(figures.to_csv(rows))))
    assert len(parsed) == 8 and parsed[0]["subspace"] == "0"
    summary = figures.table_summary(figures.group_runs(runs))
    assert [r["method"] for r in summary] == ["unpruned", "cnp", "vanilla"]
    assert "±" in summary[1]["overall"] and summary[1]["seeds"] == 2


def test_table_summary_names_the_varied_parameters():
    a = [figures.RunRecord("cd/K-4", "carton-dugong", 0, None, make_metrics(params={"K": 4}))]
    b = [figures.RunRecord("cd/K-8", "carton-dugong", 0, None, make_metrics(params={"K": 8}))]
    rows = figures.table_summary({"cd/K-4": a, "cd/K-8": b})
    assert "K" in rows[0] and {r["K"] for r in rows} == {4, 8}
    assert "step" not in rows[0]  # the same everywhere: not a column
    assert rows[1]["overall"].count("±") == 0  # one seed: no std shown


def test_run_and_subspace_markdown():
    m = make_metrics()
    md = figures.run_markdown(m)
    assert md.count("\n") == 2 + 1 + 2 and "| cnp | 0.80 |" in md
    s = figures.subspace_markdown([0.5, 0.9], [0.1, 0.6], [1])
    assert "| U_1 | 0.900 | 0.600 | yes |" in s
    assert "overall" in figures.acc_markdown(m["unpruned"]["acc"], 0.4)


# ---------------------------------------------------------------------------- a sweep directory
def test_make_all_paper_names_and_missing_pieces(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for s in (0, 1):
        write_run(sweep / "carton-dugong" / f"seed{s}", make_metrics("carton-dugong", s))
    write_run(sweep / "crate-packet" / "seed0", make_metrics("crate-packet", 0), heatmaps=False)
    (sweep / "broken" / "seed0").mkdir(parents=True)
    (sweep / "broken" / "seed0" / "metrics.json").write_text("{not json")
    out = tmp_path / "figs"
    written = figures.make_all(sweep, out)
    log = capsys.readouterr().out
    assert "Figure 1" in log and "skipped" in log and "unreadable" in log
    assert "crate-packet: no heatmaps" in log
    assert set(written) == {"fig3_accuracy_carton-dugong", "fig2_subspaces_carton-dugong",
                            "fig4_accuracy_crate-packet", "table_subspaces", "table_summary", "table_claims"} | ({"benchmark_samples"} if "benchmark_samples" in written else set())
    for paths in written.values():
        assert all(p.exists() and p.stat().st_size > 0 and p.parent == out for p in paths)
    md = (out / "table_summary.md").read_text()
    assert "carton-dugong" in md and "crate-packet" in md


def test_make_all_figure1_and_grid_groups(tmp_path):
    sweep = tmp_path / "sweep"
    n, size = 2, 12
    ball = torch.zeros(n, size, size, dtype=torch.bool)
    ball[:, 6:] = True
    write_run(sweep / "basketball" / "seed0", make_metrics("basketball", 0), extra_masks={"ball": ball})
    write_run(sweep / "carton-dugong" / "K-8" / "seed0", make_metrics("carton-dugong", 0, params={"K": 8}, K=8), K=8)
    write_run(sweep / "carton-dugong" / "K-4" / "seed0", make_metrics("carton-dugong", 0, params={"K": 4}))
    runs = figures.load_runs(sweep)
    assert sorted(r.label for r in runs) == ["basketball", "carton-dugong/K-4", "carton-dugong/K-8"]
    written = figures.make_all(runs, tmp_path / "figs", verbose=False)
    assert "fig1_basketball" in written
    # two groups of one pair: generic names, no paper numbers
    assert {"accuracy_carton-dugong_K-4", "subspaces_carton-dugong_K-8"} <= set(written)
    assert not any(k.startswith("fig3") for k in written)


def test_make_all_with_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert figures.make_all(tmp_path / "empty", tmp_path / "figs") == {}
    assert "no finished runs" in capsys.readouterr().out
    with pytest.raises(figures.CNPError):
        figures.load_runs(tmp_path / "missing")


def test_load_heatmaps_arrays(tmp_path):
    d = write_run(tmp_path / "r", make_metrics(), n=3, K=4, size=12)
    h = figures.load_heatmaps(d)
    assert h["images"].shape == (3, 12, 12, 3) and h["images"].dtype == np.uint8
    assert h["subspaces"].shape == (3, 4, 12, 12) and h["pruned"].shape == (3, 12, 12)
    assert figures.load_heatmaps(tmp_path / "nothing") is None


def _claim_run(tmp_path, label, seed, c_cnp, c_van, ov=(0.9, 0.9), sub=None, rates=(0.9, 0.05), share=(0.1, 0.1)):
    """A RunRecord with one final curve entry per method (c0w1, overall, watermark shares)."""
    from cnp.figures import RunRecord

    def curve(c0w1, overall, method):
        acc = {"overall": overall, "c0w0": 0.9, "c0w1": c0w1, "c1w0": 0.9, "c1w1": 0.9}
        e = {"pruned": 0.8, "stage": "final", "acc": acc, "wm_relevance_share": share[method == "vanilla"]}
        if sub is not None:
            e["wm_relevance_share_by_subgroup"] = {"c0w1": sub[method == "vanilla"], "c1w1": 0.2}
        return [e]
    m = {"params": {"wm_rate_pos": rates[0], "wm_rate_neg": rates[1]},
         "unpruned": {"acc": {"overall": 0.9, "c0w0": 1.0, "c0w1": 0.6 + 0.01 * seed, "c1w0": 1.0, "c1w1": 1.0}},
         "drsa": {"ap_watermark": [0.5, 0.9], "wm_relevance_share": [0.1, 0.3]},
         "curves": {"cnp": curve(c_cnp, ov[0], "cnp"), "vanilla": curve(c_van, ov[1], "vanilla")}}
    return RunRecord(label=label, pair=label.split("/")[0], seed=seed, run_dir=tmp_path, metrics=m)


def test_claims_table_margins(tmp_path):
    """cnp.claims applies the fixed tests: claim 3 (and claim 6 per style group) needs a mean c0w1
    gain >= 0.05 whose 95 % CI lies above 0, and overall no more than 1 point lower; a mere
    direction (+0.02), a large but noisy mean (CI across 0) and an overall loss do not count."""
    from cnp.claims import claims_table

    def group(label, c_cnp, c_van, **kw):
        return [_claim_run(tmp_path, label, s, a, b, **kw) for s, (a, b) in enumerate(zip(c_cnp, c_van))]

    van = [0.6, 0.7, 0.65, 0.6, 0.7]
    runs = group("carton-dugong", [0.8, 0.75, 0.85, 0.7, 0.8], van)                   # +0.13, all ahead
    runs += group("carton-dugong/wm_text-x", [0.62, 0.72, 0.66, 0.63, 0.71], van)      # +0.02
    runs += group("carton-dugong/wm_opacity-0.35", [1.0, 0.5, 0.95, 0.5, 0.6], van)    # +0.06, CI across 0
    runs += group("carton-dugong/ablation_mode-mean", [0.8, 0.75, 0.85, 0.7, 0.8], van, ov=(0.85, 0.9))
    rows = {(r["claim"], r["what"].split(":")[0]): r for r in claims_table(runs)}
    assert rows[(1, "unpruned c0w0 - c0w1 (accuracy points)")]["holds"] == "yes"
    assert rows[(1, "unpruned c0w0 - c0w1 (accuracy points)")]["measured"].startswith("0.380 [95 % CI")
    assert rows[(2, "best subspace's watermark AP (validation positives)")]["holds"] == "yes"
    r3 = rows[(3, "c0w1 at the target rate")]
    assert r3["holds"] == "yes" and r3["seeds_holding"] == "5/5 seeds CNP > vanilla"
    assert "diff +0.130 [95 % CI +0.047, +0.213], p = 0.0062, 5/5 seeds" in r3["measured"]
    assert rows[(4, "c0w1 share of relevance on watermark pixels in excess of the no-shortcut control's at the "
                    "target rate")]["holds"] == "n/a"                      # no per-subgroup shares here
    assert rows[(6, "carton-dugong/wm_text-x")]["holds"] == "no"
    noisy = rows[(6, "carton-dugong/wm_opacity-0.35")]
    assert noisy["holds"] == "no" and "diff +0.060 [95 % CI -0." in noisy["measured"]
    assert rows[(6, "carton-dugong/ablation_mode-mean")]["holds"] == "no"
    assert rows[(6, "carton-dugong/wm_text-x")]["measured"].startswith("unpruned gap 0.380")


def test_claims_table_no_shortcut_control(tmp_path):
    """Runs trained with the watermark equally frequent in both classes are a control, not a
    style: taken out of the claims, reported in their own row (holds n/a) and as the reference
    in claims 3 and 4 - whether they lie in the sweep under any label or are passed separately."""
    from cnp.claims import claims_table, is_control

    main = [_claim_run(tmp_path, "carton-dugong", s, 0.8 + 0.01 * s, 0.6, sub=(0.04, 0.10), share=(0.14, 0.16))
            for s in range(3)]
    ctl = [_claim_run(tmp_path, "carton-dugong/wm_rate_pos-0.475_wm_rate_neg-0.475", s, 0.90, 0.94,
                      sub=(0.02, 0.01), share=(0.09, 0.085), rates=(0.475, 0.475)) for s in range(3)]
    assert [is_control(r) for r in main[:1] + ctl[:1]] == [False, True]
    for table in (claims_table(main + ctl), claims_table(main, control=ctl)):
        rows = {r["claim"]: r for r in table}
        assert 6 not in rows                                   # the control is not a style
        assert rows["control"]["holds"] == "n/a" and rows["control"]["seeds_holding"] == "3 seeds"
        assert "c0w1 0.940 ± 0.000 / 0.900 ± 0.000" in rows["control"]["measured"]
        assert "share 0.085 ± 0.000 / 0.090 ± 0.000" in rows["control"]["measured"]
        assert "c0w1 share 0.010 ± 0.000 / 0.020 ± 0.000" in rows["control"]["measured"]
        assert "no-shortcut control c0w1 0.940 (not judged)" in rows[3]["measured"]
        assert "control 0.010; excess 0.030 vs 0.090 (ratio 0.33)" in rows[4]["measured"]
        assert rows[3]["holds"] == "yes" and rows[4]["holds"] == "yes"   # judged on the main runs only
    rows = {r["claim"]: r for r in claims_table(main)}
    assert "control" not in rows and rows[4]["holds"] == "n/a" and "undefined" in rows[4]["measured"]


def test_claim_heatmap_excess_over_the_control_on_c0w1(tmp_path):
    """Claim 4 as restated: on c0w1, (CNP - control) <= 0.5 (vanilla - control) on the means; the
    per-seed statistic cnp - 0.5 vanilla - 0.5 control is tested against 0 (CI, p); the shares
    over all watermarked images and on c1w1 are reported, not judged."""
    from cnp.claims import claim_heatmap

    ctl = [_claim_run(tmp_path, "carton-dugong/c", s, 0.9, 0.9, sub=(0.02, 0.02), rates=(0.5, 0.5))
           for s in range(2)]
    good = [_claim_run(tmp_path, "carton-dugong", s, 0.8, 0.7, sub=(c, v)) for s, (c, v) in
            enumerate([(0.04, 0.10), (0.05, 0.12), (0.03, 0.08), (0.05, 0.11)])]
    row = claim_heatmap(good, control=ctl)
    assert row["holds"] is True and row["seeds_holding"] == "4/4 seeds below half"
    # excess 0.0225 vs 0.0825 (printed 0.082) (ratio 0.27); statistic per seed: 0.04 - 0.05 - 0.01 = -0.02, ...
    assert "excess 0.022 vs 0.082 (ratio 0.27)" in row["measured"]
    assert "cnp - 0.5 vanilla - 0.5 control: -0.019 [95 % CI" in row["measured"]
    assert "all watermarked images: 0.100 vs 0.100, control 0.100" in row["measured"]
    bad = [_claim_run(tmp_path, "carton-dugong", s, 0.8, 0.7, sub=(c, v)) for s, (c, v) in
           enumerate([(0.08, 0.10), (0.09, 0.12), (0.07, 0.08)])]
    row = claim_heatmap(bad, control=ctl)
    assert row["holds"] is False and "ratio 0.75" in row["measured"]
    # runs without per-subgroup shares (older metrics.json) cannot be judged
    old = [_claim_run(tmp_path, "carton-dugong", s, 0.8, 0.7) for s in range(2)]
    assert claim_heatmap(old, control=ctl)["holds"] is None


def test_claim_hard_pair_reports_whether_vanilla_is_usable(tmp_path):
    """Claim 5: "no OOD gain" holds unless claim 3's c0w1 test passes; vanilla's overall accuracy
    at the target rate is named against the 0.65 floor."""
    from cnp.claims import claim_hard

    same = [_claim_run(tmp_path, "crate-packet", s, 0.5 + 0.05 * (s % 2), 0.52, ov=(0.7, 0.7)) for s in range(4)]
    row = claim_hard(same)
    assert row["holds"] is True and "vanilla overall 0.700, >= 0.65" in row["what"]
    gain = [_claim_run(tmp_path, "crate-packet", s, 0.8 + 0.01 * s, 0.5, ov=(0.6, 0.6)) for s in range(4)]
    row = claim_hard(gain)
    assert row["holds"] is False and "vanilla overall 0.600, below 0.65" in row["what"]


def test_selection_table_reads_validation_only(tmp_path, capsys):
    """The selection table compares variants on val_acc alone (test numbers differ on purpose
    here and must not leak in); controls and other pairs are ignored; the CLI prints it."""
    from cnp.claims import main, selection_table
    from cnp.figures import RunRecord

    def run(seed, val_cnp, val_van, pair="carton-dugong", rates=(0.9, 0.05)):
        def curve(v):
            val = {"overall": 0.9 + v / 10, "c0w1": v}
            test = {"overall": 0.5, "c0w1": 0.0}
            return [{"pruned": 0.8, "stage": "final", "acc": test, "val_acc": val, "wm_relevance_share": 0.1}]
        m = {"params": {"wm_rate_pos": rates[0], "wm_rate_neg": rates[1]},
             "curves": {"cnp": curve(val_cnp), "vanilla": curve(val_van)}}
        return RunRecord(label=pair, pair=pair, seed=seed, run_dir=tmp_path, metrics=m)

    a = [run(0, 0.8, 0.6), run(1, 0.7, 0.6), run(2, 0.5, 0.6),
         run(3, 0.0, 1.0, pair="crate-packet"), run(4, 0.0, 1.0, rates=(0.5, 0.5))]
    rows = selection_table({"A": a, "B": []})
    assert rows[0] == {"variant": "A", "seeds": 3, "val c0w1, CNP - vanilla": "+0.067 ± 0.153",
                       "95 % CI, p": "[-0.313, +0.446], p = 0.26",
                       "CNP ahead": "2/3", "val overall, CNP - vanilla": "+0.007",
                       "val c0w1 CNP / vanilla": "0.667 / 0.600"}
    assert rows[1]["seeds"] == 0 and rows[1]["val c0w1, CNP - vanilla"] == "n/a"
    # the CLI on a sweep directory written by the tests' fake runs (no val_acc: not counted)
    write_run(tmp_path / "sw" / "carton-dugong" / "seed0", make_metrics("carton-dugong", 0), heatmaps=False)
    assert main(["--select", f"K=8={tmp_path / 'sw'}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| variant |") and "| K=8 | 0 | n/a |" in out
    assert main(["--select", "nodir"]) == 2 and "NAME=DIR" in capsys.readouterr().err
    assert main([str(tmp_path / "sw")]) == 0 and "| claim |" in capsys.readouterr().out


def test_wm_area_fraction_counts_mask_pixels(tiny_pair):
    """The area fraction is the mean mask coverage of the watermarked images, capped at max_images."""
    from cnp.evaluate import wm_area_fraction
    split = tiny_pair["test"]
    idx = torch.nonzero(split.wm).flatten()
    assert wm_area_fraction(split, None) == pytest.approx(float(split.masks[idx].float().mean()))
    assert wm_area_fraction(split, 1) == pytest.approx(float(split.masks[idx[:1]].float().mean()))
    assert math.isnan(wm_area_fraction(split, 0))




def test_claims_without_cnp_runs_are_not_judged(tmp_path):
    """A run group without CNP curves (a sweep with methods=vanilla,...) gives claims 3, 5 and 6
    as n/a, not as a failed claim; with both methods present the verdict is a yes or a no."""
    from cnp.claims import claims_table

    def vanilla_only(label, seed):
        r = _claim_run(tmp_path, label, seed, 0.8, 0.6)
        del r.metrics["curves"]["cnp"]
        return r
    runs = [vanilla_only(label, s) for label in ("carton-dugong", "carton-dugong/wm_text-x", "crate-packet")
            for s in range(3)]
    rows = {r["claim"]: r for r in claims_table(runs)}
    assert rows[3]["holds"] == rows[5]["holds"] == rows[6]["holds"] == "n/a"
    assert rows[3]["measured"] == "n/a" and rows[1]["holds"] == "yes"
    assert rows[4]["holds"] == "n/a" and rows[4]["measured"] == "n/a (no seed with both CNP and vanilla)"
    both = [_claim_run(tmp_path, "carton-dugong/wm_text-x", s, 0.8, 0.6) for s in range(3)]
    assert {r["claim"]: r for r in claims_table(both)}[6]["holds"] == "yes"   # +0.20 on every seed


def test_claim_ood_reports_the_last_step_before_the_final_fine_tune(tmp_path):
    """Claim 3's row also gives the paired c0w1 difference after the last pruning step, before
    the final recovery fine-tune (not judged); runs without a final stage add nothing."""
    from cnp.claims import claim_ood

    runs = []
    for s, (step_c, step_v) in enumerate([(0.9, 0.6), (0.8, 0.6), (0.85, 0.65)]):
        r = _claim_run(tmp_path, "carton-dugong", s, 0.7, 0.7)
        for method, c0w1 in (("cnp", step_c), ("vanilla", step_v)):
            final = r.metrics["curves"][method][0]
            step = {**final, "stage": "step", "acc": {**final["acc"], "c0w1": c0w1}}
            r.metrics["curves"][method] = [step, final]
        runs.append(r)
    row = claim_ood(runs)
    assert "before the final fine-tune c0w1 diff +0.233 [95 % CI" in row["measured"] and "3/3 seeds" in row["measured"]
    assert row["holds"] is False                                     # judged after the final fine-tune: +0.000
    plain = [_claim_run(tmp_path, "carton-dugong", s, 0.8, 0.6) for s in range(2)]
    assert "before the final" not in claim_ood(plain)["measured"]


def test_methods_table_judges_the_beyond_paper_target(tmp_path, capsys):
    """Every method against vanilla, paired by seed; the target (c0w1 within 0.05 of the control,
    overall >= vanilla - 0.01, CI above 0) is judged per method, and only where a control exists."""
    from cnp.claims import main, methods_columns, methods_table

    def run(label, seed, c0w1, overall=0.9, rates=(0.9, 0.05)):
        r = _claim_run(tmp_path, label, seed, c0w1["cnp"], c0w1["vanilla"], rates=rates)
        for m in ("cnp-keep", "cnp-rr"):
            if m in c0w1:
                e = {"pruned": 0.8, "stage": "final", "macs": 2e6,
                     "acc": {"overall": overall, "c0w0": 0.9, "c0w1": c0w1[m], "c1w0": 0.9, "c1w1": 0.9}}
                r.metrics["curves"][m] = [e]
        return r

    runs = [run("carton-dugong", s, {"cnp": 0.7, "vanilla": 0.6 + 0.02 * s, "cnp-keep": 0.93 + 0.01 * s,
                                     "cnp-rr": 0.8 + 0.01 * s}, overall=0.9) for s in range(4)]
    runs += [run("carton-dugong/rr_lambda-10", s, {"cnp": 0.1, "vanilla": 0.1}) for s in range(4)]   # another group
    ctl = [run("carton-dugong/wm_rate_pos-0.475_wm_rate_neg-0.475", s, {"cnp": 0.95, "vanilla": 0.96},
               rates=(0.475, 0.475)) for s in range(4)]
    rows = {r["method"]: r for r in methods_table(runs + ctl)}
    assert list(rows) == ["vanilla", "cnp", "cnp-keep", "cnp-rr"]
    assert rows["vanilla"]["c0w1 - vanilla"] == "(reference)" and rows["vanilla"]["seeds"] == 4
    assert rows["cnp-keep"]["target"] == "met (control c0w1 0.960)"        # 0.945 >= 0.91, CI above 0
    assert rows["cnp-rr"]["target"].startswith("not met")                   # 0.815 < 0.91
    assert rows["cnp-keep"]["ahead"] == "4/4" and rows["cnp-keep"]["MMACs"] == "2.00"
    assert rows["cnp-keep"]["c0w1 - vanilla"] == "+0.315"
    assert methods_table(runs)[1]["target"] == "n/a (no control)"
    assert set(rows["cnp"]) == set(methods_columns())
    assert main([str(tmp_path / "none"), "--methods"]) == 2
