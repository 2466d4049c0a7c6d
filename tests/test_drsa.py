"""Tests of cnp.drsa: golden agreement with the official DRSA code, recovery, checkpoints, inputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cnp import drsa
from cnp.io import CNPError, safe_torch_load

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden"
GOLDEN_FILE = GOLDEN_DIR / "drsa_reference_d64.npz"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These problems are tiny: one thread is as fast, and immune to a busy machine (with two
    OpenMP threads on two shared cores, MKL's small eigh calls can get 100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _auto_is_fp32(request, monkeypatch):
    """``precision="auto"`` is bf16 on a CPU with native bf16; these tests check the fp32
    algorithm against the reference, so here "auto" means fp32 (tests marked ``native_auto``
    see the machine's own rule)."""
    if "native_auto" not in request.keywords:
        monkeypatch.setattr(drsa, "bf16_native", lambda device: False)


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN_FILE.is_file():
        pytest.skip("../shared/golden not found: golden DRSA tests need the shared reference data")
    with np.load(GOLDEN_FILE) as d:
        g = {k: d[k] for k in d.files}
    for k in ("A", "C", "U0", "grad0", "U_final"):
        g[k] = torch.from_numpy(g[k])
    g["planted_group"] = torch.from_numpy(g["planted_group"])
    for k in ("K", "d_k", "epochs"):
        g[k] = int(g[k])
    return g


@pytest.fixture(scope="module")
def small():
    """A small planted problem (D = 32, K = 4) for the fast mechanical tests."""
    A, C, groups = drsa.planted_problem(N=600, D=32, n_groups=4, seed=1)
    return A, C, groups


def _orth_err(U: torch.Tensor) -> float:
    U = U.double()
    return float((U.T @ U - torch.eye(U.shape[1], dtype=torch.float64)).abs().max())


# --------------------------------------------------------------------------------------------
# golden data from the official implementation
# --------------------------------------------------------------------------------------------


def test_golden_objective_and_gradient(golden):
    A, C, U0, K = golden["A"], golden["C"], golden["U0"], golden["K"]
    assert golden["d_k"] * K == A.shape[1]
    U = U0.clone().requires_grad_(True)
    J = drsa.objective(A, C, U, K)
    J.backward()
    assert J.dtype == torch.float32
    np.testing.assert_allclose(J.item(), golden["J0"], rtol=1e-6)
    # float32 precision: entries of grad0 are up to ~0.2, rounding of the sums over N = 3000
    torch.testing.assert_close(U.grad, golden["grad0"], rtol=1e-5, atol=1e-6)
    # the analytic gradient used inside fit agrees with autograd
    ws = drsa._Workspace(torch.cat([A, C]), 1, K)
    J_a, g_a = drsa._value_and_grad(ws, U0.unsqueeze(0))
    np.testing.assert_allclose(J_a.item(), golden["J0"], rtol=1e-6)
    torch.testing.assert_close(g_a[0], golden["grad0"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw, traj_tol, u_tol",
    [
        ({"orth": "eigh"}, 1e-3, 1e-4),
        ({"orth": "newton-schulz"}, 1e-3, 1e-4),
        ({"precision": "fp32"}, 1e-3, 1e-4),  # orth="auto"
        # bf16 GEMMs: measured 7.1e-4, the margin is thin, so allow 2e-3
        ({"orth": "eigh", "precision": "bf16"}, 2e-3, 5e-2),
    ],
    ids=["eigh", "newton-schulz", "fp32", "bf16"],
)
def test_golden_trajectory(golden, kw, traj_tol, u_tol):
    A, C, U0, K, steps = golden["A"], golden["C"], golden["U0"], golden["K"], golden["epochs"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "precision='bf16'", RuntimeWarning)  # emulated bf16 here
        res = drsa.fit(A, C, K, steps, init=U0, restarts=1, progress=False, **kw)
    ref = golden["J_trajectory"]
    assert res.history.shape == (steps,)
    rel = np.abs(res.history.numpy() - ref) / np.abs(ref)
    # measured max relative deviation over the 300 steps: 4.2e-7 (eigh), 4.4e-7
    # (Newton-Schulz), 6.9e-4 (bf16 path, on a CPU with AMX; 7.1e-4 with its float64 eigh)
    assert rel.max() < traj_tol, f"trajectory deviates by {rel.max():.2e} at step {rel.argmax()}"
    # measured: |J - J_final| / J_final = 1.1e-7 (2.1e-5 with bf16);
    # max |U - U_final| = 1.3e-6 (eigh), 3.8e-6 (Newton-Schulz), 8.4e-3 (bf16);
    # max |U^T U - I| = 3e-8 (fp32), 1.2e-6 (bf16: its eigh is in float32)
    np.testing.assert_allclose(res.J, golden["J_final"], rtol=1e-4)
    assert float((res.U - golden["U_final"]).abs().max()) < u_tol
    assert _orth_err(res.U) < 1e-5
    assert res.orth == kw.get("orth", "eigh")  # "auto" is eigh on the CPU


@pytest.mark.native_auto
def test_golden_trajectory_at_the_defaults(golden):
    """The defaults as this machine resolves them (precision="auto": bf16 GEMMs on a CPU with
    native bf16, else fp32) follow the reference within the tolerance of what they resolve to."""
    from cnp.runtime import bf16_native

    A, C, U0, K, steps = golden["A"], golden["C"], golden["U0"], golden["K"], golden["epochs"]
    res = drsa.fit(A, C, K, steps, init=U0, restarts=1, progress=False)
    low = bf16_native("cpu")
    assert res.info["precision"] == ("bf16" if low else "fp32")
    rel = np.abs(res.history.numpy() - golden["J_trajectory"]) / np.abs(golden["J_trajectory"])
    assert rel.max() < (2e-3 if low else 1e-3)
    np.testing.assert_allclose(res.J, golden["J_final"], rtol=1e-4)
    assert _orth_err(res.U) < 1e-5


def test_bf16_asked_for_without_native_bf16_warns(small, monkeypatch):
    """An explicit precision="bf16" where bf16 is emulated warns (its products are tens of times
    slower than fp32 there); with native bf16, or with "auto", nothing is said."""
    A, C, _ = small
    monkeypatch.setattr(drsa, "bf16_native", lambda device: False)
    with pytest.warns(RuntimeWarning, match=r"no native bf16.*emulated"):
        res = drsa.fit(A, C, 4, 2, restarts=1, progress=False, precision="bf16")
    assert res.info["precision"] == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert drsa.fit(A, C, 4, 2, restarts=1, progress=False).info["precision"] == "fp32"
        monkeypatch.setattr(drsa, "bf16_native", lambda device: True)
        drsa.fit(A, C, 4, 2, restarts=1, progress=False, precision="bf16")


def test_auto_orth_picks_eigh_on_cpu_and_newton_schulz_elsewhere(small):
    assert drsa._resolve_orth("auto", torch.device("cpu")) == "eigh"
    assert drsa._resolve_orth("auto", torch.device("cuda")) == "newton-schulz"
    assert drsa._resolve_orth("newton-schulz", torch.device("cpu")) == "newton-schulz"
    A, C, _ = small
    res = drsa.fit(A, C, 4, 3, restarts=1, progress=False)
    assert res.orth == "eigh" and res.info["orth_requested"] == "auto"


def test_golden_planted_subspace_recovery(golden):
    """After fitting, each planted group's relevance sits in its own subspace.

    Measured on the golden data (mean concept relevance per group, positive part):
    random start U0: argmax [3, 2, 3, 2] (not a permutation), concentration 0.29-0.31,
    per-sample argmax agreement 0.45; after 300 steps (3 restarts, seed 0): a permutation,
    concentration 0.78-0.84 per group, per-sample agreement 0.999.
    """
    A, C, K, groups = golden["A"], golden["C"], golden["K"], golden["planted_group"]

    def analyse(U):
        R = drsa.concept_relevance(A, C, U, K)
        M = torch.stack([R[groups == g].mean(0) for g in range(K)])  # (group, subspace)
        pos = M.clamp_min(0)
        conc = (pos.max(1).values / pos.sum(1)).min().item()
        assign = M.argmax(1)
        agree = (R.argmax(1) == assign[groups]).float().mean().item()
        return assign, conc, agree

    assign0, conc0, _ = analyse(golden["U0"])
    assert conc0 < 0.4  # a random basis spreads every group over all subspaces

    res = drsa.fit(A, C, K, 300, restarts=3, seed=0, progress=False)
    assign, conc, agree = analyse(res.U)
    assert sorted(assign.tolist()) == list(range(K)), f"groups share a subspace: {assign}"
    assert conc > 0.7, f"weak concentration {conc:.3f}"
    assert agree > 0.97, f"per-sample agreement {agree:.3f}"
    assert res.J > golden["J0"] * 1.5


# --------------------------------------------------------------------------------------------
# optimiser mechanics
# --------------------------------------------------------------------------------------------


def test_analytic_gradient_matches_autograd_batched():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(200, 12, generator=g, dtype=torch.float64)
    C = torch.randn(200, 12, generator=g, dtype=torch.float64)
    U = drsa.random_orthogonal(12, 3, seed=5)
    ws = drsa._Workspace(torch.cat([A, C]), 3, 3)
    J, grad = drsa._value_and_grad(ws, U)
    for r in range(3):
        Ur = U[r].clone().requires_grad_(True)
        Jr = drsa.objective(A, C, Ur, 3)
        (gr,) = torch.autograd.grad(Jr, Ur)
        torch.testing.assert_close(J[r], Jr.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(grad[r], gr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(drsa._value(ws, U), J, rtol=1e-12, atol=0)


def test_result_is_orthonormal_and_blocks(small):
    A, C, _ = small
    for orth in ("newton-schulz", "eigh"):
        res = drsa.fit(A, C, 4, 40, restarts=2, orth=orth, progress=False)
        assert res.U.shape == (32, 32)
        assert _orth_err(res.U) < 1e-5
        assert res.orth_error < 1e-5
        blocks = res.blocks()
        assert len(blocks) == 4 and all(b.shape == (32, 8) for b in blocks)
        torch.testing.assert_close(torch.cat(blocks, 1), res.U)
        assert (res.K, res.d_k) == (4, 8)


def test_restarts_keep_the_best_and_match_single_runs(small):
    A, C, _ = small
    steps = 30
    res = drsa.fit(A, C, 4, steps, restarts=3, seed=2, progress=False)
    assert res.restart_J.shape == (3,) and res.restart_history.shape == (3, steps)
    assert res.J == float(res.restart_J.max())
    assert res.restart == int(res.restart_J.argmax())
    assert torch.equal(res.history, res.restart_history[res.restart])
    assert len(set(res.restart_J.tolist())) == 3  # three different starts
    # batching is only an implementation detail: each restart equals a single run from its start
    starts = drsa.random_orthogonal(32, 3, seed=2)
    for r in range(3):
        single = drsa.fit(A, C, 4, steps, init=starts[r].float(), restarts=1, progress=False)
        np.testing.assert_allclose(single.J, res.restart_J[r].item(), rtol=1e-5)
        np.testing.assert_allclose(single.history, res.restart_history[r], rtol=1e-5)
    # a poor init (block 0 spans the most negative PRCA directions) is not kept
    V = drsa.prca(A, C)
    poor = torch.cat([V[:, -8:], V[:, :-8]], 1)
    res_poor = drsa.fit(A, C, 4, 5, init=poor, restarts=3, seed=2, progress=False)
    assert res_poor.restart != 0 and res_poor.J == float(res_poor.restart_J.max())
    assert res_poor.restart_J[0] < res_poor.restart_J[1:].min()
    # with init given, restart 0 is init and the random ones are unchanged
    res_init = drsa.fit(A, C, 4, 0, init=starts[1].float(), restarts=3, seed=2, progress=False)
    np.testing.assert_allclose(res_init.restart_J[0], res.restart_history[1, 0], rtol=1e-6)
    np.testing.assert_allclose(res_init.restart_J[1:], res.restart_history[1:, 0], rtol=1e-6)


def test_determinism_per_seed(small):
    A, C, _ = small
    a = drsa.fit(A, C, 4, 25, restarts=2, seed=7, progress=False)
    b = drsa.fit(A, C, 4, 25, restarts=2, seed=7, progress=False)
    c = drsa.fit(A, C, 4, 25, restarts=2, seed=8, progress=False)
    assert torch.equal(a.U, b.U) and torch.equal(a.restart_history, b.restart_history)
    assert not torch.equal(a.U, c.U)
    assert torch.equal(drsa.random_orthogonal(16, 2, 4), drsa.random_orthogonal(16, 2, 4))


def test_zero_steps_and_float64(small):
    A, C, _ = small
    U0 = drsa.random_orthogonal(32, 1, seed=0)[0]
    res = drsa.fit(A.double(), C.double(), 4, 0, init=U0, restarts=1, progress=False)
    assert res.history.shape == (0,) and res.U.dtype == torch.float64
    np.testing.assert_allclose(res.J, drsa.objective(A.double(), C.double(), U0, 4).item())
    res = drsa.fit(A.double(), C.double(), 4, 10, init=U0, restarts=1, progress=True)
    assert res.J > res.history[0] and _orth_err(res.U) < 1e-12


def test_newton_schulz_watchdog_falls_back_to_eigh(small):
    A, C, _ = small
    with pytest.warns(RuntimeWarning, match="lost orthonormality"):
        res = drsa.fit(A, C, 4, 10, restarts=1, orth="newton-schulz", ns_iters=1, sync_every=5,
                       progress=False)
    assert res.orth == "eigh" and res.info["fallback_step"] == 5
    assert _orth_err(res.U) < 1e-5


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


def _interrupt_after(monkeypatch, n_steps: int) -> None:
    real = drsa._drsa_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        if calls["n"] == n_steps:
            raise _Interrupted
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(drsa, "_drsa_step", step)


@pytest.mark.parametrize("orth", ["newton-schulz", "eigh"])
def test_resume_from_checkpoint_is_bit_identical(small, tmp_path, monkeypatch, orth):
    A, C, _ = small
    kw = {"K": 4, "steps": 50, "restarts": 2, "seed": 3, "orth": orth, "progress": False,
          "checkpoint_every": 20}
    full = drsa.fit(A, C, **kw)

    ckpt = tmp_path / "drsa.pt"
    sentinel = tmp_path / "keep.txt"
    sentinel.write_text("untouched")
    with monkeypatch.context() as m:
        _interrupt_after(m, 33)  # dies in step 34, after the checkpoint at step 20
        with pytest.raises(_Interrupted):
            drsa.fit(A, C, checkpoint=ckpt, **kw)
    assert safe_torch_load(ckpt)["step"] == 20

    resumed = drsa.fit(A, C, checkpoint=ckpt, **kw)
    assert resumed.resumed_from == 20
    assert torch.equal(resumed.U, full.U)
    assert torch.equal(resumed.restart_history, full.restart_history)
    assert torch.equal(resumed.restart_J, full.restart_J) and resumed.J == full.J
    assert safe_torch_load(ckpt)["step"] == 50
    # a finished checkpoint is reused as is
    again = drsa.fit(A, C, checkpoint=ckpt, **kw)
    assert again.resumed_from == 50 and torch.equal(again.U, full.U)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drsa.pt", "keep.txt"]
    assert sentinel.read_text() == "untouched"


def test_checkpoint_for_other_arguments_is_ignored(small, tmp_path):
    A, C, _ = small
    ckpt = tmp_path / "drsa.pt"
    drsa.fit(A, C, 4, 20, restarts=1, seed=0, progress=False, checkpoint=ckpt, checkpoint_every=10)
    fresh = drsa.fit(A, C, 4, 20, restarts=1, seed=1, progress=False)
    with pytest.warns(RuntimeWarning, match="different arguments.*seed"):
        res = drsa.fit(A, C, 4, 20, restarts=1, seed=1, progress=False, checkpoint=ckpt,
                       checkpoint_every=10)
    assert res.resumed_from == 0 and torch.equal(res.U, fresh.U)
    with pytest.warns(RuntimeWarning, match="different arguments.*data_hash"):
        res = drsa.fit(A * 2, C, 4, 20, restarts=1, seed=1, progress=False, checkpoint=ckpt)
    assert res.resumed_from == 0


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_detected_and_rebuilt(small, tmp_path, damage):
    A, C, _ = small
    ckpt = tmp_path / "drsa.pt"
    kw = {"K": 4, "steps": 20, "restarts": 1, "seed": 0, "progress": False,
          "checkpoint_every": 10}
    ref = drsa.fit(A, C, checkpoint=ckpt, **kw)
    blob = ckpt.read_bytes()
    ckpt.write_bytes(
        {"truncate": blob[: len(blob) // 2], "garbage": b"\x00not a checkpoint" * 10,
         "empty": b""}[damage]
    )
    with pytest.raises(CNPError):
        safe_torch_load(ckpt)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        res = drsa.fit(A, C, checkpoint=ckpt, **kw)
    assert res.resumed_from == 0 and torch.equal(res.U, ref.U)
    assert safe_torch_load(ckpt)["step"] == 20  # rebuilt


# --------------------------------------------------------------------------------------------
# data preparation, baselines, relevance
# --------------------------------------------------------------------------------------------


def test_sample_positions():
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(3, 5, 6, 7, generator=g)
    ctxs = 2 * acts + 1  # any position-wise relation shows that a and c rows match
    A, C = drsa.sample_positions(acts, ctxs, n_positions=20, generator=torch.Generator().manual_seed(1))
    assert A.shape == C.shape == (60, 5)
    torch.testing.assert_close(C, 2 * A + 1)
    A2, _ = drsa.sample_positions(acts, ctxs, 20, generator=torch.Generator().manual_seed(1))
    A3, _ = drsa.sample_positions(acts, ctxs, 20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(A, A2) and not torch.equal(A, A3)
    for b in range(3):
        pos = acts[b].reshape(5, -1).T  # (H*W, D)
        rows = A[b * 20 : (b + 1) * 20]
        match = (rows[:, None, :] == pos[None]).all(-1)  # (20, H*W)
        assert bool((match.sum(1) == 1).all())  # every row is a position of image b
        assert len(set(match.float().argmax(1).tolist())) == 20  # without replacement
    # fewer positions than requested: all of them, in order
    A4, C4 = drsa.sample_positions(acts[:, :, :2, :3], ctxs[:, :, :2, :3], n_positions=20)
    assert A4.shape == (18, 5)
    torch.testing.assert_close(A4[:6], acts[0, :, :2, :3].reshape(5, 6).T)
    with pytest.raises(CNPError, match="same shape"):
        drsa.sample_positions(acts, ctxs[:, :4])
    with pytest.raises(CNPError, match=r"\(B, D, H, W\)"):
        drsa.sample_positions(acts[0], ctxs[0])


def test_normalize_rms():
    g = torch.Generator().manual_seed(0)
    A = 7 * torch.rand(500, 16, generator=g)
    C = 0.01 * torch.randn(500, 16, generator=g)
    An, Cn = drsa.normalize(A, C)
    for t in (An, Cn):
        rms = t.square().mean().sqrt().item()
        np.testing.assert_allclose(rms * 16**0.25, 1.0, rtol=1e-6)
        np.testing.assert_allclose(t.square().sum(1).mean().item(), 16**0.5, rtol=1e-5)
    A5, _ = drsa.normalize(5 * A, C)
    torch.testing.assert_close(A5, An)
    with pytest.raises(CNPError, match="all zeros"):
        drsa.normalize(torch.zeros(4, 4), torch.ones(4, 4))


def test_prca_orthonormal_sorted(small):
    A, C, _ = small
    V = drsa.prca(A, C)
    assert V.shape == (32, 32) and _orth_err(V) < 1e-5
    S = (A.double().T @ C.double() + C.double().T @ A.double()) / 2
    ev = torch.diagonal(V.double().T @ S @ V.double())
    assert bool((ev[:-1] >= ev[1:] - 1e-9).all())
    torch.testing.assert_close(S @ V.double(), V.double() * ev, rtol=1e-4, atol=1e-4)
    V4 = drsa.prca(A, C, n_components=4)
    assert V4.shape == (32, 4)
    torch.testing.assert_close(V4, V[:, :4])
    with pytest.raises(CNPError, match="n_components"):
        drsa.prca(A, C, n_components=33)


def test_concept_relevance_conserves_relevance(small):
    A, C, _ = small
    U = drsa.random_orthogonal(32, 1, seed=9)[0].float()
    R = drsa.concept_relevance(A, C, U, 4)
    assert R.shape == (600, 4)
    torch.testing.assert_close(R.sum(1), (A * C).sum(1), rtol=1e-4, atol=1e-5)
    # the objective is built on the same quantities
    s = R.relu().square().mean(0).sqrt()
    torch.testing.assert_close(drsa.objective(A, C, U, 4), s.sqrt().mean().square())


# --------------------------------------------------------------------------------------------
# input errors
# --------------------------------------------------------------------------------------------


def test_bad_inputs(small):
    A, C, _ = small
    with pytest.raises(CNPError, match=r"K \* d_k must equal.*Valid K.*\[1, 2, 4, 8, 16, 32\]"):
        drsa.fit(A, C, 5, 10, progress=False)
    with pytest.raises(CNPError, match="K \\* d_k must equal"):
        drsa.objective(A, C, torch.eye(32), 3)
    with pytest.raises(CNPError, match="K \\* d_k must equal"):
        drsa.concept_relevance(A, C, torch.eye(32), 5)
    with pytest.raises(CNPError, match="same shape"):
        drsa.fit(A, C[:, :16], 4, 10)
    with pytest.raises(CNPError, match="same shape"):
        drsa.fit(A, C[:-1], 4, 10)
    with pytest.raises(CNPError, match="2-D"):
        drsa.fit(A[None], C[None], 4, 10)
    with pytest.raises(CNPError, match="2-D"):
        drsa.objective(A[0], C[0], torch.eye(32), 4)
    for bad in (float("nan"), float("inf")):
        A_bad = A.clone()
        A_bad[3, 5] = bad
        with pytest.raises(CNPError, match="NaN/inf"):
            drsa.fit(A_bad, C, 4, 10)
        with pytest.raises(CNPError, match="NaN/inf"):
            drsa.normalize(C, A_bad)
    with pytest.raises(CNPError, match="D x D"):
        drsa.fit(A, C, 4, 10, init=torch.eye(32)[:, :16])
    with pytest.raises(CNPError, match="not orthonormal"):
        drsa.fit(A, C, 4, 10, init=torch.eye(32) * 1.01)
    with pytest.raises(CNPError, match="not orthonormal"):
        drsa.fit(A, C, 4, 10, init=torch.randn(32, 32))
    with pytest.raises(CNPError, match="steps must be >= 0"):
        drsa.fit(A, C, 4, -1)
    with pytest.raises(CNPError, match="restarts must be >= 1"):
        drsa.fit(A, C, 4, 10, restarts=0)
    with pytest.raises(CNPError, match="orth must be one of"):
        drsa.fit(A, C, 4, 10, orth="qr")
    with pytest.raises(CNPError, match="precision must be one of"):
        drsa.fit(A, C, 4, 10, precision="fp16")
    with pytest.raises(CNPError, match="positive integer"):
        drsa.fit(A, C, 0, 10)
