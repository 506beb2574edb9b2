"""BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts (arXiv 2408.08274).

BAM's attention layer (section 3) is a *soft* mixture of attention experts: every expert ``e`` is a full attention
layer (``Wq_e, Wk_e, Wv_e, Wo_e``, initialised from one specialised dense model), all are active, and a router
weighs them per token: ``y = sum_e g_e(x) Attn_e(x)``, ``g = softmax(x W_r + b_r)``. The KV-shared variant keeps one
``Wk, Wv`` for every expert (only queries and output projections per expert), so its KV cache is the dense model's.

The ``attention`` backend runs all experts in one ``ak.attention`` call: expert ``e``'s heads become extra query
heads (``E H`` of them); with shared keys and values the query heads are ordered key-head-major so the GQA mapping
(query head ``i`` reads key head ``i // (E H / Hkv)``) sends every expert's heads to the shared ones. The gated
expert outputs then go through one ``(E H D, C)`` output matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.masks import causal as causal_mask
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_sequence4 import naive_bam


@dataclass(frozen=True, eq=False)
class BAMCall:
    x: torch.Tensor
    router_weight: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    router_bias: torch.Tensor | None
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    bo: torch.Tensor | None
    num_heads: int
    num_kv_heads: int
    causal: bool

    def describe(self) -> str:
        shared = " (keys/values shared)" if self.wk.shape[0] == 1 < self.wq.shape[0] else ""
        return (f"x {tuple(self.x.shape)} {self.x.dtype}, {self.wq.shape[0]} attention experts{shared}, "
                f"{self.num_heads} heads / {self.num_kv_heads} KV heads, {'causal' if self.causal else 'non-causal'}")


def _shape(name, t, shape, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"bam_attention: {name} must be {tuple(shape)}, got {got}")


def make_call(x, router_weight, wq, wk, wv, wo, *, router_bias=None, bq=None, bk=None, bv=None, bo=None,
              num_heads=1, num_kv_heads=None, causal=False) -> BAMCall:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.numel() == 0:
        raise ValueError(f"bam_attention: x must be a non-empty (B, N, C) tensor, got "
                         f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    C = x.shape[-1]
    hkv = num_heads if num_kv_heads is None else num_kv_heads
    for name, h in (("num_heads", num_heads), ("num_kv_heads", hkv)):
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(f"bam_attention: {name} must be a positive int, got {h!r}")
    if num_heads % hkv:
        raise ValueError(f"bam_attention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({hkv})")
    if not isinstance(wq, torch.Tensor) or wq.dim() != 3 or wq.shape[-1] % num_heads:
        raise ValueError(f"bam_attention: wq must be (E, C, H D) with H D divisible by num_heads={num_heads}, got "
                         f"{tuple(getattr(wq, 'shape', ())) or type(wq).__name__}")
    E, D = wq.shape[0], wq.shape[-1] // num_heads
    _shape("wq", wq, (E, C, num_heads * D))
    ekv = wk.shape[0] if isinstance(wk, torch.Tensor) and wk.dim() == 3 and wk.shape[0] in (1, E) else E
    for name, t in (("wk", wk), ("wv", wv)):
        _shape(name, t, (ekv, C, hkv * D))
    _shape("wo", wo, (E, num_heads * D, C))
    _shape("router_weight", router_weight, (C, E))
    _shape("router_bias", router_bias, (E,), True)
    _shape("bq", bq, (E, num_heads * D), True)
    _shape("bk", bk, (ekv, hkv * D), True)
    _shape("bv", bv, (ekv, hkv * D), True)
    _shape("bo", bo, (E, C), True)
    return BAMCall(x, router_weight, wq, wk, wv, wo, router_bias, bq, bk, bv, bo, num_heads, hkv, bool(causal))


def _project(x, w, b):
    """``x (B, N, C)``, ``w (E, C, F)``, ``b (E, F) | None`` -> ``(B, N, E, F)``."""
    y = torch.einsum("bnc,ecf->bnef", x, w)
    return y if b is None else y + b


def bam_gates(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None = None
              ) -> torch.Tensor:
    """The soft router ``g = softmax(x W_r + b_r)``: ``x (B, N, C)``, ``router_weight (C, E)`` -> ``(B, N, E)``."""
    logits = x @ router_weight
    return torch.softmax(logits if router_bias is None else logits + router_bias, -1)


def _attention(c: BAMCall) -> torch.Tensor:
    B, N, C = c.x.shape
    E, H, hkv = c.wq.shape[0], c.num_heads, c.num_kv_heads
    D, g = c.wq.shape[-1] // H, H // hkv
    q = _project(c.x, c.wq, c.bq).view(B, N, E, H, D)
    k = _project(c.x, c.wk, c.bk).view(B, N, -1, hkv, D)  # (B, N, E or 1, Hkv, D)
    v = _project(c.x, c.wv, c.bv).view(B, N, -1, hkv, D)
    mask = causal_mask() if c.causal else None
    if k.shape[2] == E:
        # experts as extra heads: query head e H + h reads key head (e H + h) // g = e Hkv + h // g
        o = attention(q.reshape(B, N, E * H, D), k.reshape(B, N, E * hkv, D), v.reshape(B, N, E * hkv, D), mask)
        o = o.reshape(B, N, E, H * D)
    else:
        # shared K/V: order query heads (Hkv, E, g) so that head // (E g) is the shared key head
        qs = q.view(B, N, E, hkv, g, D).transpose(2, 3).reshape(B, N, hkv * E * g, D)
        o = attention(qs, k[:, :, 0], v[:, :, 0], mask)  # (B, N, Hkv E g, D)
        o = o.reshape(B, N, hkv, E, g, D).transpose(2, 3).reshape(B, N, E, H * D)  # back to expert-major
    gates = bam_gates(c.x, c.router_weight, c.router_bias)  # (B, N, E)
    y = (o * gates.unsqueeze(-1)).reshape(B, N, E * H * D) @ c.wo.reshape(E * H * D, C)
    return y if c.bo is None else y + gates @ c.bo


def _reference(c: BAMCall) -> torch.Tensor:
    return naive_bam(c.x, c.router_weight, c.wq, c.wk, c.wv, c.wo, router_bias=c.router_bias, bq=c.bq, bk=c.bk,
                     bv=c.bv, bo=c.bo, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, causal=c.causal)


DISPATCHER = Dispatcher("bam_attention", [
    Backend("attention", _attention, note="all experts as extra heads of one ak.attention call"),
    Backend("reference", _reference, auto=False, note="naive_bam: one explicit attention per expert"),
])
register_op("bam_attention", make_call, DISPATCHER)


def bam_attention(x: torch.Tensor, router_weight: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                  wv: torch.Tensor, wo: torch.Tensor, *, router_bias: torch.Tensor | None = None,
                  bq: torch.Tensor | None = None, bk: torch.Tensor | None = None, bv: torch.Tensor | None = None,
                  bo: torch.Tensor | None = None, num_heads: int = 1, num_kv_heads: int | None = None,
                  causal: bool = False, backend: str | None = None) -> torch.Tensor:
    """Soft mixture of attention experts: ``y = sum_e softmax(x W_r + b_r)_e (Attn_e(x) Wo_e + bo_e)``.

    Args:
        x: ``(B, N, C)``.
        router_weight: ``(C, E)``; router_bias: ``(E,)`` or None.
        wq: ``(E, C, H D)``; wk, wv: ``(E, C, Hkv D)``, or ``(1, C, Hkv D)`` for keys and values shared by every
            expert; wo: ``(E, H D, C)``; bq, bk, bv, bo: biases shaped like the weights' last dims (or None).
        num_heads: ``H``; num_kv_heads: ``Hkv`` (GQA inside each expert; default ``H``).
        causal: causal self-attention. backend: None / ``"attention"`` or ``"reference"``.

    Returns:
        ``(B, N, C)``. Scale ``D ** -0.5``.

    Example:
        >>> E, C, H = 4, 64, 4
        >>> w = lambda *s: torch.randn(*s) * C ** -0.5
        >>> y = bam_attention(torch.randn(2, 32, C), w(C, E), w(E, C, C), w(1, C, C), w(1, C, C), w(E, C, C),
        ...                   num_heads=H)
    """
    return DISPATCHER.run(make_call(x, router_weight, wq, wk, wv, wo, router_bias=router_bias, bq=bq, bk=bk, bv=bv,
                                    bo=bo, num_heads=num_heads, num_kv_heads=num_kv_heads, causal=causal), backend)
