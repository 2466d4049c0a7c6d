"""The paper's mechanism on a reduced easy pair (carton-dugong), on the real embedded backbone.

A regression test: a change that breaks the shortcut, DRSA's isolation of the watermark, the
ablation or the ranking through the virtual layer fails CI. It runs the whole pipeline with the
embedded benchmark's settings (K = 8, the rate over the prunable filters, the paper's ranking
rule) at reduced sizes on seed 0 (the seed this test has always used, not picked to pass).

What it asserts, and why these margins (measured, not tuned to pass; docs/results.md):

* claim 1 (the warmed-up model has the watermark shortcut): c0w0 - c0w1 >= 0.20. Measured with
  these settings: 0.287 (seed 0), 0.340 (seed 1).
* claim 2 (latent analysis finds it): the best subspace's watermark AP >= 0.85 and the ablated
  subspace is that one. Measured: 1.000 (seed 0), 0.985 (seed 1); a random basis gives 0.40-0.62.
* stage 2 works on the unpruned network: with the ablated virtual layer active, c0w1 rises
  (paired one-sided t-test over seeds 0-4, p < 0.05) while the watermark-free positives c1w0
  lose at most 0.05 on every seed. A single-seed margin does not carry across CPUs: the
  backbone pretrains differently on another instruction set (same recipe, 2 threads: held-out
  object accuracy 0.987 on an AMD EPYC with AVX512-BF16, 0.974 on an Intel Xeon with AMX), and
  seed 0's rise went from 0.700 -> 0.860 to 0.393 -> 0.473; on the Xeon seeds 0-4 rose by
  +0.08, +0.16, +0.05, +0.13, +0.14 (mean 0.11, p = 0.003). Seeds 1-4 run up to the ablate
  stage only.
* stage 3 ranks through the ablated layer: CNP removes other filters than vanilla LRP pruning
  (the pruned architectures differ; they would be identical if the virtual layer were bypassed
  while ranking), and the curves record the rate on both bases.

What it does not assert: CNP's c0w1 advantage after pruning. With the paper's ranking rule
(signed relevance, v / sum(v) per layer) one 10 % step without fine-tuning leaves both methods as
constant classifiers on this backbone (c0w1 0.0, overall 0.5 on seeds 0 and 1: v / sum(v) prunes
the wide last conv first), and with the paper's intermediate fine-tuning the difference between
the methods is a question for many seeds: ``cnp.claims`` tests it over 10 seeds in the
``evidence`` preset (docs/results.md).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from cnp.evaluate import subgroup_accuracy
from cnp.figures import at_target
from cnp.io import safe_torch_load
from cnp.params import BENCHMARK_DEFAULTS
from cnp.pipeline import (
    augmented_model,
    make_params,
    open_run,
    run_ablate,
    run_evaluate,
    warm_model,
)
from cnp.pruning.ranking import NORMALISATIONS
from cnp.stats import paired


@pytest.fixture
def all_threads():
    """The machine's cores for this test (``$CNP_CLAIMS_THREADS`` overrides), shared with the other
    test workers when pytest-xdist runs several: more threads than cores make every worker slower."""
    prev = torch.get_num_threads()
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    default = max(1, (os.cpu_count() or 1) // max(1, workers))
    torch.set_num_threads(max(1, int(os.environ.get("CNP_CLAIMS_THREADS", default))))
    yield
    torch.set_num_threads(prev)


STAGE2_SEEDS = (0, 1, 2, 3, 4)


def _unpruned_ablation(p):
    """Test accuracy per subgroup of the warmed-up model, and with its ablated virtual layer."""
    run = open_run(p)
    abl = run_ablate(run, verbose=False)
    test = run.data()["test"]
    before = subgroup_accuracy(warm_model(run), test, device=run.device)
    model, _vl = augmented_model(run, abl["ablated"], p.concepts.ablation_mode)
    return before, subgroup_accuracy(model, test, device=run.device)


@pytest.mark.slow
def test_mechanism_on_reduced_easy_pair(tmp_path, all_threads):
    p = make_params(
        pair="carton-dugong", seed=0, run_dir=str(tmp_path / "run"), device="cpu", **BENCHMARK_DEFAULTS,
        n_rank=150, n_val_per_subgroup=100, n_test_per_subgroup=150,
        drsa_steps=300, drsa_restarts=3, step=0.1, target=0.2, epochs_per_step=0, final_epochs=0,
        wm_share_images=50, heatmap_images=2, methods=("cnp", "vanilla"),
    )
    assert (p.pruning.aggregation, p.pruning.normalisation) == ("signed", "sum") and p.pruning.normalisation in NORMALISATIONS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # epochs_per_step=0 warns (the paper's catastrophic setting)
        m = run_evaluate(open_run(p), verbose=False)

    acc = m["unpruned"]["acc"]
    assert acc["c0w0"] - acc["c0w1"] >= 0.20, acc                       # claim 1
    ap = m["drsa"]["ap_watermark"]
    assert max(ap) >= 0.85, ap                                           # claim 2
    assert m["drsa"]["ablated"] == [int(torch.tensor(ap).argmax())]

    # stage 2: the ablated virtual layer on the unpruned network (the schedule's step 0)
    cnp_curve = safe_torch_load(tmp_path / "run" / "prune" / "prune_cnp.pt")["curve"]
    pairs = {0: (cnp_curve[0]["acc"], cnp_curve[0]["acc_virtual_layer"])}
    for seed in STAGE2_SEEDS[1:]:
        pairs[seed] = _unpruned_ablation(p.replace(seed=seed, run_dir=str(tmp_path / f"run{seed}")))
    gains = [pairs[s][1]["c0w1"] - pairs[s][0]["c0w1"] for s in STAGE2_SEEDS]
    test = paired(gains)
    assert test.p < 0.05 and test.mean > 0, (gains, test)
    for before, ablated in pairs.values():
        assert ablated["c1w0"] >= before["c1w0"] - 0.05, (before, ablated)

    # stage 3: the rate on both bases, and the ranking through the ablated layer
    cnp = at_target(m["curves"]["cnp"])
    assert cnp["pruned"] == cnp["pruned_of_prunable"] == pytest.approx(0.2, abs=0.01)
    assert cnp["pruned_of_all"] == pytest.approx(0.2 * 928 / 1056, abs=0.01)
    arch = {meth: safe_torch_load(tmp_path / "run" / "prune" / f"prune_{meth}.pt")["arch"]["conv_widths"]
            for meth in ("cnp", "vanilla")}
    assert sum(arch["cnp"]) == sum(arch["vanilla"]) and arch["cnp"] != arch["vanilla"], arch
