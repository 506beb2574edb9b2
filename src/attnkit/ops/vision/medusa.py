"""MEDUSA's multi-scale gate: one attention body, one head per backbone scale.

"MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network Architecture for Medical Image
Analysis", arXiv 2110.06063 (Front. Med. 2022): a single high-capacity self-attention body (an encoder-decoder
on the input) feeds several heads, each producing the attention of one scale of the backbone ("single body,
multi-scale heads"). This op is the heads and the gating: the body's map is average-pooled to every stage's
extent, a 1x1 head gives that stage's logits, and the stage is multiplied by ``1 + sigmoid`` (residual form,
the backbone is unchanged where the attention is 0) or by ``sigmoid``. CNN layout ``(B, C, H, W)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_vision_c import naive_multiscale_gate

MODES = ("residual", "multiply")


@dataclass(frozen=True, eq=False)
class MedusaCall:
    """A validated ``multiscale_gate`` call."""

    body: torch.Tensor
    stages: tuple[torch.Tensor, ...]
    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor | None, ...]
    mode: str

    def describe(self) -> str:
        return (f"body {tuple(self.body.shape)} {self.body.dtype}, stages "
                f"{[tuple(s.shape) for s in self.stages]}, {self.mode}")


def make_medusa_call(body, stages, weights, biases=None, mode="residual") -> MedusaCall:
    op = "multiscale_gate"
    if not isinstance(body, torch.Tensor) or not body.is_floating_point():
        raise TypeError(f"{op}: body must be a floating-point tensor (B, C_b, H, W), got "
                        f"{body.dtype if isinstance(body, torch.Tensor) else type(body).__name__}")
    if body.dim() != 4 or body.numel() == 0:
        raise ValueError(f"{op}: body must be a non-empty (B, C_b, H, W), got shape {tuple(body.shape)}")
    if isinstance(stages, torch.Tensor) or not isinstance(stages, Sequence) or not stages:
        raise TypeError(f"{op}: stages must be a non-empty list of (B, C_s, H_s, W_s) tensors")
    stages, weights = tuple(stages), tuple(weights)
    biases = (None,) * len(stages) if biases is None else tuple(biases)
    if not len(weights) == len(biases) == len(stages):
        raise ValueError(f"{op}: one weight and one bias per stage: {len(stages)} stages, {len(weights)} weights, "
                         f"{len(biases)} biases")
    B, Cb, H, W = body.shape
    for s, (x, w, b) in enumerate(zip(stages, weights, biases, strict=True)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != B or x.numel() == 0:
            raise ValueError(f"{op}: stages[{s}] must be a non-empty (B={B}, C_s, H_s, W_s), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[2] > H or x.shape[3] > W:
            raise ValueError(f"{op}: stages[{s}] extent {tuple(x.shape[2:])} exceeds the body's {(H, W)}; the "
                             f"heads pool the body down to each stage, they do not upsample")
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (x.shape[1], Cb):
            raise ValueError(f"{op}: weights[{s}] must be (C_s={x.shape[1]}, C_b={Cb}), got "
                             f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
        if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (x.shape[1],)):
            raise ValueError(f"{op}: biases[{s}] must be (C_s={x.shape[1]},) or None")
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    return MedusaCall(body, stages, weights, biases, mode)


def _head(body: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(body, w[:, :, None, None], b)  # 1x1 head: (B, C_b, h, w) -> (B, C_s, h, w)


def _pooled(c: MedusaCall) -> list[torch.Tensor]:
    out = []
    for x, w, b in zip(c.stages, c.weights, c.biases, strict=True):
        size = tuple(x.shape[2:])
        # pooling and the 1x1 head are both linear and commute (pooling weights sum to 1, so the bias passes):
        # run the head on whichever side has fewer channels x pixels
        if w.shape[0] < w.shape[1]:
            logits = F.adaptive_avg_pool2d(_head(c.body, w, b), size)
        else:
            logits = _head(F.adaptive_avg_pool2d(c.body, size), w, b)
        a = torch.sigmoid(logits)  # (B, C_s, H_s, W_s)
        out.append(x * (1 + a) if c.mode == "residual" else x * a)
    return out


def _reference(c: MedusaCall) -> list[torch.Tensor]:
    return naive_multiscale_gate(c.body, c.stages, c.weights, c.biases, c.mode)


MEDUSA_DISPATCHER = Dispatcher("multiscale_gate", [
    Backend("torch", _pooled, suits=lambda c: (True, "the fast path"),
            note="per stage: adaptive average pooling and a 1x1 head (narrow side first), sigmoid, product"),
    Backend("reference", _reference, auto=False, note="naive_multiscale_gate: bin by bin"),
])
register_op("multiscale_gate", make_medusa_call, MEDUSA_DISPATCHER)


def multiscale_gate(body: torch.Tensor, stages: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                    biases: Sequence[torch.Tensor | None] | None = None, mode: str = "residual", *,
                    backend: str | None = None) -> list[torch.Tensor]:
    """MEDUSA's heads (arXiv 2110.06063): gate every backbone stage with attention from one shared body.

    ``A_s = sigmoid(W_s pool_s(body) + b_s)``, ``pool_s`` = adaptive average pooling to stage ``s``'s extent;
    ``out_s = x_s * (1 + A_s)`` (``mode="residual"``) or ``x_s * A_s`` (``"multiply"``).

    Args:
        body: the attention body's output ``(B, C_b, H, W)`` (computed once, shared by every head).
        stages: backbone maps ``[(B, C_s, H_s, W_s)]`` with ``H_s <= H``, ``W_s <= W``.
        weights: per stage, the 1x1 head ``(C_s, C_b)``. biases: per stage ``(C_s,)`` or None.
        mode: ``"residual"`` or ``"multiply"``.
        backend: None / ``"torch"`` or ``"reference"``.

    Returns:
        the gated stages, a list of ``(B, C_s, H_s, W_s)``.
    """
    return MEDUSA_DISPATCHER.run(make_medusa_call(body, stages, weights, biases, mode), backend)
