"""Named sweeps (presets) and the constants every part of the sweep shares."""

from __future__ import annotations

from typing import Any

from cnp.params import BENCHMARK_DEFAULTS
from cnp.resources import checkout_root, notebook_dir

#: Repository root when running from a checkout, ``None`` for an installed package
#: (:func:`cnp.resources.checkout_root`).
REPO_ROOT = checkout_root()
#: Folder of the notebooks 01-06: the checkout's ``notebooks/``, else the installed copies
#: (:func:`cnp.resources.notebook_dir`; ``cnp-notebooks DIR`` copies them into DIR).
NOTEBOOK_DIR = notebook_dir()
RUN_NOTEBOOKS = ("01_warmup.ipynb", "02_augment.ipynb", "03_ablate.ipynb", "04_prune.ipynb", "05_evaluate.ipynb")
FIGURES_NOTEBOOK = "06_figures.ipynb"
KERNEL = "cnp"
#: Parameters that do not change results (left out of the resume check).
RESULT_INDEPENDENT = ("run_dir", "device", "threads")

#: The paper's Table 1 search space (Appendix A) and its selected values.
TABLE1_GRID: dict[str, list] = {
    "K": [4, 8, 16],
    "lrp_variant": ["epsilon", "alpha1beta0", "gamma"],
    "epochs_per_step": [0, 2, 5, 10],
    "ranking_data": ["pos", "pos+neg"],
    "step": [0.05, 0.1],
}
TABLE1_SELECTED: dict[str, Any] = {"K": 4, "lrp_variant": "alpha1beta0", "epochs_per_step": 2,
                                   "ranking_data": "pos", "step": 0.05}

# ---------------------------------------------------------------------------------------------
#: `make reproduce`: the embedded benchmark's easy pair (5 seeds), hard pair and the basketball
#: demo (1 seed each), CNP and vanilla LRP pruning, within about 15 minutes on 2 CPU cores. The
#: full-fidelity settings (the Params defaults: the paper's Appendix A) reduced to 10 % steps,
#: 200 ranking images, 100 validation and 300 test images per subgroup, DRSA 300 steps x 2
#: restarts on 300 images; with the embedded benchmark's K = 8 and the rate counted over the
#: prunable filters. docs/results.md ("Choices made on validation") says why each value.
REPRODUCE_SEEDS: list[int] = [0, 1, 2, 3, 4]
REPRODUCE_PARAMS: dict[str, Any] = {
    **BENCHMARK_DEFAULTS, "step": 0.1, "n_drsa": 300, "n_rank": 200, "n_val_per_subgroup": 100, "n_test_per_subgroup": 300,
    "drsa_steps": 300, "drsa_restarts": 2, "wm_share_images": 200, "heatmap_images": 4,
}
#: per-pair values on top of REPRODUCE_PARAMS: the Figure 1 demo ablates the subspace whose
#: heatmaps put the most relevance on the ball (a stand-in for the paper's human evaluation); the
#: hard pair fine-tunes 5 epochs per step and 5 in the final recovery (Table 1's value 5).
REPRODUCE_PAIR_PARAMS: dict[str, dict[str, Any]] = {"basketball": {"ablate": "mask:ball"},
                                                    "crate-packet": {"epochs_per_step": 5, "final_epochs": 5}}
#: per-pair seeds replacing REPRODUCE_SEEDS
REPRODUCE_PAIR_SEEDS: dict[str, list[int]] = {"crate-packet": [0], "basketball": [0]}

#: `python -m cnp.sweep --preset full`: the full-fidelity settings (Params defaults), 5 seeds,
#: with the l1 and random baselines, and the embedded benchmark's K = 8 (see REPRODUCE_PARAMS).
FULL_SEEDS: list[int] = [0, 1, 2, 3, 4]
FULL_PARAMS: dict[str, Any] = {"methods": "cnp,vanilla,l1,random", **BENCHMARK_DEFAULTS}

#: `python -m cnp.sweep --preset styles`: claim 6 - held-out watermark styles and both ablation
#: modes on the easy pair (one grid axis at a time around the defaults).
STYLES_GRID: dict[str, list] = {
    "wm_text": ["(c) photo", "SAMPLE"], "wm_placement": ["tiled"], "wm_opacity": [0.35],
    "ablation_mode": ["mean"],
}
STYLES_SELECTED: dict[str, Any] = {"wm_text": "stock", "wm_placement": "random", "wm_opacity": 0.55,
                                   "ablation_mode": "zero"}

#: `python -m cnp.sweep --preset control --out runs/reproduce`: the no-shortcut control of the
#: easy pair - the reproduce settings with the watermark on 47.5 % of the training images of
#: *both* classes (the biased set's overall rate, (0.9 + 0.05) / 2), so the warmed-up model has no
#: reason to use it. Not a claim: the c0w1 accuracy and watermark share of relevance that a model
#: without the shortcut reaches after the same pruning, the reference for claims 3 and 4
#: (``cnp.claims`` reports it in its own row). A grid of one point, so the runs get their own
#: label beside the reproduce runs: DIR/carton-dugong/wm_rate_pos-0.475_wm_rate_neg-0.475/seed<k>.
CONTROL_GRID: dict[str, list] = {"wm_rate_pos": [0.475], "wm_rate_neg": [0.475]}

#: `python -m cnp.sweep --preset evidence --out runs/evidence`: the claims as statistical tests.
#: Parts, each into its own sub-directory of --out (claims and figures per part):
#:   reproduce/  easy pair seeds 0-9 and hard pair seeds 0-4 at the `reproduce` settings, plus the
#:               no-shortcut control (5 seeds) - claims 1-5;
#:   variants/   Yeom et al.'s ranking rule and a frozen conv4_3, easy pair seeds 0-4;
#:   full/       easy pair seeds 0-4 at full fidelity (the paper's Appendix A sizes, 5 % steps);
#:   styles/     held-out watermark styles and the mean ablation, 5 seeds each - claim 6.
EVIDENCE_SEEDS: list[int] = list(range(10))
#: variants/: Yeom et al.'s ranking rule (|R| summed, v / sum(v)) and conv4_3's weights frozen
#: while fine-tuning, one at a time around the defaults, on easy-pair seeds 0-4
VARIANTS_GRID: dict[str, list] = {"aggregation": ["abs"], "freeze_drsa_layer": [True]}
VARIANTS_SELECTED: dict[str, Any] = {"aggregation": "signed", "freeze_drsa_layer": False}
EVIDENCE_PARTS: list[tuple[str, dict[str, Any]]] = [
    ("reproduce", {"pairs": ["carton-dugong"], "seeds": EVIDENCE_SEEDS, "params": dict(REPRODUCE_PARAMS)}),
    ("reproduce", {"pairs": ["carton-dugong"], "seeds": REPRODUCE_SEEDS, "params": dict(REPRODUCE_PARAMS),
                   "grid": CONTROL_GRID}),
    ("variants", {"pairs": ["carton-dugong"], "seeds": REPRODUCE_SEEDS, "params": dict(REPRODUCE_PARAMS),
                  "grid": VARIANTS_GRID, "grid_mode": "variations", "selected": VARIANTS_SELECTED}),
    ("reproduce", {"pairs": ["crate-packet"], "seeds": [0, 1, 2, 3, 4], "params": dict(REPRODUCE_PARAMS),
                   "pair_params": REPRODUCE_PAIR_PARAMS}),
    ("full", {"pairs": ["carton-dugong"], "seeds": FULL_SEEDS, "params": {**FULL_PARAMS, "methods": "cnp,vanilla"}}),
    ("styles", {"pairs": ["carton-dugong"], "seeds": [0, 1, 2, 3, 4], "params": dict(REPRODUCE_PARAMS),
                "grid": STYLES_GRID, "grid_mode": "variations", "selected": STYLES_SELECTED}),
]

PRESETS: dict[str, dict[str, Any]] = {
    "reproduce": {
        "doc": "make reproduce: easy pair, hard pair and the basketball demo on the embedded benchmark",
        "time": "about 15 min on 2 cores",
        "pairs": ["carton-dugong", "crate-packet", "basketball"],
        "seeds": REPRODUCE_SEEDS,
        "params": REPRODUCE_PARAMS,
        "pair_params": REPRODUCE_PAIR_PARAMS,
        "pair_seeds": REPRODUCE_PAIR_SEEDS,
        "grid": {},
    },
    "full": {
        "doc": "the full-fidelity settings (the paper's Appendix A sizes), 5 seeds, with the l1 and random baselines",
        "time": "about 2 h on 2 cores",
        "pairs": ["carton-dugong", "crate-packet"], "seeds": FULL_SEEDS, "params": FULL_PARAMS, "grid": {},
    },
    "styles": {
        "doc": "claim 6: held-out watermark styles and mean ablation on the easy pair (one axis at a time)",
        "time": "about 1.5 h on 2 cores",
        "pairs": ["carton-dugong"], "seeds": [0, 1, 2, 3, 4], "params": dict(REPRODUCE_PARAMS),
        "grid": STYLES_GRID, "grid_mode": "variations", "selected": STYLES_SELECTED,
    },
    "control": {
        "doc": "no-shortcut control of the easy pair (watermark equally frequent in both classes), 5 seeds: "
               "the reference for claims 3 and 4; run it into the reproduce sweep directory",
        "time": "about 20 min on 2 cores",
        "pairs": ["carton-dugong"], "seeds": REPRODUCE_SEEDS, "params": dict(REPRODUCE_PARAMS),
        "grid": CONTROL_GRID, "grid_mode": "product",
    },
    "evidence": {
        "doc": "the claims as statistical tests: easy pair 10 seeds + hard pair 5 + control 5 (reproduce/), "
               "Yeom's ranking rule and a frozen conv4_3 5 seeds each (variants/), 5 seeds at full fidelity "
               "(full/), held-out styles 5 seeds each (styles/)",
        "time": "about 4 h on 2 cores",
        "parts": EVIDENCE_PARTS,
    },
    "smoke": {
        "doc": "one tiny run (smoke=True) to check the machinery",
        "time": "about 1 min",
        "pairs": ["carton-dugong"], "seeds": [0], "params": {"smoke": True}, "grid": {},
    },
    "table1": {
        "doc": "the paper's Table 1 hyper-parameter grid (full product, 144 configurations per pair and seed)",
        "time": "days on 2 cores (288 full-fidelity runs); meant for a cluster",
        "pairs": ["carton-dugong", "crate-packet"], "seeds": [0], "params": {}, "grid": TABLE1_GRID,
        "grid_mode": "product",
    },
    "table1-oat": {
        "doc": "Table 1's values one at a time around the selected ones (10 configurations per pair and seed)",
        "time": "about 4 h on 2 cores",
        "pairs": ["carton-dugong", "crate-packet"], "seeds": [0], "params": {}, "grid": TABLE1_GRID,
        "grid_mode": "one-at-a-time", "selected": TABLE1_SELECTED,
    },
}

#: Short names of grid axes in variant directory names.
SHORT_NAMES = {"lrp_variant": "lrp", "epochs_per_step": "ep", "ranking_data": "rank"}

