"""Agent Attention: softmax attention through a few pooled agent tokens (generalised linear attention).

"Agent Attention: On the Integration of Softmax and Linear Attention", arXiv 2312.08874
(ECCV 2024). Spec: papers/linear.md §5.

    A   = AvgPool(Q)  to n agents                       (B, n, H, D)
    V_A = softmax(A K^T tau + B1) V                     agents gather from all keys
    O   = softmax(Q A^T tau + B2) V_A + DWC(V)          queries read from the agents

Cost O(N n D) per head. 2-D inputs are channels-last ``(B, h, w, C)`` (agents pooled to
sqrt(n) x sqrt(n), 3x3 depthwise conv on V); 1-D inputs ``(B, N, C)`` pool to n agents and use a
size-3 depthwise Conv1d (our choice: the paper is 2-D only). Non-causal only (pooling mixes future
queries).
"""


from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.dense.call import attention


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



def agent_attention(q, k, v, agents, *, bias1=None, bias2=None, scale=None):
    """Two-softmax agent attention (no DWC).

    Args:
        q: ``(B, N, H, D)``; k: ``(B, M, H, D)``; v: ``(B, M, H, Dv)``.
        agents: ``(B, n, H, D)`` agent tokens.
        bias1: ``(H, n, M)`` added to the agent->key scores, or None.
        bias2: ``(H, N, n)`` added to the query->agent scores, or None.
        scale: tau, default ``D ** -0.5`` in both softmaxes.

    Returns:
        ``(B, N, H, Dv)``.

    Example:
        >>> o = agent_attention(q, k, v, q.mean(1, keepdim=True))   # one agent: the mean query
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    va = _softmax_attention(agents, k, v, bias1, scale)  # (B, n, H, Dv)
    return _softmax_attention(q, agents, va, bias2, scale)  # (B, N, H, Dv)



_DEFAULT_1D = {"batch": 2, "dim": 32, "num_heads": 2, "num_agents": 8, "grid": (40,)}

