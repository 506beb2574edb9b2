"""Sequence-mechanism ops that fit no other family, one file each (see each file's paper).

Importing this package registers each op for ``ak.explain``.
"""

from attnkit.ops.sequence.combiner import combiner_attention, combiner_density
from attnkit.ops.sequence.dsf import (
    DSF,
    dsf_from_gated_rnn,
    dsf_from_linear_attention,
    dsf_from_s6,
    dsf_matrix,
    dsf_scan,
    run_dsf,
)
from attnkit.ops.sequence.hierarchical import (
    Hierarchy,
    build_hierarchy,
    hierarchical_attention,
    hierarchical_density,
    uniform_hierarchy,
)
from attnkit.ops.sequence.llama_vit import soft_causal_attention, soft_mask_alpha
from attnkit.ops.sequence.minimal import minimal_attention, minimal_scores

__all__ = [
    "DSF",
    "Hierarchy",
    "build_hierarchy",
    "combiner_attention",
    "combiner_density",
    "dsf_from_gated_rnn",
    "dsf_from_linear_attention",
    "dsf_from_s6",
    "dsf_matrix",
    "dsf_scan",
    "hierarchical_attention",
    "hierarchical_density",
    "minimal_attention",
    "minimal_scores",
    "run_dsf",
    "soft_causal_attention",
    "soft_mask_alpha",
    "uniform_hierarchy",
]
