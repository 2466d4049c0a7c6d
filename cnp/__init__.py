"""CNP: Concept-aware Network Pruning, the runnable companion to the paper.

The package is layered like the paper's pipeline (bottom to top):

``cnp.io`` / ``cnp.runtime``
    atomic writes, hashing, safe loading, seeding, devices.
``cnp.data`` / ``cnp.models``
    the embedded watermark benchmark, the ImageNet path, VGG-16 with torchvision's layer names.
``cnp.pretrain`` / ``cnp.warmup`` / ``cnp.evaluate``
    backbone pretraining, the paper's binary warm-up, subgroup evaluation.
``cnp.lrp``
    LRP relevance, DRSA context vectors and per-filter relevance on zennit.
``cnp.drsa`` / ``cnp.virtual_layer`` / ``cnp.concepts``
    stage 1 (augment) and stage 2 (ablate): subspaces U_k, the virtual concept layer,
    concept relevance R(k), latent analysis and subspace heatmaps.
``cnp.pruning``
    stage 3 (prune): LRP filter ranking, structural removal, the iterative schedule.
``cnp.figures`` / ``cnp.widgets`` / ``cnp.sweep``
    the paper's figures, the live ablation widget, papermill sweeps.
"""

from cnp.io import CNPError

__all__ = ["CNPError", "__version__"]
__version__ = "0.3.0"
