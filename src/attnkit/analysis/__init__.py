"""``attnkit.analysis``: capture attention maps from a model, explain, diagnose and intervene."""

from attnkit.analysis.capture import KEEP, AttentionMaps, attention_layers, capture

__all__ = ["KEEP", "AttentionMaps", "attention_layers", "capture"]
