"""DaViT channel group attention: channels are the tokens, the whole image is each token's feature vector.

"DaViT: Dual Attention Vision Transformers", arXiv 2204.03645 (ECCV 2022), §3.2 (Eq. 3).

Per group ``g`` of ``Cg`` channels, with ``Q_g, K_g, V_g`` of shape ``(P, Cg)`` over the ``P`` pixels:
``A_g = softmax(Q_g^T K_g * scale)`` (a ``Cg x Cg`` map, softmax over key channels) and
``out_g = V_g A_g^T``. It is dense attention over the transposed token matrix: queries ``Q_g^T``, keys
``K_g^T``, values ``V_g^T`` (``Cg`` tokens of width ``P``), which is what the ``sdpa`` backend runs.
Cost ``4 P C Cg``: linear in the number of pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import check_qkv, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_vision import naive_channel_group_attention


@dataclass(frozen=True, eq=False)
class ChannelCall:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float

    def describe(self) -> str:
        _, P, G, Cg = self.q.shape
        return f"q {tuple(self.q.shape)} {self.q.dtype}: {G} groups of {Cg} channel tokens over P={P} pixels"


def make_channel_call(q, k, v, *, scale=None) -> ChannelCall:
    try:
        hq, hkv = check_qkv(q, k, v, same_extent=True)
    except (TypeError, ValueError) as e:
        raise type(e)(f"channel_group_attention: {e} (layout (B, P, G, Cg))") from None
    if hq != hkv or v.shape != q.shape:
        raise ValueError(f"channel_group_attention: q, k, v must share one shape (B, P, G, Cg), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return ChannelCall(q, k, v, resolve_scale(scale, q.shape[-1]))


def _matmul(c: ChannelCall) -> torch.Tensor:
    qt = c.q.permute(0, 2, 3, 1)                                # (B, G, Cg, P)
    kg = c.k.transpose(1, 2)                                    # (B, G, P, Cg)
    a = torch.softmax((qt @ kg) * c.scale, dim=-1)              # (B, G, Cg, Cg)
    # out^T = A V^T as a (Cg x Cg) @ (Cg x P) product: the (P x Cg) @ (Cg x Cg) form on the strided V is
    # several times slower in the CPU bmm
    out_t = a @ c.v.permute(0, 2, 3, 1)                         # (B, G, Cg, P)
    return out_t.permute(0, 3, 1, 2)                            # (B, P, G, Cg)


def _sdpa(c: ChannelCall) -> torch.Tensor:
    # the identity made an implementation: Cg channel tokens of width P attend each other
    qt, kt, vt = (t.permute(0, 2, 3, 1) for t in (c.q, c.k, c.v))  # (B, G, Cg, P)
    return F.scaled_dot_product_attention(qt, kt, vt, scale=c.scale).permute(0, 3, 1, 2)  # (B, P, G, Cg)


def _reference(c: ChannelCall) -> torch.Tensor:
    return naive_channel_group_attention(c.q, c.k, c.v, c.scale)


CHANNEL_DISPATCHER = Dispatcher("channel_group_attention", [
    Backend("matmul", _matmul, note="two batched matmuls over (B, G): Q^T K then V A^T",
            detail=lambda c: "Cg x Cg map per group, softmax over key channels"),
    Backend("sdpa", _sdpa, auto=False,
            note="SDPA on the transposed tensors (head dim P): the dense-attention identity; slower for large P"),
    Backend("reference", _reference, auto=False, note="naive_channel_group_attention: einsum"),
])
register_op("channel_group_attention", make_channel_call, CHANNEL_DISPATCHER)


def channel_group_attention(q, k, v, *, scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """DaViT channel group attention (paper form).

    Args:
        q, k, v: ``(B, P, G, Cg)``: ``P`` pixels (flattened image), ``G`` channel groups of ``Cg`` channels.
        scale: default ``Cg ** -0.5`` (the paper's); DaViT-v2 / Florence-2 use ``P ** -0.5``.
        backend: None / ``"matmul"``, ``"sdpa"`` (transposed dense attention) or ``"reference"``.

    Returns:
        ``(B, P, G, Cg)``: ``out[p, g, a] = sum_b softmax_b(scale * sum_p' q[p', g, a] k[p', g, b]) v[p, g, b]``.
    """
    return CHANNEL_DISPATCHER.run(make_channel_call(q, k, v, scale=scale), backend)
