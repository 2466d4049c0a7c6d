"""Concept-penalised fine-tuning: a penalty on the model's use of the ablated subspaces.

In the spirit of Right for the Right Reasons (Ross et al., 2017) and RR-ClArC (Dreyer et al.,
2023), which penalise the gradient of the output along a concept direction, the fine-tunes of the
``cnp-rr`` method add

    lambda * mean_n  ||W^T g_n||^2 / ||g_n||^2,   g_n = d(z_1 - z_0)(x_n) / d a,

to the cross-entropy, where ``a`` is the activation at the DRSA layer (e.g. ``relu4_3``, all
positions), ``W = U_K'`` the ablated subspaces' bases and ``z_1 - z_0`` the positive-class logit
margin. The ratio is the share of the margin's gradient energy that lies in the ablated
subspaces: 0 when the output does not react to them, 1 when it reacts to nothing else, so
``lambda`` weighs it against the cross-entropy independently of the gradient's scale. It needs
only ``U`` and unlabelled images, no watermark labels (the paper's footnote 2). The gradient is
taken with ``create_graph=True`` so the penalty trains the weights above the layer (a double
backward pass, about twice the cost of a plain step there).
"""

from __future__ import annotations

import torch
from torch import nn

from cnp.io import CNPError
from cnp.models import get_layer


class ConceptPenalty:
    """Callable ``(model, x) -> (logits, penalty)`` for :func:`cnp.training.train_epoch`.

    Parameters
    ----------
    W : torch.Tensor
        (D, r) orthonormal bases of the penalised subspaces at ``layer``.
    layer : str
        The layer whose output ``a`` the subspaces live in (paper or qualified name).
    weight : float
        ``lambda``; 0 disables the penalty (and its double backward).
    eps : float
        Guards the ratio for an image whose margin has no gradient at the layer.
    """

    def __init__(self, W: torch.Tensor, layer: str, weight: float = 1.0, eps: float = 1e-12) -> None:
        if W.ndim != 2 or W.shape[1] == 0:
            raise CNPError(f"W must be D x r with r > 0 (the ablated subspaces' bases), got {tuple(W.shape)}")
        if weight < 0:
            raise CNPError(f"the penalty weight lambda must be >= 0, got {weight}")
        self.W = W.detach().float()
        self.layer = layer
        self.weight = float(weight)
        self.eps = eps

    def __call__(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of ``model`` on ``x`` and the (unweighted) penalty, both differentiable."""
        store: dict[str, torch.Tensor] = {}

        def hook(_module, _inputs, output):
            store["a"] = output

        handle = get_layer(model, self.layer).register_forward_hook(hook)
        try:
            logits = model(x)
        finally:
            handle.remove()
        if "a" not in store:
            raise CNPError(f"the layer {self.layer!r} did not run in the model's forward pass")
        return logits, self.value(logits, store["a"])

    def value(self, logits: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The penalty for logits computed from activations ``a`` (the graph must connect them)."""
        if logits.ndim != 2 or logits.shape[1] != 2:
            raise CNPError(f"the concept penalty is defined for a binary task (logits n x 2), got {tuple(logits.shape)}")
        margin = (logits[:, 1] - logits[:, 0]).sum()
        (g,) = torch.autograd.grad(margin, a, create_graph=True)
        W = self.W.to(g)
        if W.shape[0] != g.shape[1]:
            raise CNPError(f"the penalised subspaces have D = {W.shape[0]} but {self.layer} has {g.shape[1]} channels")
        proj = torch.einsum("dr,nd...->nr...", W, g)
        inside = proj.pow(2).flatten(1).sum(1)
        total = g.pow(2).flatten(1).sum(1)
        return (inside / (total + self.eps)).mean()


__all__ = ["ConceptPenalty"]
