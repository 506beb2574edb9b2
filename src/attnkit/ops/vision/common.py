"""Input checks shared by the vision token-mixer ops and modules (channels-last images)."""

from __future__ import annotations

import torch

from attnkit._validate import check_tensor


def check_image(fn: str, name: str, x: object, *, rank: int = 4, layout: str = "(B, Y, X, C)") -> torch.Tensor:
    """``x`` as a non-empty floating tensor of ``rank`` dims; errors name ``fn``, ``name`` and ``layout``."""
    try:
        x = check_tensor(name, x)
    except TypeError as e:
        raise TypeError(f"{fn}: {e}") from None
    if x.dim() != rank:
        raise ValueError(f"{fn}: {name} must be {layout}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{fn}: {name} has an empty dimension: shape {tuple(x.shape)}")
    return x


def channels_last_hint(who: str, x: object, dim: int) -> None:
    """Raise a ``ValueError`` naming ``who`` when ``x`` looks channels-first ``(B, C, Y, X)`` with ``C = dim``.

    Only detectable when the last extent differs from ``dim`` and the second one equals it; anything
    else is left to the module's own layout check.
    """
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[-1] != dim and x.shape[1] == dim:
        raise ValueError(f"{who}: x must be channels-last (B, Y, X, C={dim}), got shape {tuple(x.shape)}, which "
                         f"looks channels-first (B, C, Y, X); pass x.permute(0, 2, 3, 1)")
