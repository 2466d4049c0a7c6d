"""The paper's claims on a reduced easy pair (carton-dugong), on the real embedded backbone.

This is the regression test of the results issue: a change that kills the effect fails CI.

What it asserts, and why these margins (measured, not tuned to pass; see README "Results"):

The test runs twice: with the paper's K = 4 (the ``Params`` and notebook default) and with the
embedded benchmark's K = 8 (the ``reproduce`` preset's, chosen on validation; README "Choice of
defaults").

* claim 1 (the warmed-up model has the watermark shortcut): c0w0 - c0w1 >= 0.20. Measured with
  these settings on seeds 0-2: 0.287, 0.340, 0.340 (`make reproduce`, seeds 0-4: 0.21-0.35).
* claim 2 (latent analysis finds it): the best subspace's watermark AP reaches a floor, and the
  subspace chosen for ablation is that one. K = 8: the results issue's 0.85; measured on seeds
  0-2: 1.000, 0.984, 0.986. K = 4: 0.75, below the paper's 0.85 on purpose: on seed 0 (the seed
  this test has always used, not picked to pass) the watermark splits over two subspaces, AP
  0.790 and 0.782; on seeds 1 and 2 one subspace holds it, AP 0.963 and 0.953. A random basis
  gives 0.40-0.62 here, so the test still fails when DRSA stops finding the watermark.
* claim 3's direction at the level the reduced setting supports: the ranking. Two CNP steps of
  10 % without intermediate fine-tuning keep c0w1 accuracy at least 0.15 above two vanilla
  LRP steps, at no cost in overall accuracy. Measured on seeds 0-2, c0w1 CNP vs vanilla:
  K = 4: 0.667 / 0.400 / 0.813 vs 0.073 / 0.093 / 0.020 (overall 0.903 / 0.837 / 0.940 vs
  0.708 / 0.757 / 0.738); K = 8: 0.547 / 0.093 / 0.193 vs 0.073 / 0.093 / 0.020 (overall
  0.875 / 0.757 / 0.790 vs 0.708 / 0.757 / 0.738). NOTE: with K = 8 the immediate effect is
  weaker and absent on seed 1 (CNP removed the same filters as vanilla there), although after the
  full schedule K = 8 is the more consistent setting (README "Results"); the assertion is a
  regression check on seed 0, where the effect is large for both K, not a claim about every seed.
  With the paper's intermediate fine-tuning the difference between the methods is within the
  seed-to-seed spread of a single seed on this benchmark, so the full schedule is not asserted
  here (`cnp.claims` evaluates it over 5 seeds in `make reproduce`).

All numbers are for the backbone pretrained with 2 threads (`cnp.pretrain.PRETRAIN_THREADS`),
which every machine now builds; an earlier backbone built with 1 thread differed visibly.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from cnp.figures import at_target
from cnp.pipeline import make_params, open_run, run_evaluate


@pytest.fixture
def all_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, int(os.environ.get("CNP_CLAIMS_THREADS", os.cpu_count() or 1))))
    yield
    torch.set_num_threads(prev)


@pytest.mark.slow
@pytest.mark.parametrize("K, ap_floor", [(4, 0.75), (8, 0.85)])
def test_claims_on_reduced_easy_pair(tmp_path, all_threads, K, ap_floor):
    p = make_params(
        pair="carton-dugong", seed=0, run_dir=str(tmp_path / "run"), device="cpu", K=K,
        n_rank=150, n_val_per_subgroup=100, n_test_per_subgroup=150,
        drsa_steps=300, drsa_restarts=3, step=0.1, target=0.2, epochs_per_step=0, final_epochs=0,
        wm_share_images=50, heatmap_images=2, methods=("cnp", "vanilla"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # epochs_per_step=0 warns (the paper's catastrophic setting)
        m = run_evaluate(open_run(p), verbose=False)

    acc = m["unpruned"]["acc"]
    assert acc["c0w0"] - acc["c0w1"] >= 0.20, acc                       # claim 1
    ap = m["drsa"]["ap_watermark"]
    assert max(ap) >= ap_floor, ap                                       # claim 2 (see docstring)
    assert m["drsa"]["ablated"] == [int(torch.tensor(ap).argmax())]

    cnp, van = at_target(m["curves"]["cnp"]), at_target(m["curves"]["vanilla"])
    assert cnp["pruned"] == pytest.approx(0.2, abs=0.01)
    assert cnp["acc"]["c0w1"] - van["acc"]["c0w1"] >= 0.15, (cnp["acc"], van["acc"])  # claim 3 (ranking)
    assert cnp["acc"]["overall"] >= van["acc"]["overall"] - 0.01, (cnp["acc"], van["acc"])
