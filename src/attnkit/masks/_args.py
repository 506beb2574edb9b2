"""Argument checks shared by the mask factories."""

from __future__ import annotations


def int_arg(name: str, value: object, minimum: int) -> int:
    """``value`` as an int ``>= minimum``; TypeError for non-ints (bools included), ValueError below it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
