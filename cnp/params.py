"""Method settings of the embedded benchmark (no torch needed: the sweep and notebooks read it).

The :class:`cnp.pipeline.Params` defaults are the paper's method (Appendix A). Where the embedded
benchmark needs other method settings, they are here, in one place, and the notebooks'
parameters cells and every preset on the embedded benchmark use them.
"""

from __future__ import annotations

from typing import Any

#: The embedded benchmark's method settings where they differ from the paper's (the ``Params``
#: defaults), used by the notebooks' parameters cells and every preset on the embedded benchmark:
#: K = 8 subspaces of the 128-channel conv4_3 (chosen among Table 1's values on validation; the
#: paper: K = 4 of VGG-16's 512 channels) and the pruning rate counted over the prunable filters
#: (80 % of all filters, the paper's basis, is 91 % of the prunable ones, which leaves this
#: network - 4x narrower than VGG-16 - as a constant classifier).
BENCHMARK_DEFAULTS: dict[str, Any] = {"K": 8, "rate_of": "prunable"}

#: Parameters added after runs were first recorded, with the default that reproduces what those
#: runs did: at this value they are left out of every key (stage caches, the sweep's up-to-date
#: check), so runs recorded before the parameter existed stay valid; any other value is keyed.
KEY_NEUTRAL_DEFAULTS: dict[str, Any] = {"rr_lambda": 1.0}


def key_dict(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` (a ``Params.to_dict()``) without the :data:`KEY_NEUTRAL_DEFAULTS` at their default."""
    return {k: v for k, v in params.items() if not (k in KEY_NEUTRAL_DEFAULTS and v == KEY_NEUTRAL_DEFAULTS[k])}


__all__ = ["BENCHMARK_DEFAULTS", "KEY_NEUTRAL_DEFAULTS", "key_dict"]
