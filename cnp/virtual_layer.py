"""The virtual concept layer (stage 1, augment) and its ablation (stage 2).

After a chosen layer ``l`` (default ``relu4_3``, the output of conv4_3's ReLU) the network is
augmented with

* the **virtual layer** ``h_k = U_k^T a`` (one group of nodes per concept subspace ``U_k``), and
* the **reconstruction** ``a' = sum_{k not in K'} U_k U_k^T a`` connected to layer ``l+1``
  through the original weights.

With nothing ablated ``a' = a`` and the output is unchanged. Ablating a set ``K'`` zeroes
``U_k'`` (``mode='zero'``, the paper) or replaces the subspace's signal by its dataset mean
(``mode='mean'``, the paper's footnote 3): ``a' = sum_{k not in K'} U_k U_k^T a +
sum_{k in K'} U_k U_k^T mean(a)``.

LRP passes through the layer as contexts (see :mod:`cnp.lrp`): relevance reaches ``a`` only
through the kept subspaces, and the concept relevance of subspace ``k`` is
``R(k) = sum over positions and j in block k of h_j (U^T c)_j``. Conservation:
``sum_k R(k) + residue = relevance arriving at a'``, where the residue is the share of the
mean-ablation constant (zero in ``zero`` mode with a full basis).

The layer can be *bypassed* (``bypass(model)``: network as if it were absent, used while
fine-tuning) and *removed* (:func:`remove_virtual_layer`: the original network, exactly).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from cnp.io import CNPError
from cnp.lrp import ContextSite, attach_site
from cnp.models import layer_outputs, resolve_layer_name

ABLATION_MODES = ("zero", "mean")


def check_orthonormal(U: torch.Tensor, tol: float = 1e-4) -> None:
    """Raise :class:`CNPError` unless ``U`` is square with orthonormal columns."""
    if U.ndim != 2 or U.shape[0] != U.shape[1]:
        raise CNPError(f"U must be a square D x D matrix (K blocks of d_k columns, K * d_k = D), got {tuple(U.shape)}")
    eye = torch.eye(U.shape[1], dtype=torch.float64, device=U.device)
    err = (U.double().T @ U.double() - eye).abs().max().item()
    if err > tol:
        raise CNPError(f"U is not orthonormal (max |U^T U - I| = {err:.2e} > {tol}); pass the U of a DRSA "
                       "fit (cnp.drsa.fit(...).U) or orthonormalise it first")


class VirtualLayer(ContextSite):
    """Virtual concept layer with K subspaces of a D-dimensional layer.

    Parameters
    ----------
    U : torch.Tensor
        (D, D) orthonormal basis; block ``k`` is ``U[:, k*d_k:(k+1)*d_k]``.
    K : int
        Number of subspaces (``K * d_k = D``).
    ablated : iterable of int
        The ablated set ``K'``.
    mode : str
        ``zero`` or ``mean``.
    mean_activation : torch.Tensor, optional
        (D,) dataset-mean activation, required for ``mode='mean'`` (see :meth:`fit_mean`).
    """

    site_attr = "cnp_virtual_layer"

    def __init__(self, U: torch.Tensor, K: int, ablated: Iterable[int] = (), mode: str = "zero",
                 mean_activation: torch.Tensor | None = None) -> None:
        super().__init__()
        U = torch.as_tensor(U, dtype=torch.float32)
        if not isinstance(K, int) or K < 1:
            raise CNPError(f"K must be a positive integer, got {K!r}")
        check_orthonormal(U)
        D = U.shape[0]
        if D % K:
            valid = [k for k in range(1, D + 1) if D % k == 0]
            raise CNPError(f"K * d_k must equal D = {D}: K = {K} does not divide it (valid K: {valid})")
        self.K, self.D, self.d_k = K, D, D // K
        self.register_buffer("U", U.clone(), persistent=False)
        self.register_buffer("mean_activation",
                             torch.zeros(D) if mean_activation is None else torch.as_tensor(mean_activation).float(),
                             persistent=False)
        self._has_mean = mean_activation is not None
        self.backward_blocks: torch.Tensor | None = None  # (n, K) per-sample block weights for heatmaps
        self.last_concept_relevance: torch.Tensor | None = None
        self.register_buffer("strengths", torch.ones(K), persistent=False)
        self.ablated: tuple[int, ...] = ()
        self.mode = "zero"
        self.set_ablation(ablated, mode)

    # ----------------------------------------------------------------- configuration
    def blocks(self) -> list[torch.Tensor]:
        """The subspace bases ``U_k`` (D, d_k)."""
        return [self.U[:, k * self.d_k:(k + 1) * self.d_k] for k in range(self.K)]

    def set_ablation(self, ablated: Iterable[int] = (), mode: str = "zero") -> VirtualLayer:
        """Set the ablated set ``K'`` and the ablation mode."""
        ablated = tuple(sorted({int(k) for k in ablated}))
        bad = [k for k in ablated if not 0 <= k < self.K]
        if bad:
            raise CNPError(f"subspace index {bad} outside 0..{self.K - 1}")
        if len(ablated) == self.K:
            raise CNPError(f"ablating every subspace ({self.K} of {self.K}) removes the whole layer; keep at least one")
        if mode not in ABLATION_MODES:
            raise CNPError(f"unknown ablation mode {mode!r}; use one of {ABLATION_MODES}")
        if mode == "mean" and ablated and not self._has_mean:
            raise CNPError("mean ablation needs the dataset-mean activation: call fit_mean(model, images) first")
        self.ablated, self.mode = ablated, mode
        return self

    def set_strengths(self, strengths: Sequence[float] | torch.Tensor | None = None) -> VirtualLayer:
        """Set a strength ``s_k`` in [0, 1] per subspace (``None``: all 1).

        The layer computes ``a' = sum_k w_k U_k U_k^T a`` with ``w_k = s_k`` for kept subspaces and
        0 for the ablated set ``K'`` (``mode='mean'`` adds ``sum_k (1 - w_k) U_k U_k^T mean(a)``):
        ``s = 1`` everywhere is the paper's binary ablation, ``s_k = 0`` ablates ``U_k``, values in
        between blend ``U_k``'s signal (with zero, or with its dataset mean).
        """
        if strengths is None:
            s = torch.ones(self.K)
        else:
            s = torch.as_tensor(strengths, dtype=torch.float32).flatten().cpu()
        if s.numel() != self.K:
            raise CNPError(f"strengths needs one value per subspace (K = {self.K}), got {s.numel()}")
        if not bool(((s >= 0) & (s <= 1)).all()):
            raise CNPError(f"strengths must lie in [0, 1], got {s.tolist()}")
        if self.mode == "mean" and bool((s < 1).any()) and not self._has_mean:
            raise CNPError("mean ablation needs the dataset-mean activation: call fit_mean(model, images) first")
        self.strengths = s.to(self.U.device)
        return self

    @property
    def keep_mask(self) -> torch.Tensor:
        """(K,) 1 for kept subspaces, 0 for ablated ones."""
        m = torch.ones(self.K, device=self.U.device)
        if self.ablated:
            m[list(self.ablated)] = 0
        return m

    @property
    def weights(self) -> torch.Tensor:
        """(K,) the weight ``w_k`` of each subspace: its strength, 0 when ablated."""
        return self.keep_mask * self.strengths.to(self.U.device)

    def projection(self) -> torch.Tensor:
        """``P = sum_k w_k U_k U_k^T`` (D, D): ``sum_{k kept} U_k U_k^T`` at full strengths."""
        col = self.weights.repeat_interleave(self.d_k)
        return (self.U * col) @ self.U.T

    def offset(self) -> torch.Tensor:
        """The constant added in ``mean`` mode: ``sum_k (1 - w_k) U_k U_k^T mean(a)`` (D,), i.e.
        ``sum_{k in K'} U_k U_k^T mean(a)`` at full strengths."""
        w = self.weights
        if self.mode != "mean" or bool((w == 1).all()):
            return torch.zeros(self.D, device=self.U.device)
        col = 1 - w.repeat_interleave(self.d_k)
        return (self.U * col) @ (self.U.T @ self.mean_activation)

    @torch.no_grad()
    def fit_mean(self, model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Dataset-mean activation at the layer (over images and positions), for mean ablation.

        ``images`` are normalised float inputs or uint8 images.
        """
        from cnp.images import normalize_images

        if not self.layer_name:
            raise CNPError("attach the virtual layer to a model (insert_virtual_layer) before fit_mean")
        total, count = None, 0

        def batches():
            for start in range(0, images.shape[0], batch_size):
                xb = images[start:start + batch_size]
                yield normalize_images(xb, self.U.device) if xb.dtype == torch.uint8 else xb.to(self.U.device)

        was = self.enabled
        self.enabled = False
        try:
            for out in layer_outputs(model, self.layer_name, batches()):
                a = out.transpose(0, 1).reshape(self.D, -1)
                total = a.sum(1) if total is None else total + a.sum(1)
                count += a.shape[1]
        finally:
            self.enabled = was
        self.mean_activation = (total / max(count, 1)).float()
        self._has_mean = True
        return self.mean_activation

    # ----------------------------------------------------------------- forward / LRP
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.shape[1] != self.D:
            raise CNPError(f"the virtual layer expects {self.D} channels at {self.layer_name}, got {a.shape[1]}")
        P = self.projection().to(a.dtype)
        out = torch.einsum("ij,nj...->ni...", P, a)
        if self.mode == "mean" and (self.ablated or bool((self.strengths < 1).any())):
            shape = (1, self.D) + (1,) * (a.ndim - 2)
            out = out + self.offset().to(a.dtype).view(shape)
        return out

    def context_backward(self, a: torch.Tensor, c_out: torch.Tensor) -> torch.Tensor:
        if self.backward_blocks is None:
            return torch.einsum("ij,nj...->ni...", self.projection().to(c_out.dtype), c_out)
        w = (self.backward_blocks.to(c_out) * self.weights.to(c_out)).repeat_interleave(self.d_k, dim=1)
        uc = torch.einsum("ji,nj...->ni...", self.U.to(c_out.dtype), c_out)
        shape = w.shape + (1,) * (c_out.ndim - 2)
        return torch.einsum("ij,nj...->ni...", self.U.to(c_out.dtype), uc * w.view(shape))

    def record(self, a: torch.Tensor, c_out: torch.Tensor, c_in: torch.Tensor) -> None:
        super().record(a, c_out, c_in)
        with torch.no_grad():
            h = torch.einsum("ji,nj...->ni...", self.U, a)
            uc = torch.einsum("ji,nj...->ni...", self.U, c_out)
            r = (h * uc).flatten(2).sum(2) if h.ndim > 2 else h * uc  # (n, D)
            rk = r.view(r.shape[0], self.K, self.d_k).sum(2) * self.weights
            self.last_concept_relevance = rk.detach()

    def extra_repr(self) -> str:
        s = "" if bool((self.strengths == 1).all()) else f", strengths={[round(v, 3) for v in self.strengths.tolist()]}"
        return (f"layer={self.layer_name}, D={self.D}, K={self.K}, d_k={self.d_k}, ablated={list(self.ablated)}, "
                f"mode={self.mode}{s}, enabled={self.enabled}")

    def state(self) -> dict:
        """Everything needed to rebuild this layer (save with ``cnp.io.atomic_torch_save``)."""
        st = {"U": self.U.detach().cpu(), "K": self.K, "ablated": list(self.ablated), "mode": self.mode,
              "mean_activation": self.mean_activation.detach().cpu() if self._has_mean else None,
              "layer": self.layer_name}
        if not bool((self.strengths == 1).all()):
            st["strengths"] = self.strengths.detach().cpu()
        return st


class KeptAblation(ContextSite):
    """The ablation of ``K'`` kept in the deployed network, as a low-rank correction.

    ``a' = a - W W^T a`` (``mode='zero'``) or ``a' = a - W W^T a + W W^T mean(a)`` (``mode='mean'``)
    with ``W = U_K'`` (D, r): the ablated subspaces' bases side by side, ``r = |K'| d_k``. With an
    orthonormal ``U`` this is the same map as the ablated :class:`VirtualLayer` (``sum_{k not in K'}
    U_k U_k^T = I - W W^T``) at ``2 D r`` multiply-adds per position instead of the ``K`` groups of
    virtual nodes and the D x D reconstruction. LRP passes contexts through it as through the
    virtual layer (``c -> c - W W^T c``).

    Parameters
    ----------
    W : torch.Tensor
        (D, r) orthonormal columns.
    offset : torch.Tensor, optional
        (D,) ``W W^T mean(a)`` for mean ablation.
    """

    site_attr = "cnp_kept_ablation"

    def __init__(self, W: torch.Tensor, offset: torch.Tensor | None = None) -> None:
        super().__init__()
        W = torch.as_tensor(W, dtype=torch.float32)
        if W.ndim != 2 or W.shape[1] == 0 or W.shape[1] >= W.shape[0]:
            raise CNPError(f"W must be D x r with 0 < r < D (the ablated subspaces' bases), got {tuple(W.shape)}")
        err = (W.double().T @ W.double() - torch.eye(W.shape[1], dtype=torch.float64)).abs().max().item()
        if err > 1e-4:
            raise CNPError(f"the columns of W are not orthonormal (max |W^T W - I| = {err:.2e})")
        self.D, self.r = W.shape
        self.register_buffer("W", W.clone(), persistent=False)
        self.register_buffer("offset", torch.zeros(self.D) if offset is None else torch.as_tensor(offset).float().clone(),
                             persistent=False)
        self.mode = "zero" if offset is None else "mean"

    @classmethod
    def from_virtual_layer(cls, vl: VirtualLayer) -> KeptAblation:
        """The low-rank equivalent of ``vl``'s ablation (``vl`` must ablate at least one subspace)."""
        if not vl.ablated:
            raise CNPError("the virtual layer ablates nothing (K' is empty): there is no ablation to keep")
        if not bool((vl.strengths == 1).all()):
            raise CNPError("the kept ablation is the binary one (strengths all 1); reset them with set_strengths()")
        W = torch.cat([vl.blocks()[k] for k in vl.ablated], dim=1).detach()
        return cls(W, vl.offset().detach() if vl.mode == "mean" else None)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.shape[1] != self.D:
            raise CNPError(f"the kept ablation expects {self.D} channels at {self.layer_name}, got {a.shape[1]}")
        W = self.W.to(a.dtype)
        out = a - torch.einsum("ir,nr...->ni...", W, torch.einsum("ir,ni...->nr...", W, a))
        if self.mode == "mean":
            out = out + self.offset.to(a.dtype).view((1, self.D) + (1,) * (a.ndim - 2))
        return out

    def context_backward(self, a: torch.Tensor, c_out: torch.Tensor) -> torch.Tensor:
        W = self.W.to(c_out.dtype)
        return c_out - torch.einsum("ir,nr...->ni...", W, torch.einsum("ir,ni...->nr...", W, c_out))

    def extra_macs(self, height: int, width: int) -> int:
        """Multiply-adds the correction adds per image at a ``height`` x ``width`` feature map."""
        return 2 * self.D * self.r * height * width

    def extra_params(self) -> int:
        """Numbers the deployed network stores for the correction (W, and the offset in mean mode)."""
        return self.D * self.r + (self.D if self.mode == "mean" else 0)

    def extra_repr(self) -> str:
        return f"layer={self.layer_name}, D={self.D}, r={self.r}, mode={self.mode}"

    def state(self) -> dict:
        """Everything needed to rebuild the correction (:func:`kept_from_state`)."""
        return {"W": self.W.detach().cpu(), "offset": self.offset.detach().cpu() if self.mode == "mean" else None,
                "layer": self.layer_name}


def keep_ablation(model: nn.Module) -> KeptAblation:
    """Replace ``model``'s virtual layer by the low-rank :class:`KeptAblation` of its ablated set."""
    vl = get_virtual_layer(model)
    if vl is None:
        raise CNPError("the model has no virtual layer to keep the ablation of")
    kept = KeptAblation.from_virtual_layer(vl)
    layer = vl.layer_name
    remove_virtual_layer(model)
    attach_site(model, layer, kept)
    return kept


def kept_from_state(model: nn.Module, state: dict) -> KeptAblation:
    """Re-attach a kept ablation saved with :meth:`KeptAblation.state`."""
    return attach_site(model, state["layer"], KeptAblation(state["W"], state.get("offset")))


def get_kept_ablation(model: nn.Module) -> KeptAblation | None:
    return getattr(model, KeptAblation.site_attr, None)


# --------------------------------------------------------------------------- model surgery
def insert_virtual_layer(model: nn.Module, U: torch.Tensor, K: int, layer: str = "relu4_3",
                         ablated: Sequence[int] = (), mode: str = "zero",
                         mean_activation: torch.Tensor | None = None) -> VirtualLayer:
    """Augment ``model`` with a virtual concept layer after ``layer`` (paper or qualified name).

    Raises
    ------
    CNPError
        Unknown layer, U not D x D orthonormal, K not dividing D, bad ablation set, or a layer
        whose output does not have D channels (checked on the first forward pass).
    """
    resolve_layer_name(model, layer)
    vl = VirtualLayer(U, K, ablated=ablated, mode=mode, mean_activation=mean_activation)
    attach_site(model, layer, vl)
    return vl


def from_state(model: nn.Module, state: dict) -> VirtualLayer:
    """Re-insert a virtual layer saved with :meth:`VirtualLayer.state`."""
    vl = insert_virtual_layer(model, state["U"], int(state["K"]), layer=state["layer"],
                              ablated=state["ablated"], mode=state["mode"],
                              mean_activation=state.get("mean_activation"))
    if state.get("strengths") is not None:
        vl.set_strengths(state["strengths"])
    return vl


def get_virtual_layer(model: nn.Module) -> VirtualLayer | None:
    return getattr(model, VirtualLayer.site_attr, None)


def remove_virtual_layer(model: nn.Module) -> nn.Module:
    """Remove the virtual layer permanently: the original network, exactly."""
    vl = get_virtual_layer(model)
    if vl is not None:
        vl.detach_from(model)
    return model


class bypass:
    """Context manager (or plain call) that bypasses the virtual layer: ``with bypass(model): ...``."""

    def __init__(self, model: nn.Module, active: bool = True) -> None:
        self.vl = get_virtual_layer(model)
        self.active = active
        self._prev = None

    def __enter__(self):
        if self.vl is not None and self.active:
            self._prev = self.vl.enabled
            self.vl.enabled = False
        return self.vl

    def __exit__(self, *exc):
        if self.vl is not None and self._prev is not None:
            self.vl.enabled = self._prev
        return False
