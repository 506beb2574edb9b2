"""Agent Attention: softmax attention through a few pooled agent tokens (generalised linear attention).

"Agent Attention: On the Integration of Softmax and Linear Attention", arXiv 2312.08874
(ECCV 2024).

    A   = AvgPool(Q)  to n agents                       (B, n, H, D)
    V_A = softmax(A K^T tau + B1) V                     agents gather from all keys
    O   = softmax(Q A^T tau + B2) V_A + DWC(V)          queries read from the agents

Cost O(N n D) per head. 2-D inputs are channels-last ``(B, h, w, C)`` (agents pooled to
sqrt(n) x sqrt(n), 3x3 depthwise conv on V); 1-D inputs ``(B, N, C)`` pool to n agents and use a
size-3 depthwise Conv1d (our choice: the paper is 2-D only). Non-causal only (pooling mixes future
queries).
"""


from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnkit._validate import check_qkv, check_tensor, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_dense import naive_masked_attention


def _softmax_attention(q, k, v, bias, scale):
    """Heads-last softmax attention with an additive float bias ``(H, Nq, Nk)`` (ak.attention takes bool masks)."""
    if bias is None:
        return attention(q, k, v, scale=scale)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias.to(q.dtype), scale=scale)
    return o.transpose(1, 2)  # (B, N, H, Dv)



def depthwise_conv(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Depthwise 3 (x 3) conv with zero padding as a sum of shifted products.

    Same result as ``conv(x)``; written out because CPU float64 grouped convolution takes a very slow path.
    ``x`` is ``(B, C, h, w)`` or ``(B, C, N)``.
    """
    w = conv.weight[:, 0]  # (C, 3, 3) or (C, 3)
    xp = F.pad(x, (1, 1) * (x.dim() - 2))
    out = conv.bias[:, None, None] if x.dim() == 4 else conv.bias[:, None]
    if x.dim() == 3:
        N = x.shape[-1]
        return out + sum(w[:, i, None] * xp[..., i:i + N] for i in range(3))
    h, wd = x.shape[-2:]
    return out + sum(w[:, i, j, None, None] * xp[..., i:i + h, j:j + wd] for i in range(3) for j in range(3))



@dataclass(frozen=True, eq=False)
class AgentCall:
    """A validated ``agent_attention`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    agents: torch.Tensor
    bias1: torch.Tensor | None
    bias2: torch.Tensor | None
    scale: float

    def describe(self) -> str:
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.q.dtype}, "
                f"{self.agents.shape[1]} agents, bias1 {'given' if self.bias1 is not None else 'none'}, "
                f"bias2 {'given' if self.bias2 is not None else 'none'}")


def _broadcasts(shape: torch.Size, to: tuple[int, ...]) -> bool:
    # numpy's rule written out: torch.broadcast_shapes costs ~0.1 ms a call, on every forward
    return len(shape) <= len(to) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(to)))


def make_call(q, k, v, agents, *, bias1=None, bias2=None, scale=None) -> AgentCall:
    hq, hkv = check_qkv(q, k, v)
    if hq != hkv:
        raise ValueError(f"agent_attention needs as many K/V heads as query heads, got {hq} and {hkv}")
    check_tensor("agents", agents)
    B, N, H, D = q.shape
    if agents.dim() != 4 or agents.shape[0] != B or agents.shape[2:] != (H, D):
        raise ValueError(f"agents must have shape (B, n, H, D) = ({B}, n, {H}, {D}), got {tuple(agents.shape)}")
    n, M = agents.shape[1], k.shape[1]
    for name, b, shape in (("bias1", bias1, (H, n, M)), ("bias2", bias2, (H, N, n))):
        if b is not None and not _broadcasts(b.shape, shape):
            raise ValueError(f"{name} must broadcast to shape {shape}, got {tuple(b.shape)}")
    return AgentCall(q, k, v, agents, bias1, bias2, resolve_scale(scale, D))


def _two_pass(c: AgentCall) -> torch.Tensor:
    va = _softmax_attention(c.agents, c.k, c.v, c.bias1, c.scale)  # (B, n, H, Dv)
    return _softmax_attention(c.q, c.agents, va, c.bias2, c.scale)  # (B, N, H, Dv)


def _two_pass_detail(c: AgentCall) -> str:
    def one(bias):
        return "SDPA with an additive float bias" if bias is not None else "ak.attention (automatic backend)"

    return f"agents <- keys: {one(c.bias1)}; queries <- agents: {one(c.bias2)}"


def _reference(c: AgentCall) -> torch.Tensor:
    va, _ = naive_masked_attention(c.agents, c.k, c.v, None, c.scale, c.bias1)  # (B, n, H, Dv)
    return naive_masked_attention(c.q, c.agents, va, None, c.scale, c.bias2)[0]  # (B, N, H, Dv)


DISPATCHER = Dispatcher("agent_attention", [
    Backend("two_pass", _two_pass, suits=lambda c: (True, "the fast path"),
            note="two softmax attentions: agents gather from the keys, queries read the agents",
            detail=_two_pass_detail),
    Backend("reference", _reference, auto=False, note="naive_masked_attention twice, scores materialised"),
])
register_op("agent_attention", make_call, DISPATCHER)


def agent_attention(q, k, v, agents, *, bias1=None, bias2=None, scale=None, backend: str | None = None):
    """Two-softmax agent attention (no DWC).

    Args:
        q: ``(B, N, H, D)``; k: ``(B, M, H, D)``; v: ``(B, M, H, Dv)``.
        agents: ``(B, n, H, D)`` agent tokens.
        bias1: ``(H, n, M)`` added to the agent->key scores, or None.
        bias2: ``(H, N, n)`` added to the query->agent scores, or None.
        scale: tau, default ``D ** -0.5`` in both softmaxes.
        backend: None / ``"two_pass"`` (the fast path) or ``"reference"``;
            see ``ak.explain("agent_attention", q, k, v, agents=...)``.

    Returns:
        ``(B, N, H, Dv)``.

    Example:
        >>> o = agent_attention(q, k, v, q.mean(1, keepdim=True))   # one agent: the mean query
    """
    return DISPATCHER.run(make_call(q, k, v, agents, bias1=bias1, bias2=bias2, scale=scale), backend)



