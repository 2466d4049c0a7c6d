"""Disentangled Relevant Subspace Analysis (DRSA), stage 1 of the paper's pipeline.

DRSA (Chormai et al., TPAMI 2024) learns an orthogonal matrix ``U = (U_1 | ... | U_K)`` of size
``D x D`` whose ``K`` column blocks of width ``d_k = D / K`` split the relevance ``a * c`` of a
layer (activations ``a``, LRP contexts ``c``) into subspaces that are each highly relevant for
their prototypical samples and comparably relevant to one another. With ``A_K = (A U)`` and
``C_K = (C U)`` viewed as ``(N, K, d_k)``::

    R_nk = relu(sum_j A_K[n, k, j] * C_K[n, k, j])     # relevance of sample n in subspace k
    s_k  = (mean_n R_nk^2)^(1/2)                        # soft-max over samples (p = 2)
    J    = (mean_k s_k^(1/2))^2                         # soft-min over subspaces (q = 1/2)

and the optimiser is full-batch gradient ascent with step size 1 followed by a projection back
onto the orthogonal matrices: ``U <- orth(U + dJ/dU)`` with ``orth(M) = M (M^T M)^(-1/2)``.

Public functions
----------------
:func:`objective`
    The objective J (differentiable, autograd), the exact definition above.
:func:`fit`
    The optimiser: restarts batched into one ``(R, D, D)`` tensor (one GEMM for all of them),
    an analytic gradient, the polar factor by a Newton-Schulz iteration (accelerators) or a
    float64 eigendecomposition (CPU, and the reference), optional bfloat16 GEMMs, no host
    synchronisation inside the step loop except every ``sync_every`` steps, and resumable
    checkpoints.
:func:`normalize`, :func:`sample_positions`
    Data preparation as in the DRSA paper (rms scaling, random spatial positions).
:func:`prca`
    The PRCA baseline (principal relevant component analysis).
:func:`concept_relevance`
    Per-sample relevance of each subspace, ``R(k) = sum_{j in block k} h_j (U^T c)_j``.
:func:`random_orthogonal`, :func:`planted_problem`
    Deterministic random initialisations and a synthetic problem with planted subspaces.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnp.io import CNPError, atomic_torch_save, load_current, tensor_hash
from cnp.runtime import bf16_native, resolve_device
from cnp.runtime import progress as _progress_bar

__all__ = [
    "DRSAResult",
    "concept_relevance",
    "fit",
    "fix_signs",
    "normalize",
    "objective",
    "planted_problem",
    "prca",
    "random_orthogonal",
    "sample_positions",
]

ORTH_METHODS = ("eigh", "newton-schulz")
PRECISIONS = ("auto", "fp32", "bf16")

#: Version of the ``precision="bf16"`` path's arithmetic. 2: the per-step orthogonalisation's
#: eigendecomposition in float32 (it was float64) and the gradient GEMM on a contiguous copy of
#: the transposed bf16 data. Checkpoints and the pipeline's stage keys made with bf16 carry it, so
#: that results of an earlier bf16 arithmetic are recomputed instead of reused.
BF16_ARITHMETIC = 2
CHECKPOINT_FORMAT = "cnp.drsa.fit/1"


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as exc:  # noqa: BLE001 - anything that is not array-like
        raise CNPError(
            f"{name} must be a torch tensor or an array, got {type(x).__name__}"
        ) from exc


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _valid_k(D: int) -> list[int]:
    return [k for k in range(1, D + 1) if D % k == 0]


def _check_k(D: int, K: Any, what: str = "D") -> int:
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or int(K) < 1:
        raise CNPError(f"K (the number of subspaces) must be a positive integer, got {K!r}")
    K = int(K)
    if D % K != 0:
        valid = _valid_k(D)
        raise CNPError(
            f"{what} = {D} is not divisible by K = {K}: K * d_k must equal {what} "
            f"(all subspaces have the same size d_k). Valid K for {what} = {D}: {valid}."
        )
    return K


def _check_pair(A: Any, C: Any, finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    A = _as_tensor(A, "A")
    C = _as_tensor(C, "C")
    for name, t in (("A", A), ("C", C)):
        if t.dim() != 2:
            raise CNPError(
                f"{name} must be a 2-D (N, D) matrix (one row per sample), got shape "
                f"{tuple(t.shape)}. Flatten conv maps first, e.g. with sample_positions()."
            )
        if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise CNPError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if A.shape != C.shape:
        raise CNPError(
            f"A and C must have the same shape (activations and contexts of the same samples), "
            f"got A {tuple(A.shape)} and C {tuple(C.shape)}."
        )
    if A.shape[0] < 1 or A.shape[1] < 1:
        raise CNPError(f"A and C are empty (shape {tuple(A.shape)}); DRSA needs N >= 1 and D >= 1")
    if A.device != C.device:
        raise CNPError(f"A is on {A.device} but C is on {C.device}; move both to one device")
    if finite:
        for name, t in (("A", A), ("C", C)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise CNPError(
                    f"{name} contains {bad} NaN/inf entries. Drop or repair those samples "
                    "(e.g. A[torch.isfinite(A).all(1) & torch.isfinite(C).all(1)]) before DRSA."
                )
    return A, C


def _check_basis(U: Any, D: int, K: int, name: str = "U") -> torch.Tensor:
    U = _as_tensor(U, name)
    if U.dim() != 2 or U.shape[0] != D or U.shape[1] < 1:
        raise CNPError(
            f"{name} must be a (D, K * d_k) matrix with D = {D} rows, got {tuple(U.shape)}"
        )
    _check_k(U.shape[1], K, f"the number of columns of {name}")
    return U


# --------------------------------------------------------------------------------------------
# objective, relevance, baselines, data preparation
# --------------------------------------------------------------------------------------------


def objective(A: torch.Tensor, C: torch.Tensor, U: torch.Tensor, K: int) -> torch.Tensor:
    """The DRSA objective ``J(U)``, differentiable with respect to ``U``.

    Parameters
    ----------
    A, C : torch.Tensor
        ``(N, D)`` activations and contexts (normally after :func:`normalize`).
    U : torch.Tensor
        ``(D, K * d_k)`` basis; block ``k`` is columns ``k*d_k:(k+1)*d_k``.
    K : int
        Number of subspaces.

    Returns
    -------
    torch.Tensor
        Scalar ``J = (mean_k s_k^(1/2))^2`` with ``s_k = (mean_n relu(R_nk)^2)^(1/2)`` and
        ``R_nk = sum_{j in block k} (A U)_nj (C U)_nj``.

    Raises
    ------
    CNPError
        On shape mismatches or when the number of columns of ``U`` is not divisible by ``K``.
    """
    A, C = _check_pair(A, C, finite=False)
    U = _check_basis(U, A.shape[1], K)
    d_k = U.shape[1] // K
    K = int(K)
    A_K = (A @ U).view(-1, K, d_k)
    C_K = (C @ U).view(-1, K, d_k)
    R = torch.relu((A_K * C_K).sum(dim=2))
    s = R.square().mean(dim=0).sqrt()
    return s.sqrt().mean().square()


def concept_relevance(A: torch.Tensor, C: torch.Tensor, U: torch.Tensor, K: int) -> torch.Tensor:
    """Per-sample relevance of each subspace (no relu).

    ``R_nk = sum_{j in block k} h_nj g_nj`` with ``h = U^T a`` and ``g = U^T c``. When ``U`` is
    ``D x D`` orthogonal, ``sum_k R_nk = sum_i a_ni c_ni`` (relevance is conserved).

    Parameters
    ----------
    A, C : torch.Tensor
        ``(N, D)`` activations and contexts.
    U : torch.Tensor
        ``(D, K * d_k)`` basis.
    K : int
        Number of subspaces.

    Returns
    -------
    torch.Tensor
        ``(N, K)`` relevances.
    """
    A, C = _check_pair(A, C, finite=False)
    U = _check_basis(U, A.shape[1], K)
    K = int(K)
    dt = torch.promote_types(_work_dtype(A), U.dtype) if U.is_floating_point() else _work_dtype(A)
    U = U.to(device=A.device, dtype=dt)
    H = A.to(dt) @ U
    G = C.to(dt) @ U
    return (H * G).view(A.shape[0], K, -1).sum(dim=2)


def normalize(A: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale activations and contexts as the DRSA code does before fitting.

    Returns ``(A / (rms(A) * D**0.25), C / (rms(C) * D**0.25))`` where ``rms`` is the root mean
    square over all entries, so that ``mean_n ||a_n||^2 = D**0.5`` (and likewise for ``C``).

    Raises
    ------
    CNPError
        On bad shapes, NaN/inf, or an all-zero ``A`` or ``C`` (nothing to normalise).
    """
    A, C = _check_pair(A, C)
    D = A.shape[1]
    out = []
    for name, t in (("A", A), ("C", C)):
        t = t.to(_work_dtype(t))
        rms = t.square().mean().sqrt()
        if not bool(rms > 0):
            raise CNPError(
                f"{name} is all zeros, so it cannot be normalised; check the layer and the "
                "relevance computation that produced it."
            )
        out.append(t / (rms * D**0.25))
    return out[0], out[1]


def sample_positions(
    activations: torch.Tensor,
    contexts: torch.Tensor,
    n_positions: int = 20,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick random spatial positions of conv feature maps as DRSA samples.

    Parameters
    ----------
    activations, contexts : torch.Tensor
        ``(B, D, H, W)`` activations and contexts of one conv layer (same shape).
    n_positions : int
        Positions per image, drawn without replacement. When ``H * W < n_positions`` every
        position is taken.
    generator : torch.Generator, optional
        CPU generator for the draw (the global torch RNG when omitted); the same generator state
        gives the same positions.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``(A, C)`` of shape ``(B * n, D)`` with ``n = min(n_positions, H * W)``; row
        ``b * n + i`` is position ``i`` of image ``b``, the same position in ``A`` and ``C``.
    """
    acts = _as_tensor(activations, "activations")
    ctxs = _as_tensor(contexts, "contexts")
    if acts.dim() != 4:
        raise CNPError(
            f"activations must be (B, D, H, W) conv feature maps, got shape {tuple(acts.shape)}; "
            "for already flat (N, D) data skip sample_positions."
        )
    if acts.shape != ctxs.shape:
        raise CNPError(
            f"activations {tuple(acts.shape)} and contexts {tuple(ctxs.shape)} must have the "
            "same shape (both taken at the same layer for the same images)."
        )
    if isinstance(n_positions, bool) or not isinstance(n_positions, (int, np.integer)):
        raise CNPError(f"n_positions must be a positive integer, got {n_positions!r}")
    if n_positions < 1:
        raise CNPError(f"n_positions must be >= 1, got {n_positions}")
    B, D, H, W = acts.shape
    HW = H * W
    if B == 0 or HW == 0:
        raise CNPError(f"empty feature maps of shape {tuple(acts.shape)}")
    n = min(int(n_positions), HW)
    if n == HW:
        idx = torch.arange(HW).expand(B, HW)
    else:
        keys = torch.rand(B, HW, generator=generator)
        idx = keys.argsort(dim=1)[:, :n]
    idx = idx.to(acts.device).unsqueeze(1).expand(B, D, n)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, D, HW).gather(2, idx).permute(0, 2, 1).reshape(B * n, D)

    return pick(acts), pick(ctxs.to(acts.device))


def prca(A: torch.Tensor, C: torch.Tensor, n_components: int | None = None) -> torch.Tensor:
    """Principal relevant component analysis, the baseline of the DRSA paper.

    The directions are eigenvectors of the symmetrised cross-covariance
    ``(A^T C + C^T A) / 2`` (computed in float64), sorted by decreasing eigenvalue; each is
    sign-fixed so that its largest-magnitude entry is positive.

    Parameters
    ----------
    A, C : torch.Tensor
        ``(N, D)`` activations and contexts.
    n_components : int, optional
        Number of leading components (all ``D`` when omitted).

    Returns
    -------
    torch.Tensor
        ``(D, n_components)`` matrix with orthonormal columns, in the working dtype of ``A``.
    """
    A, C = _check_pair(A, C)
    D = A.shape[1]
    if n_components is None:
        n_components = D
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)):
        raise CNPError(f"n_components must be an integer in [1, {D}], got {n_components!r}")
    if not 1 <= n_components <= D:
        raise CNPError(f"n_components must be in [1, D = {D}], got {n_components}")
    A64 = A.to(torch.float64)
    C64 = C.to(torch.float64)
    S = A64.T @ C64
    S = (S + S.T) / 2
    _, vecs = torch.linalg.eigh(S)
    return fix_signs(vecs.flip(1)[:, : int(n_components)]).to(_work_dtype(A))


def fix_signs(vecs: torch.Tensor) -> torch.Tensor:
    """Columns multiplied by +-1 so that each one's largest-magnitude entry is positive
    (eigenvectors are defined up to sign; this makes a basis deterministic)."""
    rows = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs.gather(0, rows.unsqueeze(0)))
    signs[signs == 0] = 1
    return vecs * signs


def random_orthogonal(D: int, n: int = 1, seed: int = 0) -> torch.Tensor:
    """``n`` random ``D x D`` orthogonal matrices, deterministic per ``seed``.

    Each is the Q factor of the QR decomposition of a standard Gaussian matrix (float64, CPU
    generator seeded with ``seed``), sign-fixed so that ``diag(R) > 0``; this is the Haar
    distribution. Returns a float64 CPU tensor of shape ``(n, D, D)``.
    """
    g = torch.Generator().manual_seed(int(seed))
    out = torch.empty(n, D, D, dtype=torch.float64)
    for i in range(n):
        Z = torch.randn(D, D, generator=g, dtype=torch.float64)
        Q, R = torch.linalg.qr(Z)
        d = torch.sign(torch.diagonal(R))
        d[d == 0] = 1
        out[i] = Q * d
    return out


def planted_problem(
    N: int = 3000,
    D: int = 64,
    n_groups: int = 4,
    d_group: int | None = None,
    noise: float = 0.3,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A synthetic DRSA problem with planted relevant subspaces (for tests and benchmarks).

    A random orthogonal basis is split into ``n_groups`` subspaces of dimension ``d_group``
    (``D // n_groups`` by default). A sample of group ``g`` has activations
    ``a = relu(B_g z + noise * e)`` and contexts ``c = B_g (|z| + 0.5 u) + noise * e'`` with
    ``z, u, e, e'`` standard Gaussian, so its relevance ``a * c`` lies mostly in subspace
    ``g``. Both are normalised with :func:`normalize`.

    Returns
    -------
    (torch.Tensor, torch.Tensor, torch.Tensor)
        float32 ``A``, ``C`` of shape ``(N, D)`` and the int64 group of each row.
    """
    if d_group is None:
        d_group = D // n_groups
    if n_groups < 1 or d_group < 1 or n_groups * d_group > D:
        raise CNPError(f"need n_groups * d_group <= D, got {n_groups} * {d_group} > {D}")
    g = torch.Generator().manual_seed(int(seed))
    Q = random_orthogonal(D, 1, seed=int(seed) + 7919)[0]
    groups = torch.randint(n_groups, (N,), generator=g)
    z = torch.randn(N, d_group, generator=g, dtype=torch.float64)
    u = torch.randn(N, d_group, generator=g, dtype=torch.float64)
    bases = Q[:, : n_groups * d_group].T.reshape(n_groups, d_group, D)
    Bg = bases[groups]  # (N, d_group, D)
    a = torch.einsum("nj,njd->nd", z, Bg)
    c = torch.einsum("nj,njd->nd", z.abs() + 0.5 * u, Bg)
    a = torch.relu(a + noise * torch.randn(N, D, generator=g, dtype=torch.float64))
    c = c + noise * torch.randn(N, D, generator=g, dtype=torch.float64)
    A, C = normalize(a.float(), c.float())
    return A, C, groups


# --------------------------------------------------------------------------------------------
# the optimiser
# --------------------------------------------------------------------------------------------


@dataclass
class DRSAResult:
    """The outcome of :func:`fit`.

    Attributes
    ----------
    U : torch.Tensor
        ``(D, D)`` orthogonal basis of the kept restart; block ``k`` is
        ``U[:, k*d_k:(k+1)*d_k]``.
    J : float
        Objective at the returned ``U`` (after the last update).
    history : torch.Tensor
        float64 CPU tensor of length ``steps``: ``J`` before each step, kept restart.
    restart_J : torch.Tensor
        Final ``J`` of every restart (float64, CPU).
    restart_history : torch.Tensor
        ``(restarts, steps)`` histories of all restarts.
    K, d_k : int
        Number and size of the subspaces.
    restart : int
        Index of the kept restart (0 is the one started from ``init`` when given).
    orth : str
        Orthogonalisation used at the end (differs from the request after a fallback).
    orth_error : float
        ``max |U^T U - I|`` of the returned ``U`` (float64 check).
    resumed_from : int
        Step the fit resumed from (0 for a fresh run).
    seconds : float
        Wall time of this call.
    """

    U: torch.Tensor
    J: float
    history: torch.Tensor
    restart_J: torch.Tensor
    restart_history: torch.Tensor
    K: int
    d_k: int
    restart: int
    orth: str
    orth_error: float
    resumed_from: int = 0
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def blocks(self) -> list[torch.Tensor]:
        """The subspace bases ``[U_1, ..., U_K]``, each ``(D, d_k)``."""
        return [self.U[:, k * self.d_k : (k + 1) * self.d_k] for k in range(self.K)]


class _Workspace:
    """Buffers reused by every step (large temporaries would otherwise be re-allocated).

    With ``precision="bf16"`` the two large GEMMs run on bfloat16 copies (``Xg``, ``Pg``,
    ``Gg``, ``gradg``; ``XgT``, the transpose of ``Xg`` stored contiguously, as oneDNN's bf16
    GEMM with a transposed input took 1.8x as long on an AMX CPU); everything else stays in the
    working dtype.
    """

    def __init__(self, X: torch.Tensor, R: int, K: int, precision: str = "fp32") -> None:
        self.X = X  # (2N, D): A stacked on C
        twoN, D = X.shape
        self.N = twoN // 2
        self.D = D
        self.R = R
        self.K = K
        self.d_k = D // K
        kw = {"device": X.device, "dtype": X.dtype}
        self.P = torch.empty(twoN, R * D, **kw)  # (A U | C U) for all restarts
        self.G = torch.empty(twoN, R * D, **kw)  # dJ/d(A U), dJ/d(C U)
        self.prod = torch.empty(self.N, R * D, **kw)
        self.grad = torch.empty(D, R * D, **kw)
        self.tiny = torch.finfo(X.dtype).tiny
        self.low = precision == "bf16"
        # orth="eigh" decomposes in float32 where the GEMMs are bf16 (BF16_ARITHMETIC), else float64
        self.orth_dtype = torch.float32 if self.low else torch.float64
        if self.low:
            lkw = {"device": X.device, "dtype": torch.bfloat16}
            self.Xg = X.to(torch.bfloat16)
            self.XgT = self.Xg.T.contiguous()
            self.Pg = torch.empty(twoN, R * D, **lkw)
            self.Gg = torch.empty(twoN, R * D, **lkw)
            self.gradg = torch.empty(D, R * D, **lkw)

    def forward_gemm(self, Ucat: torch.Tensor) -> None:
        """``P = [A; C] @ Ucat`` (into ``self.P``, in the working dtype)."""
        if self.low:
            torch.mm(self.Xg, Ucat.to(torch.bfloat16), out=self.Pg)
            self.P.copy_(self.Pg)
        else:
            torch.mm(self.X, Ucat, out=self.P)

    def backward_gemm(self) -> torch.Tensor:
        """``[A; C]^T @ G`` (into ``self.grad``)."""
        if self.low:
            self.Gg.copy_(self.G)
            torch.mm(self.XgT, self.Gg, out=self.gradg)
            self.grad.copy_(self.gradg)
        else:
            torch.mm(self.X.T, self.G, out=self.grad)
        return self.grad


def _value_and_grad(ws: _Workspace, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """J of every restart and the analytic gradient dJ/dU, for ``U`` of shape ``(R, D, D)``.

    With ``P = A U``, ``Q = C U``, ``r_nk = sum_{j in k} P_nj Q_nj``, ``R = relu(r)`` and
    ``t = sqrt(J) = mean_k s_k^(1/2)``, the chain rule gives
    ``dJ/dr_nk = R_nk * t / (K N s_k^(3/2))`` (the relu mask is implied by ``R_nk``), hence
    ``dJ/dU = A^T (w * Q) + C^T (w * P)`` with ``w`` broadcast over each block. All restarts
    share one GEMM: ``[A; C] @ [U_1 ... U_R]``.
    """
    N, D, R, K, d_k = ws.N, ws.D, ws.R, ws.K, ws.d_k
    ws.forward_gemm(U.transpose(0, 1).reshape(D, R * D))
    PA = ws.P[:N]
    PC = ws.P[N:]
    torch.mul(PA, PC, out=ws.prod)
    rel = ws.prod.view(N, R, K, d_k).sum(dim=3).relu_()  # (N, R, K)
    s = rel.square().mean(dim=0).sqrt_()  # (R, K)
    t = s.sqrt().mean(dim=1)  # (R,)
    J = t.square()
    w = t.unsqueeze(1) / (K * N * s.clamp_min(ws.tiny).pow(1.5))  # (R, K)
    coef = (rel * w).unsqueeze(3)  # (N, R, K, 1)
    torch.mul(PC.view(N, R, K, d_k), coef, out=ws.G[:N].view(N, R, K, d_k))
    torch.mul(PA.view(N, R, K, d_k), coef, out=ws.G[N:].view(N, R, K, d_k))
    grad = ws.backward_gemm()
    return J, grad.view(D, R, D).transpose(0, 1)


def _value(ws: _Workspace, U: torch.Tensor) -> torch.Tensor:
    """J of every restart (forward only, always in the working dtype)."""
    N, D, R, K, d_k = ws.N, ws.D, ws.R, ws.K, ws.d_k
    torch.mm(ws.X, U.transpose(0, 1).reshape(D, R * D), out=ws.P)
    torch.mul(ws.P[:N], ws.P[N:], out=ws.prod)
    rel = ws.prod.view(N, R, K, d_k).sum(dim=3).relu_()
    s = rel.square().mean(dim=0).sqrt_()
    return s.sqrt().mean(dim=1).square()


def _orth_eigh(M: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``M (M^T M)^(-1/2)`` through an eigendecomposition in ``dtype``, batched (float64: the
    reference's; float32 in the bf16 path of :func:`fit`)."""
    Mw = M.to(dtype)
    S = Mw.transpose(-2, -1) @ Mw
    lam, E = torch.linalg.eigh(S)
    inv_sqrt = (E * lam.rsqrt().unsqueeze(-2)) @ E.transpose(-2, -1)
    return (Mw @ inv_sqrt).to(M.dtype)


def _orth_newton_schulz(M: torch.Tensor, scale: torch.Tensor, iters: int) -> torch.Tensor:
    """Polar factor of ``M`` by the Newton-Schulz iteration ``X <- X (3 I - X^T X) / 2``.

    ``M = U + g`` with orthonormal ``U`` has singular values at most ``1 + |g|_2``, so dividing
    by ``scale = 1 + |g|_F`` puts them in ``(0, 1]``, inside the region of convergence
    ``(0, sqrt(3))``; the iteration then converges quadratically to the orthogonal factor.
    """
    X = M / scale.view(-1, 1, 1)
    for _ in range(iters):
        S = torch.bmm(X.transpose(1, 2), X)
        X = torch.baddbmm(X, X, S, beta=1.5, alpha=-0.5)
    return X


def _orth_residual(U: torch.Tensor) -> torch.Tensor:
    """``max |U_r^T U_r - I|`` per restart (in the working dtype, on the device)."""
    S = torch.bmm(U.transpose(1, 2), U)
    S.diagonal(dim1=1, dim2=2).sub_(1)
    return S.abs().amax(dim=(1, 2))


def _drsa_step(
    ws: _Workspace, U: torch.Tensor, lr: float, orth: str, ns_iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One step for all restarts: returns ``(J before the step, new U, orth residual or None)``."""
    J, grad = _value_and_grad(ws, U)
    M = torch.add(U, grad, alpha=lr)
    if orth == "eigh":
        return J, _orth_eigh(M, ws.orth_dtype), None
    scale = 1 + abs(lr) * torch.linalg.vector_norm(grad, dim=(1, 2))
    U_new = _orth_newton_schulz(M, scale, ns_iters)
    return J, U_new, _orth_residual(U_new)


def _resolve_precision(precision: str, dtype: torch.dtype, device: torch.device) -> str:
    """``"auto"``: ``"bf16"`` for float32 data on a device with native bf16, else ``"fp32"``."""
    if precision == "auto":
        return "bf16" if dtype == torch.float32 and bf16_native(device) else "fp32"
    return precision


def _resolve_orth(orth: str, device: torch.device) -> str:
    """``"auto"``: LAPACK's eigh on the CPU, Newton-Schulz (no host sync) elsewhere."""
    if orth == "auto":
        return "eigh" if device.type == "cpu" else "newton-schulz"
    return orth


def _checkpoint_meta(
    A: torch.Tensor,
    C: torch.Tensor,
    init: torch.Tensor | None,
    *,
    K: int,
    steps: int,
    restarts: int,
    seed: int,
    lr: float,
    orth: str,
    ns_iters: int,
    dtype: torch.dtype,
    precision: str,
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "shape": [int(s) for s in A.shape],
        "K": int(K),
        "steps": int(steps),
        "restarts": int(restarts),
        "seed": int(seed),
        "lr": float(lr),
        "orth": orth,
        "ns_iters": int(ns_iters) if orth == "newton-schulz" else None,
        "dtype": str(dtype),
        "precision": precision,
        "data_hash": tensor_hash(A, C),
        "init_hash": None if init is None else tensor_hash(init),
        **({"bf16_arithmetic": BF16_ARITHMETIC} if precision == "bf16" else {}),
    }


def _load_checkpoint(
    path: Path, meta: dict[str, Any], R: int, D: int, steps: int
) -> dict[str, Any] | None:
    """A matching checkpoint's state, or ``None`` (with a warning saying why it is ignored)."""

    def check(state: Any) -> str | None:
        if not isinstance(state, dict) or state.get("meta") != meta:
            old = state.get("meta") if isinstance(state, dict) else None
            diff = sorted(k for k in meta if old.get(k) != meta[k]) if isinstance(old, dict) else []
            return f"was written for different arguments (differs in: {', '.join(diff) or 'format'})"
        try:
            U, hist, err = state["U"], state["history"], state["orth_err_max"]
            ok = (
                0 <= int(state["step"]) <= steps
                and isinstance(U, torch.Tensor)
                and tuple(U.shape) == (R, D, D)
                and isinstance(hist, torch.Tensor)
                and tuple(hist.shape) == (R, steps)
                and isinstance(err, torch.Tensor)
                and str(state["orth_active"]) in ORTH_METHODS
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        return None if ok else "is malformed (missing or mis-shaped state)"

    return load_current(path, what="DRSA checkpoint", check=check,
                        then="the fit starts from scratch and will overwrite it",
                        report=lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=4))


def fit(
    A: torch.Tensor,
    C: torch.Tensor,
    K: int,
    steps: int,
    init: torch.Tensor | None = None,
    restarts: int = 3,
    seed: int = 0,
    *,
    lr: float = 1.0,
    device: str | torch.device | None = None,
    orth: str = "auto",
    precision: str = "auto",
    ns_iters: int = 14,
    ortho_tol: float | None = None,
    progress: bool = True,
    sync_every: int = 25,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
) -> DRSAResult:
    """Fit DRSA subspaces by projected gradient ascent, all restarts batched.

    Each step computes ``J`` and the analytic ``dJ/dU`` for every restart at once, then
    ``U <- orth(U + lr * dJ/dU)`` with ``orth(M) = M (M^T M)^(-1/2)``. The restart with the
    highest final ``J`` is kept. With ``init`` given and ``restarts=1`` this is the official
    DRSA algorithm (``Model.fit`` of p16i/drsa-demo) started from ``init``.

    Parameters
    ----------
    A, C : torch.Tensor
        ``(N, D)`` activations and contexts (normally after :func:`normalize`); float64 input
        is fitted in float64, anything else in float32.
    K : int
        Number of subspaces; ``D`` must be divisible by ``K`` (``d_k = D / K``).
    steps : int
        Number of gradient steps (the DRSA paper uses 2500-5000).
    init : torch.Tensor, optional
        ``D x D`` orthonormal start for restart 0; the other restarts start from
        :func:`random_orthogonal` matrices drawn from ``seed`` (the same ones with or without
        ``init``).
    restarts : int
        Number of independent starts, optimised together in one ``(R, D, D)`` tensor.
    seed : int
        Seed of the random starts.
    lr : float
        Step size (1 in the paper).
    device : str or torch.device, optional
        Where to compute (default: the device of ``A``; ``"auto"`` picks CUDA if available).
    orth : {"auto", "newton-schulz", "eigh"}
        ``"newton-schulz"``: polar factor in the working dtype by ``ns_iters`` Newton-Schulz
        iterations after scaling by ``1 + |lr g|_F``; a handful of batched GEMMs, no host
        synchronisation. ``"eigh"``: float64 eigendecomposition of ``M^T M`` (the reference).
        ``"auto"`` (default) takes ``"newton-schulz"`` on accelerators (``torch.linalg.eigh``
        synchronises a CUDA device with the host and is slow there) and ``"eigh"`` on the
        CPU, where LAPACK's eigh costs fewer flops than 14 Newton-Schulz iterations (measured
        at D = 512 on 1 thread: 25 ms vs 73 ms per restart and step); both follow the golden
        trajectory to 5e-7. The Newton-Schulz result is checked every step on the device
        (``max |U^T U - I|``); if a check exceeds ``ortho_tol`` the fit warns,
        re-orthonormalises with ``"eigh"`` and uses ``"eigh"`` from then on.
    precision : {"auto", "fp32", "bf16"}
        ``"auto"`` (default): ``"bf16"`` for float32 data on a device that computes bf16
        natively (:func:`cnp.runtime.bf16_native`: CUDA, CPUs with AVX512-BF16 or AMX), else
        ``"fp32"``. ``"fp32"``: every operation in the working dtype. ``"bf16"``: the two large
        GEMMs (``[A; C] U`` and ``[A; C]^T G``, nearly all the flops) take bfloat16 inputs and
        outputs with float32 accumulation, and ``orth="eigh"`` decomposes in float32 instead of
        float64 (:data:`BF16_ARITHMETIC`); the relevances, the gradient assembly and the returned
        ``J`` stay in float32. Roughly 3-4x faster GEMMs on a CPU with AVX512-BF16 or AMX and on
        GPUs (at D = 512, N = 10,000 on one thread of an AMX CPU the whole fit takes 8.4 s
        against 20.6 s in fp32 and 23.5 s for the reference algorithm, ``bench/bench_drsa.py``);
        on the golden data the ``J`` history deviates by up to 7e-4 (relative) from the official
        code, the final ``J`` by 2e-5, and ``U`` is orthonormal to 1.2e-6 (3e-8 in fp32). Asked
        for on a device without native bf16 it warns: the products are emulated there (54x
        slower than fp32 on an AVX2 CPU).
    ns_iters : int
        Newton-Schulz iterations per step.
    ortho_tol : float, optional
        Orthonormality tolerance of the check above; default ``max(1e-5, 4 * eps * sqrt(D))``
        (eps of the working dtype).
    progress : bool
        Show a tqdm bar over the steps (updated every ``sync_every`` steps).
    sync_every : int
        Steps between host synchronisations (progress bar and the orthonormality check); the
        loop never synchronises otherwise.
    checkpoint : str or Path, optional
        File for resumable state (all restarts' ``U``, step, histories, seed), written
        atomically every ``checkpoint_every`` steps and at the end. A later call with the same
        arguments resumes from it and ends bit-for-bit (on the CPU) where an uninterrupted run
        ends. A checkpoint written for other arguments (shapes, K, steps, restarts, seed, lr,
        orth, dtype, a hash of ``A``, ``C`` and ``init``) or an unreadable one is ignored with a
        warning and overwritten. Nothing else is written or removed.
    checkpoint_every : int
        Steps between checkpoints.

    Returns
    -------
    DRSAResult

    Raises
    ------
    CNPError
        On bad input: shapes, NaN/inf, ``D % K != 0``, an ``init`` that is not ``D x D``
        orthonormal, ``steps < 0``, ``restarts < 1``, an unknown ``orth``, or when every restart
        diverged to a non-finite objective.
    """
    t_start = time.perf_counter()
    A, C = _check_pair(A, C)
    N, D = A.shape
    K = _check_k(D, K)
    d_k = D // K
    for name, val, lo in (
        ("steps", steps, 0),
        ("restarts", restarts, 1),
        ("seed", seed, 0),
        ("ns_iters", ns_iters, 1),
        ("sync_every", sync_every, 1),
        ("checkpoint_every", checkpoint_every, 1),
    ):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
            raise CNPError(f"{name} must be an integer, got {val!r}")
        if val < lo:
            raise CNPError(f"{name} must be >= {lo}, got {val}")
    steps, restarts, seed = int(steps), int(restarts), int(seed)
    if orth not in ("auto", *ORTH_METHODS):
        raise CNPError(f"orth must be one of {('auto', *ORTH_METHODS)}, got {orth!r}")
    if precision not in PRECISIONS:
        raise CNPError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr)):
        raise CNPError(f"lr must be a finite number, got {lr!r}")
    lr = float(lr)

    dev = A.device if device is None else resolve_device(device)
    dtype = _work_dtype(A)
    if precision == "auto":
        precision = _resolve_precision(precision, dtype, dev)
    elif precision == "bf16" and not bf16_native(dev):
        warnings.warn(
            f"precision='bf16' on {dev}, which has no native bf16 (a CPU without AVX512-BF16 or AMX): "
            "its bf16 matrix products are emulated, measured 54x slower than fp32 on a 2-core AVX2 "
            "CPU (one 20000 x 512 x 1536 product: 27 s against 0.5 s); precision='auto' or 'fp32' "
            "computes in fp32 here", RuntimeWarning, stacklevel=2)
    orth_requested = orth
    orth = _resolve_orth(orth, dev)
    if ortho_tol is None:
        ortho_tol = max(1e-5, 4 * torch.finfo(dtype).eps * math.sqrt(D))

    init_t = None
    if init is not None:
        init_t = _as_tensor(init, "init")
        if init_t.dim() != 2 or tuple(init_t.shape) != (D, D):
            raise CNPError(
                f"init must be a D x D = {D} x {D} matrix (all K * d_k columns), got shape "
                f"{tuple(init_t.shape)}."
            )
        if not bool(torch.isfinite(init_t).all()):
            raise CNPError("init contains NaN/inf entries")
        I64 = init_t.detach().to("cpu", torch.float64)
        err = float((I64.T @ I64 - torch.eye(D, dtype=torch.float64)).abs().max())
        if err > 1e-4:
            raise CNPError(
                f"init is not orthonormal: max |U^T U - I| = {err:.2e} > 1e-4. Orthonormalise "
                "it first, e.g. torch.linalg.qr(init).Q, or pass init=None for random starts."
            )

    # starting bases: restart 0 is init when given; random ones are the same either way
    U = random_orthogonal(D, restarts, seed).to(device=dev, dtype=dtype)
    if init_t is not None:
        U[0] = init_t.detach().to(device=dev, dtype=dtype)

    X = torch.cat([A.detach().to(dev, dtype), C.detach().to(dev, dtype)], dim=0).contiguous()
    ws = _Workspace(X, restarts, K, precision)
    hist = torch.zeros(restarts, steps, device=dev, dtype=dtype)
    err_max = torch.zeros((), device=dev, dtype=dtype)
    orth_active = orth
    start = 0

    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    meta = None
    if ckpt_path is not None:
        meta = _checkpoint_meta(
            A, C, init_t, K=K, steps=steps, restarts=restarts, seed=seed, lr=lr, orth=orth,
            ns_iters=ns_iters, dtype=dtype, precision=precision,
        )
        state = _load_checkpoint(ckpt_path, meta, restarts, D, steps)
        if state is not None:
            start = int(state["step"])
            U = state["U"].to(device=dev, dtype=dtype)
            hist = state["history"].to(device=dev, dtype=dtype)
            err_max = state["orth_err_max"].to(device=dev, dtype=dtype)
            orth_active = str(state["orth_active"])

    def save(step: int) -> None:
        atomic_torch_save(
            ckpt_path,
            {
                "meta": meta,
                "step": step,
                "seed": seed,
                "U": U.detach().cpu(),
                "history": hist.detach().cpu(),
                "orth_err_max": err_max.detach().cpu(),
                "orth_active": orth_active,
            },
        )

    fallback_step = None
    bar = _progress_bar(total=steps, initial=start, desc="DRSA", disable=not progress)
    last_update = start
    try:
        with torch.no_grad():
            for i in range(start, steps):
                J, U, res = _drsa_step(ws, U, lr, orth_active, ns_iters)
                hist[:, i] = J
                if res is not None:
                    err_max = torch.maximum(err_max, res.max())
                done = i + 1
                at_ckpt = ckpt_path is not None and done % checkpoint_every == 0
                if done % sync_every == 0 or at_ckpt or done == steps:
                    # host synchronisation point: watchdog, progress bar, checkpoint
                    if orth_active == "newton-schulz" and float(err_max) > ortho_tol:
                        warnings.warn(
                            f"Newton-Schulz orthogonalisation lost orthonormality (max |U^T U - "
                            f"I| = {float(err_max):.2e} > {ortho_tol:.1e}) before step {done}; "
                            "re-orthonormalising and switching to orth='eigh' for the rest of "
                            "the fit (or raise ns_iters).",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                        U = _orth_eigh(U)
                        orth_active = "eigh"
                        fallback_step = done
                    if not bar.disable:
                        bar.update(done - last_update)
                        last_update = done
                        bar.set_postfix(J=f"{float(hist[:, i].max()):.5f}", refresh=False)
                    if at_ckpt or (ckpt_path is not None and done == steps):
                        save(done)
            J_final = _value(ws, U)
    finally:
        bar.close()

    restart_J = J_final.detach().to("cpu", torch.float64)
    finite = torch.isfinite(restart_J)
    if not bool(finite.any()):
        raise CNPError(
            "every DRSA restart diverged to a non-finite objective. Check that A and C are "
            "normalised (cnp.drsa.normalize) and try a smaller lr."
        )
    best_r = int(torch.where(finite, restart_J, torch.tensor(-math.inf, dtype=torch.float64)).argmax())
    U_best = U[best_r].clone()
    U64 = U_best.to(torch.float64)
    orth_error = float((U64.T @ U64 - torch.eye(D, dtype=torch.float64, device=dev)).abs().max())
    hist_cpu = hist.detach().to("cpu", torch.float64)
    return DRSAResult(
        U=U_best,
        J=float(restart_J[best_r]),
        history=hist_cpu[best_r].clone(),
        restart_J=restart_J,
        restart_history=hist_cpu,
        K=K,
        d_k=d_k,
        restart=best_r,
        orth=orth_active,
        orth_error=orth_error,
        resumed_from=start,
        seconds=time.perf_counter() - t_start,
        info={
            "orth_requested": orth_requested,
            "precision": precision,
            "fallback_step": fallback_step,
            "ortho_tol": ortho_tol,
            "lr": lr,
            "seed": seed,
            "steps": steps,
            "restarts": restarts,
            "device": str(dev),
            "dtype": str(dtype),
        },
    )
