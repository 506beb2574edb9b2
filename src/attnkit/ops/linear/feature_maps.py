"""Feature maps phi for kernelized (linear) attention.

"Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", arXiv 2006.16236
(elu+1); ReLU as in L2ViT (arXiv 2501.16182); softmax over the feature axis as in
"Efficient Attention" / fla's ``feature_map="softmax"``.

A feature map acts on the last axis of a heads-last tensor ``(B, N, H, D) -> (B, N, H, Dphi)``;
the built-in ones keep ``Dphi == D``. A user callable may change the width (polynomial features).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

FeatureMap = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1``: strictly positive, the Katharopoulos et al. choice."""
    return F.elu(x) + 1.0


def relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU: non-negative, can give all-zero rows (their normalized output is 0, never NaN)."""
    return F.relu(x)


def softmax_features(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the feature axis, computed in at least fp32."""
    dt = torch.promote_types(x.dtype, torch.float32)
    return torch.softmax(x.to(dt), dim=-1).to(x.dtype)


FEATURE_MAPS: dict[str, FeatureMap] = {
    "identity": identity,
    "elu+1": elu_plus_one,
    "elu1": elu_plus_one,
    "relu": relu,
    "softmax": softmax_features,
}


def resolve_feature_map(feature_map: str | FeatureMap) -> tuple[str, FeatureMap]:
    """Return ``(name, fn)`` for a feature-map name or callable; unknown names raise ValueError."""
    if callable(feature_map):
        return getattr(feature_map, "__name__", "callable"), feature_map
    if not isinstance(feature_map, str):
        raise TypeError(f"feature_map must be a name or a callable, got {type(feature_map).__name__}")
    try:
        return feature_map, FEATURE_MAPS[feature_map]
    except KeyError:
        raise ValueError(
            f"unknown feature_map {feature_map!r}; valid: {', '.join(FEATURE_MAPS)} or a callable"
        ) from None
