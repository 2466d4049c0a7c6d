"""Stage 3 of the paper: LRP filter ranking, structural removal and the iterative schedule."""

from cnp.pruning.penalty import ConceptPenalty
from cnp.pruning.ranking import (
    filter_scores,
    l1_filter_scores,
    lrp_filter_scores,
    normalise_per_layer,
    select_filters,
)
from cnp.pruning.schedule import (
    METHOD_SPECS,
    METHODS,
    Method,
    PruneConfig,
    PruneResult,
    run_pruning,
)
from cnp.pruning.surgery import mask_filters, remove_filters

__all__ = [
    "METHODS", "METHOD_SPECS", "ConceptPenalty", "Method", "PruneConfig", "PruneResult", "filter_scores", "l1_filter_scores", "lrp_filter_scores",
    "mask_filters", "normalise_per_layer", "remove_filters", "run_pruning", "select_filters",
]
