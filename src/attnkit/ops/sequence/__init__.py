"""Sequence-mechanism ops that fit no other family, one file each (see each file's paper)."""

from attnkit.ops.sequence.minimal import minimal_attention, minimal_scores

__all__ = ["minimal_attention", "minimal_scores"]
