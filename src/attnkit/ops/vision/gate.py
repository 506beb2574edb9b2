"""Squeeze-and-excitation channel gate on a channels-last image (HAT's channel attention).

"Activating More Pixels in Image Super-Resolution Transformer" (HAT), arXiv 2205.04437 (CVPR 2023), §3.2:
the channel attention block ends with ``y * sigmoid(W2 relu(W1 mean_{Y,X}(y) + b1) + b2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.vision.common import check_image
from attnkit.reference.naive_vision import naive_channel_gate


@dataclass(frozen=True, eq=False)
class GateCall:
    y: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor | None
    w2: torch.Tensor
    b2: torch.Tensor | None

    def describe(self) -> str:
        return f"y {tuple(self.y.shape)} {self.y.dtype}, squeeze to {self.w1.shape[0]} channels"


def make_gate_call(y, w1, b1, w2, b2) -> GateCall:
    fn = "channel_gate"
    y = check_image(fn, "y", y)
    C = y.shape[-1]
    if not isinstance(w1, torch.Tensor) or w1.dim() != 2 or w1.shape[1] != C:
        raise ValueError(f"{fn}: w1 must be (C/r, C) with C={C}")
    r = w1.shape[0]
    if not isinstance(w2, torch.Tensor) or w2.shape != (C, r):
        raise ValueError(f"{fn}: w2 must be (C, C/r) = {(C, r)}")
    for name, b, n in (("b1", b1, r), ("b2", b2, C)):
        if b is not None and (not isinstance(b, torch.Tensor) or b.shape != (n,)):
            raise ValueError(f"{fn}: {name} must be ({n},) or None")
    return GateCall(y, w1, b1, w2, b2)


def _torch(c: GateCall) -> torch.Tensor:
    s = c.y.mean(dim=(1, 2))                                   # (B, C)
    g = torch.sigmoid(F.linear(F.relu(F.linear(s, c.w1, c.b1)), c.w2, c.b2))
    return c.y * g[:, None, None, :]


def _reference(c: GateCall) -> torch.Tensor:
    return naive_channel_gate(c.y, c.w1, c.b1, c.w2, c.b2)


GATE_DISPATCHER = Dispatcher("channel_gate", [
    Backend("torch", _torch, note="mean over pixels, two linears, sigmoid, broadcast multiply"),
    Backend("reference", _reference, auto=False, note="naive_channel_gate"),
])
register_op("channel_gate", lambda y, w1, b1, w2=None, b2=None: make_gate_call(y, w1, b1, w2, b2), GATE_DISPATCHER)


def channel_gate(y, w1, b1, w2, b2, *, backend: str | None = None) -> torch.Tensor:
    """``y * sigmoid(W2 relu(W1 mean(y) + b1) + b2)`` per image and channel.

    Args:
        y: ``(B, Y, X, C)``.
        w1: ``(C/r, C)``; b1: ``(C/r,)`` or None; w2: ``(C, C/r)``; b2: ``(C,)`` or None.
        backend: None / ``"torch"`` or ``"reference"``.

    Returns:
        ``(B, Y, X, C)``.
    """
    return GATE_DISPATCHER.run(make_gate_call(y, w1, b1, w2, b2), backend)
