"""Sequence-mechanism ops that fit no other family, one file each (see each file's paper).

Importing this package registers each op for ``ak.explain``.
"""

from attnkit.ops.sequence.bam import bam_attention, bam_gates
from attnkit.ops.sequence.combiner import combiner_attention, combiner_density
from attnkit.ops.sequence.deconstructed import deconstructed_attention
from attnkit.ops.sequence.dsf import (
    DSF,
    dsf_from_gated_rnn,
    dsf_from_linear_attention,
    dsf_from_s6,
    dsf_matrix,
    dsf_scan,
    run_dsf,
)
from attnkit.ops.sequence.embed_pool import latent_attention_pool, layer_states
from attnkit.ops.sequence.got import GoTRoute, got_route, moe_experts
from attnkit.ops.sequence.hierarchical import (
    Hierarchy,
    build_hierarchy,
    hierarchical_attention,
    hierarchical_density,
    uniform_hierarchy,
)
from attnkit.ops.sequence.hybrid_spec import HybridSpec, hybrid_stack, hydra_spec, sala_spec
from attnkit.ops.sequence.kat import kat_attention
from attnkit.ops.sequence.llama_vit import soft_causal_attention, soft_mask_alpha
from attnkit.ops.sequence.minimal import minimal_attention, minimal_scores
from attnkit.ops.sequence.pointer import pointed_mask, pointer_attention
from attnkit.ops.sequence.prompt import prompt_attention, tcpa_prompt_mask
from attnkit.ops.sequence.se_rope import grid_coords, laplacian_coords, se_angles, se_attention, se_rotate
from attnkit.ops.sequence.spatial_mamba import spatial_mamba_fusion

__all__ = [
    "DSF",
    "GoTRoute",
    "Hierarchy",
    "HybridSpec",
    "bam_attention",
    "bam_gates",
    "build_hierarchy",
    "combiner_attention",
    "combiner_density",
    "deconstructed_attention",
    "dsf_from_gated_rnn",
    "dsf_from_linear_attention",
    "dsf_from_s6",
    "dsf_matrix",
    "dsf_scan",
    "got_route",
    "grid_coords",
    "hierarchical_attention",
    "hierarchical_density",
    "hybrid_stack",
    "hydra_spec",
    "kat_attention",
    "laplacian_coords",
    "latent_attention_pool",
    "layer_states",
    "minimal_attention",
    "minimal_scores",
    "moe_experts",
    "pointed_mask",
    "pointer_attention",
    "prompt_attention",
    "run_dsf",
    "sala_spec",
    "se_angles",
    "se_attention",
    "se_rotate",
    "soft_causal_attention",
    "soft_mask_alpha",
    "spatial_mamba_fusion",
    "tcpa_prompt_mask",
    "uniform_hierarchy",
]
