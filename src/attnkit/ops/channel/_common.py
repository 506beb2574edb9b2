"""Checks shared by the channel-family ops (CNN maps ``(B, C, H, W)``)."""

from __future__ import annotations

import torch

from attnkit.registry import check_input


def check_map(op: str, x: object, name: str = "x") -> torch.Tensor:
    """``x`` as a non-empty floating ``(B, C, H, W)`` tensor, else TypeError / ValueError naming ``op``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor (B, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{op}: {name} must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{op}: {name} has an empty dimension in shape {tuple(x.shape)}")
    return x


def check_param(op: str, name: str, t: object, shape: tuple[int, ...], *, optional: bool = False
                ) -> torch.Tensor | None:
    """A parameter tensor of exactly ``shape`` (None allowed if ``optional``)."""
    if t is None and optional:
        return None
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor of shape {shape}, got "
                        f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """Pooled statistics and gates are computed in float32 for half inputs (float64 stays float64)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def check_channels_first(module: object, x: object, channels: int | None, *, meta: str | None = None
                         ) -> torch.Tensor:
    """A CNN block's input check: ``(B, C, H, W)`` with ``C = channels``; a channels-last ``(B, H, W, C)`` map
    (``C`` last and not second) is named as such, with the permute that fixes it."""
    who = module if isinstance(module, str) else type(module).__name__
    if (isinstance(x, torch.Tensor) and x.dim() == 4 and channels is not None and x.shape[1] != channels
            and x.shape[3] == channels):
        raise ValueError(f"{who}: x must be channels-first (B, C={channels}, H, W), got shape {tuple(x.shape)}, "
                         f"which looks channels-last (B, H, W, C); pass x.permute(0, 3, 1, 2)")
    return check_input(module, x, "(B, C, H, W)", channels=channels, meta=meta)


def check_channels_last(module: object, x: object, channels: int, layout: str = "(B, Y, X, C)", *,
                        meta: str | None = None) -> torch.Tensor:
    """A token mixer's input check: channels-last ``layout``; a channels-first ``(B, C, Y, X)`` map (``C`` second
    and not last) is named as such, with the permute that fixes it."""
    who = module if isinstance(module, str) else type(module).__name__
    rank = len(layout.split(","))
    if (isinstance(x, torch.Tensor) and x.dim() == rank and x.shape[-1] != channels and x.shape[1] == channels):
        perm = ", ".join(["0", *map(str, range(2, rank)), "1"])
        raise ValueError(f"{who}: x must be channels-last {layout.replace('C', f'C={channels}', 1)}, got shape "
                         f"{tuple(x.shape)}, which looks channels-first (B, C, ...); pass x.permute({perm})")
    return check_input(module, x, layout, channels=channels, meta=meta)
