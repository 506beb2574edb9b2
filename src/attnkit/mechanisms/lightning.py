"""Lightning Attention token mixers: TNL's gated linear attention and MiniMax's lightning layer.

"Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention",
arXiv 2405.17381 (TNL, 2307.14995); "Lightning Attention-2", arXiv 2401.04658;
"MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", arXiv 2506.13585
(same lightning layer as MiniMax-01, arXiv 2501.08313). Spec: papers/linear.md §2-§4.

Both modules are projections + norm + gate around ``ak.linear_attention`` with a fixed per-head
decay (no 1/sqrt(D), no denominator). ``forward(x, state=None, return_state=False)`` supports chunked
prefill followed by token-by-token decoding (the op picks the recurrent algorithm for one token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.linear import linear_attention
from attnkit.registry import Paper, register

SCHEDULES = ("released", "paper", "fla")


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes ``s_h = 2^(-8(h+1)/H)``; for H not a power of two, the interleaved extension (§2.2)."""

    def pow2(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

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
    if not 0 <= layer_idx < num_layers:
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


@dataclass(frozen=True)
class LightningConfig:
    dim: int
    num_heads: int
    head_dim: int
    layer_idx: int = 0
    num_layers: int = 24
    schedule: str = "released"
    style: str = "tnl"  # "tnl": SiLU(q,k), SRMSNorm * u; "minimax": SiLU(q,k,v), RMSNorm(weight) * sigmoid gate
    eps: float = 1e-6
    chunk_size: int = 64


class LightningAttention(nn.Module):
    """TNL gated linear attention (GLA) on ``x (B, N, C)`` (papers/linear.md §2.3).

    ``[q, k, v, u] = x W``; ``q, k = SiLU``; ``a = lightning(q, k, v, lambda_l)`` (scale 1, no denominator);
    ``y = (SRMSNorm_{H*D}(a) * u) W_o``. The norm spans all heads jointly. LRPE (TNL's first layer only) is
    not included. ``style="minimax"`` gives the MiniMax lightning layer instead (§4.2).

    Example:
        >>> m = LightningAttention(64, 4, layer_idx=0, num_layers=12)
        >>> y, state = m(torch.randn(2, 100, 64), return_state=True)
        >>> y1 = m(torch.randn(2, 1, 64), state=state)   # one decoding step
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, layer_idx: int = 0,
                 num_layers: int = 24, schedule: str = "released", style: str = "tnl", eps: float = 1e-6,
                 chunk_size: int = 64):
        super().__init__()
        if style not in ("tnl", "minimax"):
            raise ValueError(f"style must be 'tnl' or 'minimax', got {style!r}")
        hd = head_dim or dim // num_heads
        self.config = LightningConfig(dim, num_heads, hd, layer_idx, num_layers, schedule, style, eps, chunk_size)
        inner = num_heads * hd
        # lambda stays a python-side fp32 constant (not a buffer): module.to(bf16) must not round it
        self._decay = tnl_decay(num_heads, layer_idx, num_layers, schedule).tolist()
        if style == "tnl":
            self.qkvu = nn.Linear(dim, 4 * inner, bias=False)
        else:
            self.qkv = nn.Linear(dim, 3 * inner, bias=False)
            self.gate = nn.Linear(dim, inner, bias=False)
            self.norm_weight = nn.Parameter(torch.ones(inner))
        self.out = nn.Linear(inner, dim, bias=False)

    @property
    def decay(self) -> torch.Tensor:
        return torch.tensor(self._decay, dtype=torch.float32)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, return_state: bool = False):
        c = self.config
        B, N, _ = x.shape
        H, D = c.num_heads, c.head_dim
        if c.style == "tnl":
            q, k, v, u = self.qkvu(x).chunk(4, dim=-1)  # each (B, N, H*D)
            q, k = F.silu(q), F.silu(k)
        else:
            q, k, v = F.silu(self.qkv(x)).chunk(3, dim=-1)  # SiLU on v too in MiniMax
        q, k, v = (t.reshape(B, N, H, D) for t in (q, k, v))  # (B, N, H, D)
        a, new_state = linear_attention(q, k, v, decay=self.decay, scale=1.0, initial_state=state,
                                        return_state=True, chunk_size=c.chunk_size)
        a = a.reshape(B, N, H * D)  # (B, N, H*D): the norm spans all heads jointly
        if c.style == "tnl":
            o = srms_norm(a, c.eps) * u
        else:
            o = srms_norm(a, c.eps) * self.norm_weight * torch.sigmoid(self.gate(x))
        y = self.out(o)
        return (y, new_state) if return_state else y


class MiniMaxLightningAttention(LightningAttention):
    """MiniMax-01/M1 lightning layer: ``LightningAttention(style="minimax")`` (papers/linear.md §4.2)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, layer_idx: int = 0,
                 num_layers: int = 80, schedule: str = "released", eps: float = 1e-6, chunk_size: int = 64):
        super().__init__(dim, num_heads, head_dim, layer_idx, num_layers, schedule, "minimax", eps, chunk_size)


def _flops(cfg: dict) -> float:
    B, N, C, H = cfg.get("batch", 1), cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    D = cfg.get("head_dim") or C // H
    chunk = cfg.get("chunk_size", 64)
    proj = 2 * B * N * C * H * D * (4 + 1)  # qkv(u/gate) in, out
    core = B * H * N * (4 * D * D + 2 * min(chunk, N) * D)  # chunked lightning (causal half of the tile)
    return float(proj + core)


_DEFAULT = {"batch": 2, "seq_len": 40, "dim": 32, "num_heads": 2, "layer_idx": 1, "num_layers": 4, "chunk_size": 16}


def _example(cls):
    def example(config=None):
        cfg = {**_DEFAULT, **(config or {})}
        m = cls(cfg["dim"], cfg["num_heads"], cfg.get("head_dim"), layer_idx=cfg["layer_idx"],
                num_layers=cfg["num_layers"], chunk_size=cfg["chunk_size"])
        return m, (torch.randn(cfg["batch"], cfg["seq_len"], cfg["dim"]),)

    return example


register(
    name="lightning_attention", family="linear",
    paper=Paper("Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention",
                "2405.17381", 2024),
    patterns=("causal-self",), complexity="O(N H D^2 + N H C D)", flops=_flops,
    example=_example(LightningAttention), default_config=_DEFAULT,
    notes="TNL GLA mixer; decay schedule 'released' (ALiBi slopes x (1 - l/(L-1) + 1e-5)) by default, "
          "'paper' and 'fla' selectable; no LRPE; decay fixed (not learnable) as in the paper.",
)(LightningAttention)

register(
    name="minimax_lightning", family="linear",
    paper=Paper("MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", "2506.13585", 2025),
    patterns=("causal-self",), complexity="O(N H D^2 + N H C D)", flops=_flops,
    example=_example(MiniMaxLightningAttention), default_config=_DEFAULT,
    notes="MiniMax-01/M1 lightning layer: SiLU on q,k,v; RMSNorm over all H*D (learnable weight); sigmoid "
          "output gate; decay schedule 'released' with the global layer index.",
)(MiniMaxLightningAttention)
