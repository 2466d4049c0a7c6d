"""CNP: Concept-aware Network Pruning, the runnable companion to the paper.

Apply CNP to your own model and data with the names below (importable as ``cnp.<name>``;
loaded on first use, so ``import cnp`` stays light). See :mod:`cnp.api` for a worked example.

Data
    ``as_split``, ``pair_data`` (your tensors, Dataset or DataLoader), ``folder_pair`` (two
    classes of an image folder, by manifest), ``example_folder``, ``benchmark_pair`` (the
    embedded watermark benchmark), ``Split``, ``PairData``.
Model
    ``backbone`` (torchvision weights by name or file, or an architecture pretrained on the
    embedded corpus), ``benchmark_backbone``.
Warm-up
    ``warm_up``: a new 2-way head on the frozen backbone (:func:`cnp.warmup.warmup`; the module
    ``cnp.warmup`` keeps its name).
Stage 1, augment
    ``fit_concepts``: DRSA concept subspaces U_k at a named layer; ``contexts``; ``LRP``,
    ``LRPConfig`` (zennit rules and canonizers).
Stage 2, ablate
    ``insert_virtual_layer``, ``VirtualLayer`` (the virtual concept layer, ablated set K'),
    ``remove_virtual_layer``, ``bypass``, ``concept_relevance`` (concept relevance R(k)),
    ``latent_analysis``, ``propose_ablation``, ``subspace_heatmaps``, ``KeptAblation``.
Stage 3, prune
    ``prune`` (the schedule for one method), ``run_pruning``, ``PruneConfig``, ``METHODS``,
    ``METHOD_SPECS``, ``filter_scores``, ``select_filters``, ``prunable_structure``.
Evaluation and export
    ``subgroup_accuracy`` (per subgroup c0w0, c0w1, c1w0, c1w1), ``wm_relevance_shares``,
    ``result_rows``, ``export_model``, ``load_exported``, ``read_export_info``.
Errors
    ``CNPError``: every bad input raises it, saying what is wrong and how to fix it.

The package is layered like the paper's pipeline (bottom to top): ``cnp.io`` / ``cnp.runtime``
(atomic writes, hashing, seeding), ``cnp.data`` / ``cnp.models``, ``cnp.pretrain`` /
``cnp.warmup`` / ``cnp.evaluate``, ``cnp.lrp``, ``cnp.drsa`` / ``cnp.virtual_layer`` /
``cnp.concepts``, ``cnp.pruning``, ``cnp.api``; above them the notebook pipeline
(``cnp.pipeline``), results, claims and figures, the widget and the sweep.
"""

from __future__ import annotations

import importlib

from cnp.io import CNPError

__version__ = "0.4.0"

_PUBLIC: dict[str, str] = {
    "as_split": "cnp.api", "pair_data": "cnp.api", "benchmark_pair": "cnp.api",
    "benchmark_backbone": "cnp.api", "prune": "cnp.api", "export_model": "cnp.api",
    "load_exported": "cnp.api", "read_export_info": "cnp.api", "folder_pair": "cnp.api",
    "example_folder": "cnp.api", "backbone": "cnp.api", "result_rows": "cnp.api",
    "Split": "cnp.data.splits", "PairData": "cnp.data.splits",
    "warm_up": "cnp.warmup",
    "fit_concepts": "cnp.concepts", "concept_relevance": "cnp.concepts", "latent_analysis": "cnp.concepts",
    "propose_ablation": "cnp.concepts", "subspace_heatmaps": "cnp.concepts",
    "LRP": "cnp.lrp", "LRPConfig": "cnp.lrp", "contexts": "cnp.lrp",
    "VirtualLayer": "cnp.virtual_layer", "insert_virtual_layer": "cnp.virtual_layer",
    "remove_virtual_layer": "cnp.virtual_layer", "bypass": "cnp.virtual_layer",
    "KeptAblation": "cnp.virtual_layer",
    "run_pruning": "cnp.pruning", "PruneConfig": "cnp.pruning", "METHODS": "cnp.pruning",
    "METHOD_SPECS": "cnp.pruning", "filter_scores": "cnp.pruning.ranking",
    "select_filters": "cnp.pruning.ranking", "prunable_structure": "cnp.pruning.structure",
    "subgroup_accuracy": "cnp.evaluate", "wm_relevance_shares": "cnp.evaluate",
}

_ALIASES = {"warm_up": "warmup"}

__all__ = ["CNPError", "__version__", *sorted(_PUBLIC)]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'cnp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
