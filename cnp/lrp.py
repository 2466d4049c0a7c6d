"""LRP relevance on zennit 0.5.1: composites, context vectors at a layer, per-filter relevance.

Rules (the paper's setting by default, :class:`LRPConfig`)
-----------------------------------------------------------
* convolutions: LRP-alpha1beta0 with an epsilon *stabiliser* (``variant='alpha1beta0'``, the
  paper's choice), or LRP-epsilon (``'epsilon'``) or LRP-gamma (``'gamma'``) from Table 1;
* the first convolution: ZBox with the normalised pixel bounds (``first_layer='zbox'``);
* linear layers: LRP-epsilon (``linear_epsilon``);
* average pooling: ``Norm``; ReLU: ``Pass``; max pooling and dropout: their gradient
  (winner-take-all, identity);
* per-layer overrides by name (``overrides={'conv5_3': 'epsilon:0.25'}``).

Bias handling: every rule is built with ``zero_params='bias'`` (``zero_bias=True``), i.e.
biases take no relevance and the whole logit ``f_c(x)`` (bias included) is redistributed to the
inputs. The relevance at every layer therefore sums to the logit up to the stabiliser's error.

Context vectors
---------------
DRSA needs, at the chosen layer, the activations ``a`` and the LRP *context* ``c`` with
``R = a * c``. ``c`` is not computed as ``R / a`` (undefined where ``a = 0``, and a mixing
subspace basis needs ``c`` there too). Instead a :class:`ContextSite` module is placed after the
layer, and the rule of the first LRP-ruled module downstream of it (``conv5_1`` for
``relu4_3``; max pooling in between just routes its gradient) is wrapped in
:class:`ContextHook`, which returns the rule's *pre-multiplication gradient* (the quantity the
rule would multiply by its input) instead of relevance. The site receives ``c`` directly,
maps it through its own linear map (identity for a probe, the projection for the virtual
concept layer, see :mod:`cnp.virtual_layer`) and hands ``R = a * c`` on upstream. For rules whose
input modifiers are positively homogeneous (alpha-beta, epsilon, gamma), ``x * context`` equals
the rule's relevance exactly, so nothing changes for the layers below.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from zennit.composites import Composite
from zennit.core import BasicHook, Hook, ParamMod
from zennit.layer import Sum
from zennit.rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, ZBox, ZPlus

from cnp.images import input_bounds
from cnp.io import CNPError
from cnp.models import get_layer, resolve_layer_name

VARIANTS = ("alpha1beta0", "epsilon", "gamma")


@dataclass(frozen=True)
class LRPConfig:
    """Which LRP rules go where.

    Parameters
    ----------
    variant : str
        Rule of the convolutions: ``alpha1beta0`` (the paper), ``epsilon`` or ``gamma``.
    stabilizer : float
        Epsilon stabiliser of alpha1beta0 / gamma denominators.
    epsilon : float
        The epsilon of the ``epsilon`` variant.
    gamma : float
        The gamma of the ``gamma`` variant.
    linear_epsilon : float
        Epsilon of the linear layers.
    first_layer : str
        ``zbox`` (pixel-bounded input), ``flat`` or ``same`` (the conv variant).
    overrides : mapping of layer name to rule spec
        e.g. ``{'conv5_3': 'epsilon:0.25', 'conv1_1': 'flat'}``; specs: ``alpha1beta0``,
        ``alpha2beta1``, ``epsilon[:eps]``, ``gamma[:g]``, ``zbox``, ``flat``, ``norm``, ``pass``.
    zero_bias : bool
        Biases receive no relevance (see the module docstring).
    """

    variant: str = "alpha1beta0"
    stabilizer: float = 1e-6
    epsilon: float = 0.1
    gamma: float = 0.25
    linear_epsilon: float = 1e-6
    first_layer: str = "zbox"
    overrides: Mapping[str, str] = field(default_factory=dict)
    zero_bias: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise CNPError(f"unknown LRP variant {self.variant!r}; use one of {VARIANTS}")
        if self.first_layer not in ("zbox", "flat", "same"):
            raise CNPError(f"first_layer must be 'zbox', 'flat' or 'same', got {self.first_layer!r}")
        for spec in dict(self.overrides).values():
            _parse_spec(spec)


def _parse_spec(spec: str) -> tuple[str, float | None]:
    name, _, arg = str(spec).partition(":")
    name = name.strip().lower()
    if name not in ("alpha1beta0", "alpha2beta1", "zplus", "epsilon", "gamma", "zbox", "flat", "norm", "pass"):
        raise CNPError(f"unknown LRP rule spec {spec!r}; use alpha1beta0, alpha2beta1, epsilon[:eps], "
                       "gamma[:g], zbox, flat, norm or pass")
    try:
        value = float(arg) if arg else None
    except ValueError as exc:
        raise CNPError(f"bad number in LRP rule spec {spec!r}") from exc
    return name, value


def _shift_away_from_zero(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """zennit's default stabiliser (:func:`zennit.core.stabilize` without clipping or scaling),
    ``z + epsilon * s`` with ``s = +1`` where ``z >= 0`` (zero counted positive) and ``-1`` where
    ``z < 0``, in three passes over ``z`` instead of six. The same numbers to the bit: both add
    ``+-epsilon`` rounded to ``z``'s dtype (a NaN stays NaN)."""
    eps = torch.tensor(epsilon, dtype=z.dtype, device=z.device)
    return z + torch.where(z >= 0, eps, -eps)


class NonNegativeZPlus(ZPlus):
    """zennit's :class:`~zennit.rules.ZPlus` that skips the negative-input term where a layer's
    input has no negative entry (every layer after a ReLU, i.e. all but the first).

    ZPlus sums two modified passes, ``x+`` through the positive weights and ``x-`` through the
    negative ones (bias zero). With ``x >= 0`` the second input is all zeros: its output, and its
    contribution to the denominator and to the relevance, are exactly zero. Computing the first
    pass alone gives the same relevance to the bit in half the convolutions. An input with a
    negative entry takes ZPlus's own two passes.
    """

    def __init__(self, stabilizer=1e-6, zero_params=None):
        super().__init__(stabilizer=stabilizer, zero_params=zero_params)
        # a plain epsilon: the stabiliser is computed by _shift_away_from_zero (same numbers)
        self._epsilon = float(stabilizer) if isinstance(stabilizer, int | float) else None

    def backward(self, module, grad_input, grad_output):
        original = self.stored_tensors["input"][0]
        if bool((original < 0).any()):
            return super().backward(module, grad_input, grad_output)
        x = original.clamp(min=0).requires_grad_()  # ZPlus's first input modifier
        with ParamMod.ensure(self.param_modifiers[0])(module) as modified, torch.autograd.enable_grad():
            out = self.output_modifiers[0](modified.forward(x))
        if self._epsilon is not None and not grad_output[0].requires_grad:
            grad_out = grad_output[0] / _shift_away_from_zero(out.detach(), self._epsilon)
        else:
            grad_out = self.gradient_mapper(grad_output[0], [out])[0]
        (grad,) = torch.autograd.grad((out,), (x,), grad_outputs=(grad_out,), create_graph=grad_output[0].requires_grad)
        relevance = x * grad
        return tuple(relevance if original.shape == relevance.shape else None for original in grad_input)

    def copy(self):
        hook = super().copy()
        hook._epsilon = self._epsilon
        return hook


def make_rule(spec: str, cfg: LRPConfig, device=None, bounds=None) -> Hook:
    """A zennit rule from a spec string (see :class:`LRPConfig`).

    ``bounds``: ``(low, high)`` input bounds of the ``zbox`` rule (tensors broadcastable to the
    input); default: the pixel range 0..1 after ImageNet normalisation.
    """
    name, value = _parse_spec(spec)
    zp = "bias" if cfg.zero_bias else None
    if name in ("alpha1beta0", "zplus"):
        # zennit's ZPlus is AlphaBeta(alpha=1, beta=0) without the beta terms: AlphaBeta computes
        # four modified forward/backward passes per layer and multiplies two of them by beta = 0;
        # ZPlus computes the other two with the same arithmetic (identical relevance, to the
        # bit, for finite values) in about half the time.
        return NonNegativeZPlus(stabilizer=cfg.stabilizer, zero_params=zp)
    if name == "alpha2beta1":
        return AlphaBeta(alpha=2.0, beta=1.0, stabilizer=cfg.stabilizer, zero_params=zp)
    if name == "epsilon":
        return Epsilon(epsilon=cfg.epsilon if value is None else value, zero_params=zp)
    if name == "gamma":
        return Gamma(gamma=cfg.gamma if value is None else value, stabilizer=cfg.stabilizer, zero_params=zp)
    if name == "zbox":
        low, high = input_bounds(device) if bounds is None else (torch.as_tensor(b, device=device) for b in bounds)
        return ZBox(low=low, high=high, stabilizer=cfg.stabilizer, zero_params=zp)
    if name == "flat":
        return Flat(stabilizer=cfg.stabilizer, zero_params=zp)
    if name == "norm":
        return Norm(stabilizer=cfg.stabilizer)
    return Pass()


# ============================================================================ context sites
class ContextHook(BasicHook):
    """A rule that returns its pre-multiplication gradient (the LRP context) instead of relevance.

    Wraps a :class:`zennit.core.BasicHook` rule. The context is the rule's reducer applied to
    input *indicators* ``in_mod(s) / s`` (``s = sign(x)``, zero counted as positive) instead of
    the modified inputs; for positively homogeneous input modifiers ``x * context`` is exactly
    the rule's relevance.
    """

    @classmethod
    def wrap(cls, rule: BasicHook) -> ContextHook:
        if not isinstance(rule, BasicHook) or isinstance(rule, (Flat, ZBox)):
            raise CNPError(
                f"the first LRP rule downstream of a DRSA layer must be alpha-beta, epsilon or gamma "
                f"to give context vectors, got {type(rule).__name__}; choose another layer or override"
            )
        hook = cls.__new__(cls)
        BasicHook.__init__(hook, rule.input_modifiers, rule.param_modifiers, rule.output_modifiers,
                           rule.gradient_mapper, rule.reducer)
        return hook

    def backward(self, module, grad_input, grad_output):
        original_input = self.stored_tensors["input"][0].clone()
        inputs, outputs = [], []
        for in_mod, param_mod, out_mod in zip(self.input_modifiers, self.param_modifiers, self.output_modifiers):
            inp = in_mod(original_input).requires_grad_()
            with ParamMod.ensure(param_mod)(module) as modified, torch.autograd.enable_grad():
                out = out_mod(modified.forward(inp))
            inputs.append(inp)
            outputs.append(out)
        grad_outputs = self.gradient_mapper(grad_output[0], outputs)
        gradients = torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs,
                                        create_graph=grad_output[0].requires_grad, allow_unused=True)
        gradients = [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, gradients)]
        # zero (and float noise around it, e.g. a' = P a where a = 0) counts as positive
        scale = original_input.detach().flatten(1).abs().amax(1).clamp(min=1e-30)
        tiny = (1e-6 * scale).view(-1, *([1] * (original_input.ndim - 1)))
        s = torch.where(original_input >= -tiny, torch.ones_like(original_input), -torch.ones_like(original_input))
        indicators = [in_mod(s) / s for in_mod in self.input_modifiers]
        context = self.reducer(indicators, gradients)
        return tuple(context if orig.shape == context.shape else None for orig in grad_input)

    def copy(self):
        return ContextHook.wrap(self)


class _SiteHook(Hook):
    """zennit hook of a :class:`ContextSite`: receives the context, returns relevance."""

    def forward(self, module, input, output):
        self.stored_tensors["input"] = input

    def backward(self, module, grad_input, grad_output):
        a = self.stored_tensors["input"][0]
        c_out = grad_output[0]
        c_in = module.context_backward(a, c_out)
        module.record(a, c_out, c_in)
        return (a * c_in,)

    def copy(self):
        return _SiteHook()


class ContextSite(nn.Module):
    """A linear map placed after a layer, through which LRP passes *contexts*.

    The base class is the identity (a *probe*: it records the activations ``a`` and contexts
    ``c`` at its layer during :meth:`LRP.attribute`). :class:`cnp.virtual_layer.VirtualLayer`
    subclasses it. Attach with :func:`attach_site`; while ``enabled`` is False the site is
    skipped (the network is as if it were absent).

    Attributes set by the last LRP pass: ``last_a`` and ``last_c`` (when ``keep_tensors``),
    ``last_layer_relevance`` (per-sample sum of ``a * c_in``), ``last_output_relevance``
    (per-sample sum of ``site(a) * c_out``).
    """

    site_attr = "cnp_context_site"

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self.keep_tensors = False
        object.__setattr__(self, "_host", None)
        self._handle = None
        self.layer_name: str | None = None
        self.clear()

    def clear(self) -> None:
        self.last_a = None
        self.last_c = None
        self.last_layer_relevance = None
        self.last_output_relevance = None

    # ---- map and its context transpose (override in subclasses)
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a

    def context_backward(self, a: torch.Tensor, c_out: torch.Tensor) -> torch.Tensor:
        return c_out

    def record(self, a: torch.Tensor, c_out: torch.Tensor, c_in: torch.Tensor) -> None:
        dims = tuple(range(1, a.ndim))
        self.last_layer_relevance = (a * c_in).sum(dims).detach()
        with torch.no_grad():
            self.last_output_relevance = (self.forward(a) * c_out).sum(dims).detach()
        if self.keep_tensors:
            self.last_a = a.detach()
            self.last_c = c_out.detach()

    def lrp_hook(self) -> Hook:
        return _SiteHook()

    # ---- attachment
    def _forward_hook(self, module, inputs, output):
        return self(output) if self.enabled else output

    def reattach(self) -> None:
        """Re-register the host hook so it runs after any hooks registered since (zennit's)."""
        if self._host is not None and self._handle is not None:
            self._handle.remove()
            self._handle = self._host.register_forward_hook(self._forward_hook)

    def detach_from(self, model: nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if getattr(model, self.site_attr, None) is self:
            delattr(model, self.site_attr)
        object.__setattr__(self, "_host", None)


def attach_site(model: nn.Module, layer: str, site: ContextSite) -> ContextSite:
    """Place ``site`` after the output of ``layer`` (paper or qualified name).

    The site becomes the submodule ``model.<site.site_attr>`` (so ``.to(device)`` moves it and
    LRP composites see it) and runs through a forward hook on the layer; names of the original
    layers do not change. Only one site per attribute name may be attached.
    """
    host = get_layer(model, layer)
    existing = getattr(model, site.site_attr, None)
    if existing is not None:
        raise CNPError(f"the model already has a {site.site_attr}; remove it first")
    model.add_module(site.site_attr, site)
    object.__setattr__(site, "_host", host)  # a plain reference, not a submodule
    site.layer_name = resolve_layer_name(model, layer)
    site._handle = host.register_forward_hook(site._forward_hook)
    param = next(model.parameters(), None)
    if param is not None:
        site.to(param.device)
    return site


def find_sites(model: nn.Module) -> list[ContextSite]:
    return [m for m in model.modules() if isinstance(m, ContextSite)]


# ============================================================================ attribution
@dataclass
class Attribution:
    """Result of one LRP pass over a batch.

    Attributes
    ----------
    logits : torch.Tensor
        (n, classes).
    target_logit : torch.Tensor
        (n,) the explained logit ``f_c(x)`` (the relevance put at the top).
    input_relevance : torch.Tensor or None
        (n, C, H, W) relevance of the input pixels.
    filter_relevance : dict[str, torch.Tensor]
        Conv name -> (n, out_channels) relevance at the conv output summed over space.
    filter_relevance_abs : dict[str, torch.Tensor]
        Conv name -> (n, out_channels) ``|R|`` summed over space.
    layer_relevance : dict[str, torch.Tensor]
        Requested layer name -> relevance map at its output.
    """

    logits: torch.Tensor
    target_logit: torch.Tensor
    input_relevance: torch.Tensor | None
    filter_relevance: dict[str, torch.Tensor]
    filter_relevance_abs: dict[str, torch.Tensor]
    layer_relevance: dict[str, torch.Tensor]


def auto_canonizers(model: nn.Module) -> list:
    """zennit's canonizers for ``model``: what :class:`LRP` applies with ``canonizers='auto'``.

    A torchvision ResNet gets :class:`zennit.torchvision.ResNetCanonizer` (BatchNorm merged into
    the convolutions, the residual additions made explicit :class:`zennit.layer.Sum` modules); any
    other model with BatchNorm gets :class:`zennit.canonizers.SequentialMergeBatchNorm` (a
    BatchNorm registered right after a convolution or linear layer is merged into it, as in
    torchvision's ``vgg16_bn``); a model without BatchNorm (the paper's VGG-16) gets none.
    """
    from torchvision.models import ResNet
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer

    if isinstance(model, ResNet):
        return [ResNetCanonizer()]
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return [SequentialMergeBatchNorm()]
    return []


def _flat_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, list | tuple):
        return [t for o in obj for t in _flat_tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _flat_tensors(o)]
    return []


class _ForeignUse(torch.overrides.TorchFunctionMode):
    """Records tensor-producing torch calls outside leaf modules that read a followed tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        # id -> (tensor, site); the tensor is held so that its id is not reused during the pass
        self.followed: dict[int, tuple[torch.Tensor, ContextSite]] = {}
        self.foreign: list[tuple[str, ContextSite]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0 and self.followed and isinstance(out, torch.Tensor):
            for t in _flat_tensors((args, kwargs)):
                hit = self.followed.get(id(t))
                if hit is not None and hit[0] is t:
                    self.foreign.append((getattr(func, "__name__", str(func)), hit[1]))
                    break
        return out


def _trace(model: nn.Module, x: torch.Tensor, passthrough) -> tuple[list[nn.Module], dict[ContextSite, list[nn.Module]]]:
    """Leaf modules in call order, and the modules that read each context site's output.

    One forward pass on ``x[:1]``. A site's output is *followed* through modules that LRP passes
    by their gradient (``passthrough(module)`` is True: max pooling, dropout, merged BatchNorm, any
    module without a rule); the first other modules
    that read a followed tensor are the site's consumers. A followed tensor read by a torch
    function outside any module (e.g. a residual ``x + identity`` or ``torch.stack``) cannot carry
    contexts and raises :class:`CNPError`.
    """
    order: list[nn.Module] = []
    sites = find_sites(model)
    readers: dict[ContextSite, list[nn.Module]] = {s: [] for s in sites}
    mode = _ForeignUse()
    leaves = [m for m in model.modules() if len(list(m.children())) == 0 or isinstance(m, ContextSite)]

    def pre(mod, inp):
        order.append(mod)
        for t in _flat_tensors(inp):
            hit = mode.followed.get(id(t))
            if hit is not None and hit[0] is t:
                readers[hit[1]].append(mod)
                break
        mode.depth += 1

    def post(mod, inp, out):
        mode.depth -= 1
        if isinstance(mod, ContextSite):
            for t in _flat_tensors(out):
                mode.followed[id(t)] = (t, mod)
            return
        src = next((mode.followed[id(t)][1] for t in _flat_tensors(inp)
                    if id(t) in mode.followed and mode.followed[id(t)][0] is t), None)
        if src is not None and passthrough(mod):
            readers[src].remove(mod)
            for t in _flat_tensors(out):
                mode.followed[id(t)] = (t, src)

    handles = [m.register_forward_pre_hook(pre) for m in leaves]
    handles += [m.register_forward_hook(post) for m in leaves]
    # the function mode (Python on every torch call) only where a site's output must be followed
    watch = mode if sites else contextlib.nullcontext()
    try:
        with torch.no_grad(), watch:
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    if mode.foreign:
        func, site = mode.foreign[0]
        raise CNPError(
            f"the output of the concept layer at {site.layer_name!r} is also read by {func}() outside any "
            "module (e.g. a residual skip connection), where LRP cannot pass contexts; place the layer at "
            "the output of a stage whose next block starts with convolutions on every branch (e.g. "
            "'layer3' of a torchvision ResNet, 'relu4_3' of VGG-16)")
    return order, readers


class _RuleOnlyBackward(torch.autograd.Function):
    """A layer's output whose backward hands its input a zero gradient (no computation).

    zennit runs a layer's rule from a hook on the node of an identity placed before the layer:
    when the gradient reaches that node, the hook replaces it by the rule's relevance (computed
    from the layer's stored input and the gradient at its output). The gradient that autograd
    computed through the layer itself (for a convolution, a transposed convolution as costly as
    the forward pass) is thrown away there. This function stands in for the layer's own backward
    so that it is never computed: the relevance, and everything after it, is the same to the bit.
    """

    @staticmethod
    def forward(ctx, x, out):
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device
        return out

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros((), dtype=ctx.dtype, device=ctx.device).expand(ctx.shape), None


def _rule_only_backward(module, inputs, output):
    """Forward hook: ``output`` with :class:`_RuleOnlyBackward` as its gradient function (only
    where the layer's input needs a gradient; the rule's hook then supplies it)."""
    x = inputs[0] if inputs else None
    if not isinstance(x, torch.Tensor) or not x.requires_grad or not isinstance(output, torch.Tensor):
        return None
    return _RuleOnlyBackward.apply(x, output.detach())


class LRP:
    """LRP for a model, with rules from an :class:`LRPConfig`.

    Parameters
    ----------
    model : nn.Module
        A CNN of Conv2d / Linear / ReLU / pooling / BatchNorm layers (the paper's VGG-16,
        torchvision's VGG family with or without BatchNorm, ResNets); used in eval mode.
    config : LRPConfig
        Rules.
    canonizers : 'auto', None or list of zennit canonizers
        Applied for each pass and reverted after it. ``'auto'``: :func:`auto_canonizers`
        (BatchNorm merging; zennit's ResNet canonizer for torchvision ResNets).
    input_bounds : (low, high), optional
        Bounds of the normalised input for the first layer's ZBox rule, tensors broadcastable to
        the input (default: pixels 0..1 after ImageNet normalisation).

    Examples
    --------
    >>> lrp = LRP(model)                                   # doctest: +SKIP
    >>> out = lrp.attribute(x, target=1, filters=True)     # doctest: +SKIP
    >>> out.input_relevance.sum((1, 2, 3))  # ~= out.target_logit
    """

    def __init__(self, model: nn.Module, config: LRPConfig | None = None, *, canonizers="auto",
                 input_bounds=None) -> None:
        self.model = model
        self.config = config or LRPConfig()
        self.canonizers = canonizers
        self.input_bounds = input_bounds
        self._overrides = {resolve_layer_name(model, k): v for k, v in dict(self.config.overrides).items()}

    def _rule_for(self, name: str, module: nn.Module, first: nn.Module | None, device) -> Hook | None:
        cfg = self.config
        if isinstance(module, ContextSite):
            return module.lrp_hook()
        if name in self._overrides:
            spec = self._overrides[name]
            if _parse_spec(spec)[0] == "pass" and isinstance(module, nn.Conv2d | nn.Linear):
                raise CNPError(f"rule {spec!r} cannot be used on {name} ({type(module).__name__}): it changes "
                               "the number of channels; use alpha1beta0, epsilon, gamma, zbox or flat")
            return make_rule(spec, cfg, device, self.input_bounds)
        if isinstance(module, nn.Conv2d | nn.Linear) and module is first and cfg.first_layer != "same":
            return make_rule(cfg.first_layer, cfg, device, self.input_bounds)
        if isinstance(module, nn.Conv2d):
            return make_rule(cfg.variant, cfg, device)
        if isinstance(module, nn.Linear):
            return make_rule(f"epsilon:{cfg.linear_epsilon}", cfg, device)
        if isinstance(module, nn.AvgPool2d | nn.AdaptiveAvgPool2d | Sum):
            return Norm(stabilizer=cfg.stabilizer)
        if isinstance(module, nn.ReLU):
            return Pass()
        return None

    def attribute(
        self,
        x: torch.Tensor,
        target: int | torch.Tensor = 1,
        *,
        filters: bool | str = False,
        layers: Iterable[str] = (),
        input_relevance: bool = True,
    ) -> Attribution:
        """One LRP pass: relevance of ``f_target(x)`` at the input, conv filters and named layers.

        The top relevance is the logit itself (``R = f_c(x)`` at the output), so every layer's
        relevance sums to ``f_c(x)`` (conservation). Context sites attached to the model record
        their activations/contexts (see :class:`ContextSite`).

        ``filters``: ``True`` collects both per-filter sums (``filter_relevance`` and
        ``filter_relevance_abs``); ``'signed'`` or ``'abs'`` collects only that one (one pass
        over each conv's relevance instead of two; the ranking asks for the one it uses).
        """
        if filters not in (False, True, "signed", "abs"):
            raise CNPError(f"filters must be True, False, 'signed' or 'abs', got {filters!r}")
        want_signed = filters is True or filters == "signed"
        want_abs = filters is True or filters == "abs"
        model = self.model
        was_training = model.training
        model.eval()
        canonizers = [inst for c in self._canonizers() for inst in c.apply(model)]
        try:
            return self._attribute(x, target, filters, layers, input_relevance, want_signed, want_abs,
                                   was_training)
        finally:
            for inst in canonizers:
                inst.remove()

    def _canonizers(self) -> list:
        if isinstance(self.canonizers, str):
            if self.canonizers != "auto":
                raise CNPError(f"canonizers must be 'auto', None or a list of zennit canonizers, "
                               f"got {self.canonizers!r}")
            return auto_canonizers(self.model)
        return list(self.canonizers or [])

    def _attribute(self, x, target, filters, layers, input_relevance, want_signed, want_abs,
                   was_training) -> Attribution:
        model = self.model
        device = x.device
        named = {m: n for n, m in model.named_modules()}

        def passthrough(m):  # LRP passes these by their gradient (no rule)
            return not isinstance(m, ContextSite) and self._rule_for(named.get(m, ""), m, None, device) is None

        order, readers = _trace(model, x, passthrough)
        first = next((m for m in order if isinstance(m, nn.Conv2d | nn.Linear)), None)
        rules: dict[nn.Module, Hook | None] = {
            m: self._rule_for(named.get(m, ""), m, first, device) for m in set(order)
        }
        # every ruled module that reads an active site's output (through gradient-passing modules
        # such as max pooling) emits contexts; with several readers (e.g. the two branches of a
        # ResNet block) the site receives the sum of their contexts
        context_modules = set()
        for site, mods in readers.items():
            for m2 in mods:
                if isinstance(m2, ContextSite):
                    raise CNPError("two concept sites follow each other (e.g. contexts() on a model whose "
                                   "virtual layer is enabled at that layer): bypass or remove it first")
                if isinstance(m2, nn.ReLU):
                    raise CNPError("a ReLU follows the DRSA layer: place the concept layer after the "
                                   "activation (e.g. 'relu4_3'), not after the convolution")
                if not isinstance(rules.get(m2), BasicHook):
                    raise CNPError(f"the concept layer at {site.layer_name!r} is read by {named.get(m2, '?')} "
                                   f"({type(m2).__name__}), whose LRP rule cannot give context vectors; "
                                   "place the layer where convolutions, linear or pooling layers read it")
                context_modules.add(m2)

        def module_map(ctx, name, module):
            rule = rules.get(module)
            if rule is None:
                return None
            return ContextHook.wrap(rule) if module in context_modules else rule

        composite = Composite(module_map=module_map)
        layer_names = [resolve_layer_name(model, n) for n in layers]
        layer_mods = {resolve_layer_name(model, n): get_layer(model, n) for n in layers}
        store_filters: dict[str, torch.Tensor] = {}
        store_filters_abs: dict[str, torch.Tensor] = {}
        store_layers: dict[str, torch.Tensor] = {}
        handles = []

        def grad_hook_factory(name: str, conv: bool):
            def fwd(mod, inp, out):
                if out.requires_grad:
                    def on_grad(g):
                        if conv:
                            if want_signed:
                                store_filters[name] = g.detach().sum((2, 3))
                            if want_abs:
                                store_filters_abs[name] = g.detach().abs().sum((2, 3))
                        if name in layer_names:
                            store_layers[name] = g.detach()
                    out.register_hook(on_grad)
            return fwd

        sites = find_sites(model)
        # the first forward hooks of their layers (before zennit's and any a caller registered,
        # which then see this output; see _RuleOnlyBackward): the convolutions, linear layers
        # and ReLUs under a rule skip their own input gradient, which zennit's hook throws away
        skips = [m.register_forward_hook(_rule_only_backward, prepend=True) for m in set(order)
                 if (isinstance(m, nn.Conv2d | nn.Linear) and isinstance(rules.get(m), BasicHook))
                 or (isinstance(m, nn.ReLU) and isinstance(rules.get(m), Pass))]
        try:
            with composite.context(model):
                for n, m in model.named_modules():
                    is_conv = bool(filters) and isinstance(m, nn.Conv2d)
                    if is_conv or n in layer_mods:
                        handles.append(m.register_forward_hook(grad_hook_factory(n, is_conv)))
                for s in sites:  # after zennit's and the layer hooks: the site sees the layer's own output
                    s.clear()
                    s.reattach()
                try:
                    xin = x.detach().clone().requires_grad_(True)
                    with torch.enable_grad():
                        logits = model(xin)
                        if isinstance(target, int):
                            tgt = torch.full((x.shape[0],), target, dtype=torch.long, device=device)
                        else:
                            tgt = torch.as_tensor(target, device=device).long()
                        onehot = torch.zeros_like(logits).scatter_(1, tgt[:, None], 1.0)
                        top = (logits * onehot).detach()
                        (grad,) = torch.autograd.grad(logits, xin, grad_outputs=top)
                finally:
                    for h in handles:
                        h.remove()
        finally:
            for h in skips:
                h.remove()
        if was_training:
            model.train()
        return Attribution(
            logits=logits.detach(),
            target_logit=top.sum(1),
            input_relevance=grad.detach() if input_relevance else None,
            filter_relevance=store_filters,
            filter_relevance_abs=store_filters_abs,
            layer_relevance=store_layers,
        )


def contexts(model: nn.Module, x: torch.Tensor, layer: str = "relu4_3", target: int | torch.Tensor = 1,
             config: LRPConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, Attribution]:
    """Activations ``a`` and LRP contexts ``c`` (both (n, D, H, W)) at ``layer``, with ``R = a * c``.

    A probe :class:`ContextSite` is attached for the call and removed afterwards.
    """
    probe = ContextSite()
    probe.keep_tensors = True
    probe.site_attr = "cnp_context_probe"
    attach_site(model, layer, probe)
    try:
        out = LRP(model, config).attribute(x, target)
    finally:
        probe.detach_from(model)
    if probe.last_a is None:
        raise CNPError(f"layer {layer!r} was not reached in the forward pass")
    return probe.last_a, probe.last_c, out
