"""``attnkit.analysis``: capture attention maps from a model, explain, diagnose and intervene.

* :func:`capture` records probabilities (or O(N·H) reductions of them) from attnkit modules, transformers
  models and timm ViTs; :func:`attention_layers` lists the layers it can record.
* :mod:`~attnkit.analysis.explain_maps`: :func:`rollout`, :func:`flow`, VL-SAM flow, cross-attention saliency,
  CARVE contrast.
* :mod:`~attnkit.analysis.diagnostics`: sinks and VAR, entropy, head metrics, WAAD/FAI, FuseMax pass bounds.
* :mod:`~attnkit.analysis.interventions`: token pruning/selection/merging and attention edits
  (:func:`edit_attention`).
* :mod:`~attnkit.analysis.plots`: PNG heatmaps, rollout pictures, sink bar charts.

Every function takes per-layer probabilities ``(B, H, Nq, Nk)``; ``maps`` is a list of them, first layer first.
"""

from attnkit.analysis.capture import KEEP, AttentionMaps, attention_layers, capture
from attnkit.analysis.diagnostics import (
    attention_entropy,
    attention_strength,
    fai,
    fusemax_passes,
    head_importance,
    mean_attention_distance,
    sink_scores,
    sink_share,
    var_redistribute,
    waad,
)
from attnkit.analysis.explain_maps import (
    carve_contrast,
    cross_attention_saliency,
    flow,
    rollout,
    vlsam_flow,
    vlsam_head_weights,
)
from attnkit.analysis.interventions import (
    cls_prune,
    edit_attention,
    fastv_prune,
    merge_tokens,
    unmerge_tokens,
    zerotuning_scale,
)

__all__ = [
    "KEEP", "AttentionMaps", "attention_entropy", "attention_layers", "attention_strength", "capture",
    "carve_contrast", "cls_prune", "cross_attention_saliency", "edit_attention", "fai", "fastv_prune", "flow",
    "fusemax_passes", "head_importance", "mean_attention_distance", "merge_tokens", "rollout", "sink_scores",
    "sink_share", "unmerge_tokens", "var_redistribute", "vlsam_flow", "vlsam_head_weights", "waad",
    "zerotuning_scale",
]
