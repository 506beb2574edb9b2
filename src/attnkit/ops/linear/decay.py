"""Lightning Attention token mixers: TNL's gated linear attention and MiniMax's lightning layer.

"Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention",
arXiv 2405.17381 (TNL, 2307.14995); "Lightning Attention-2", arXiv 2401.04658;
"MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", arXiv 2506.13585
(same lightning layer as MiniMax-01, arXiv 2501.08313).

Both modules are projections + norm + gate around ``ak.linear_attention`` with a fixed per-head
decay (no 1/sqrt(D), no denominator). ``forward(x, state=None, return_state=False)`` supports chunked
prefill followed by token-by-token decoding (the op picks the recurrent algorithm for one token).
"""


from __future__ import annotations

import math

import torch

from attnkit._validate import int_arg

SCHEDULES = ("released", "paper", "fla")



def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes ``s_h = 2^(-8(h+1)/H)``; for H not a power of two, the interleaved extension of ALiBi
    (arXiv 2108.12409)."""

    def pow2(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    int_arg("num_heads", num_heads, 1)
    p = 2 ** math.floor(math.log2(num_heads))
    if p == num_heads:
        return pow2(p)
    return pow2(p) + pow2(2 * p)[0::2][: num_heads - p]



def tnl_decay(num_heads: int, layer_idx: int, num_layers: int, schedule: str = "released") -> torch.Tensor:
    """Per-head decay lambda in (0, 1] (float32, shape (H,)) of a TNL / MiniMax lightning layer.

    Args:
        num_heads: H.
        layer_idx: 0-based index of the layer, counting *every* layer of a hybrid (softmax ones too).
        num_layers: L, all layers of the model.
        schedule: ``"released"`` (default; TNL/MiniMax released code, what their weights expect):
            ``exp(-s_h (1 - l/(L-1) + 1e-5))`` with ALiBi slopes s_h; ``"paper"`` (TNL Eq. 10, 1-based
            head index): ``exp(-(8h/H)(1 - l/L))``; ``"fla"`` (fla's ``chunk_lightning_attn``, 0-based h).

    Returns:
        ``(H,)`` float32 tensor.

    Example:
        >>> tnl_decay(8, 0, 24)[:2]   # tensor([0.6065, 0.7788])
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    int_arg("num_heads", num_heads, 1)
    int_arg("num_layers", num_layers, 1)
    if int_arg("layer_idx", layer_idx, 0) >= num_layers:
        raise ValueError(f"layer_idx must be in [0, num_layers), got {layer_idx} of {num_layers}")
    if schedule == "released":
        depth = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0  # guard L - 1 = 0
        s = torch.tensor(alibi_slopes(num_heads), dtype=torch.float64) * (1 - depth + 1e-5)
    else:
        h = torch.arange(num_heads, dtype=torch.float64) + (1 if schedule == "paper" else 0)
        s = 8.0 * h / num_heads * (1 - layer_idx / num_layers)
    return torch.exp(-s).float()



def srms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Simple RMSNorm (no weight) over the last axis, in fp32."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

