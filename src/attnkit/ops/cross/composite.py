"""EE-MLLM's composite attention: no attention among visual tokens, causal attention for the text.

"EE-MLLM: A Data-Efficient and Compute-Efficient Multimodal Large Language Model", arXiv 2408.11795, §3.2.
On ``[visual (Nv); text]`` a visual row attends to itself only, so its output is its own value
(a softmax over one key is 1) and costs no attention at all; a text row is causal over every key
before it. The ``split`` backend computes exactly that: the visual rows copy ``v``, the text rows run
``ak.attention`` under ``causal(offset=Nv)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.masks.causal import causal
from attnkit.masks.cross import composite
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_cross import naive_composite_attention


@dataclass(frozen=True, eq=False)
class CompositeCall:
    """A validated ``composite_attention`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    num_visual: int
    scale: float

    def describe(self) -> str:
        nt = self.q.shape[1] - self.num_visual
        return f"q {tuple(self.q.shape)} {self.q.dtype}, {self.num_visual} visual + {nt} text tokens"


def make_call(q, k, v, num_visual, *, scale=None) -> CompositeCall:
    check_qkv(q, k, v, same_extent=True)
    nv = int_arg("composite_attention: num_visual", num_visual, 0)
    if nv > q.shape[1]:
        raise ValueError(f"composite_attention: num_visual ({nv}) must be <= N ({q.shape[1]})")
    return CompositeCall(q, k, v, nv, resolve_scale(scale, q.shape[-1]))


def _split(c: CompositeCall) -> torch.Tensor:
    nv, group = c.num_visual, c.q.shape[2] // c.k.shape[2]
    visual = c.v[:, :nv].repeat_interleave(group, 2)                              # (B, Nv, Hq, Dv): softmax of one key
    if nv == c.q.shape[1]:
        return visual
    text = attention(c.q[:, nv:], c.k, c.v, mask=causal(offset=nv), scale=c.scale)  # (B, Nt, Hq, Dv)
    return torch.cat([visual, text], 1)


def _masked(c: CompositeCall) -> torch.Tensor:
    return attention(c.q, c.k, c.v, mask=composite(c.num_visual), scale=c.scale)


def _reference(c: CompositeCall) -> torch.Tensor:
    return naive_composite_attention(c.q, c.k, c.v, c.num_visual, c.scale)


DISPATCHER = Dispatcher("composite_attention", [
    Backend("split", _split, suits=lambda c: (True, "visual rows copy v, text rows causal"),
            note="visual rows = their own value, text rows ak.attention under causal(offset=Nv)"),
    Backend("masked", _masked, note="ak.attention under the composite mask (every row through the tile walk)"),
    Backend("reference", _reference, auto=False, note="naive_composite_attention: the dense mask materialised"),
])
register_op("composite_attention", make_call, DISPATCHER)


def composite_attention(q, k, v, num_visual: int, *, scale: float | None = None,
                        backend: str | None = None) -> torch.Tensor:
    """EE-MLLM's composite attention over ``[visual tokens; text tokens]`` (self-attention).

    Args:
        q, k, v: ``(B, N, Hq, D)``, ``(B, N, Hkv, D)``, ``(B, N, Hkv, Dv)``; the first ``num_visual`` positions
            are visual tokens.
        num_visual: ``Nv``; scale: default ``D ** -0.5``.
        backend: None, ``"split"``, ``"masked"`` or ``"reference"``.

    Returns:
        ``(B, N, Hq, Dv)``: rows ``< Nv`` equal ``v`` (their own value), the others causal attention.

    Example:
        >>> out = composite_attention(q, k, v, num_visual=576)
    """
    return DISPATCHER.run(make_call(q, k, v, num_visual, scale=scale), backend)
