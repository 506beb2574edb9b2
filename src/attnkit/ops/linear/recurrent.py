"""Recurrent (token-by-token) causal linear attention: the decoding algorithm.

"Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", arXiv 2006.16236;
decay as in "Lightning Attention-2", arXiv 2401.04658 (the contract of ``docs/design.md`` §3):

    S_t = exp(g_t) S_{t-1} + k_t v_t^T        o_t = scale * q_t S_t

O(D * Dv) work and memory per token, no dependence on the context length. Autograd runs through
the loop (it saves one state per step), so use it for decoding and short inputs; long inputs go
to the chunk algorithm.
"""

from __future__ import annotations

import torch


def recurrent_linear_attention(q, k, v, g=None, initial_state=None, *, scale=1.0, out_dtype=None):
    """Causal linear attention as a loop over tokens (``"recurrent"`` backend core).

    Args:
        q: ``(B, N, H, D)`` feature-mapped queries.
        k: ``(B, N, Hkv, D)`` feature-mapped keys.
        v: ``(B, N, Hkv, Dv)``.
        g: log-decay ``(H,)`` or ``(B, N, H)`` or None.
        initial_state: ``(B, H, D, Dv)`` or None.
        scale: multiplies q.
        out_dtype: dtype of ``o`` (default q's).

    Returns:
        ``(o (B, N, H, Dv), S_N (B, H, D, Dv))``, state in float32 (float64 for float64 inputs).

    Example:
        >>> o, S = recurrent_linear_attention(q[:, :1], k[:, :1], v[:, :1], g, S)   # one decode step
    """
    B, N, H, D = q.shape
    rep, Dv = H // k.shape[2], v.shape[-1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = torch.zeros(B, H, D, Dv, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    qs = q.to(cdt) * scale
    ks = k.to(cdt).repeat_interleave(rep, dim=2)  # (B, N, H, D): query head h reads kv head h // rep
    vs = v.to(cdt).repeat_interleave(rep, dim=2)  # (B, N, H, Dv)
    lam = None if g is None else g.to(cdt).exp()
    outs = []
    for t in range(N):
        kv = ks[:, t, :, :, None] * vs[:, t, :, None, :]  # (B, H, D, Dv)
        if lam is None:
            S = S + kv
        else:
            lt = lam if lam.dim() == 1 else lam[:, t]  # (H,) or (B, H)
            S = lt[..., None, None] * S + kv
        outs.append(torch.einsum("bhd,bhde->bhe", qs[:, t], S))
    o = torch.stack(outs, dim=1).to(out_dtype or q.dtype)  # (B, N, H, Dv)
    return o, S
