"""MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression (arXiv 2406.14909).

Every head has its own causal sliding window whose span grows with the input length,
``S_h(N) = clamp(alpha_h + beta_h N, 1, N)``, plus ``g`` always-visible initial (sink)
tokens. The per-head block layout plus a per-head element mask runs on the block-gather
engine. The (alpha, beta) plan comes from MoA's offline profiling; it is an input here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnkit._validate import check_qkv
from attnkit.backends.block_gather import block_gather_attention
from attnkit.registry import Paper, register


def moa_spans(alphas: torch.Tensor, betas: torch.Tensor, n: int) -> torch.Tensor:
    """Per-head spans ``clamp(round(alpha + beta N), 1, N)`` as int64 ``(H,)``."""
    return torch.round(alphas.double() + betas.double() * n).clamp(1, n).long()


@dataclass(frozen=True)
class _MoAMask:
    """``u <= t and (t - u < S_h or u < g)`` with per-head spans; the ``mask_mod`` protocol."""

    spans: torch.Tensor  # (H,) int64
    sink: int

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((q_idx - kv_idx < self.spans[h]) | (kv_idx < self.sink))


def moa_layout(spans: torch.Tensor, sink: int, n: int, block: int) -> torch.Tensor:
    """Block layout ``(H, nb, nb)``: a tile is kept iff some pair in it satisfies the MoA mask."""
    nb = -(-n // block)
    i = torch.arange(nb, device=spans.device).view(1, -1, 1)
    j = torch.arange(nb, device=spans.device).view(1, 1, -1)
    min_dist = (i * block - (j * block + block - 1)).clamp_min(0)  # closest (t, u) pair of the tile
    return (j <= i) & ((min_dist < spans.view(-1, 1, 1)) | (j * block < sink))


def moa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor, *,
                  sink: int = 64, block_size: int = 64, scale: float | None = None) -> torch.Tensor:
    """Causal attention with heterogeneous elastic per-head windows and attention sinks.

    Args:
        q: ``(B, N, Hq, D)``; k: ``(B, N, Hkv, D)``; v: ``(B, N, Hkv, Dv)``.
        alphas, betas: ``(Hq,)`` span rule per query head, ``S_h = alpha_h + beta_h N`` (N = this
            call's length; alpha may be negative), clamped to ``[1, N]``.
        sink: initial tokens every query sees; block_size: tile of the engine (a speed knob only).

    Returns:
        ``(B, N, Hq, Dv)``.

    Example:
        >>> q = k = v = torch.randn(1, 512, 4, 32)
        >>> out = moa_attention(q, k, v, torch.tensor([32., 64, 0, 16]), torch.tensor([0., 0, .5, .1]))
    """
    hq, _ = check_qkv(q, k, v, same_extent=True)
    if alphas.shape != (hq,) or betas.shape != (hq,):
        raise ValueError(f"alphas and betas must have shape (Hq,) = ({hq},), got {tuple(alphas.shape)}, "
                         f"{tuple(betas.shape)}")
    if sink < 0:
        raise ValueError(f"sink must be >= 0, got {sink}")
    n = q.shape[1]
    spans = moa_spans(alphas, betas, n).to(q.device)
    lay = moa_layout(spans, sink, n, block_size).unsqueeze(0)  # (1, Hq, nb, nb)
    return block_gather_attention(q, k, v, lay, block_size, extra_mask=_MoAMask(spans, sink), scale=scale)


def _flops(cfg: dict) -> float:
    b, n, c, h = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    spans = moa_spans(torch.tensor(cfg["alphas"]), torch.tensor(cfg["betas"]), n)
    pairs = sum(min(n * (n + 1) // 2, int(s) * n + cfg["sink"] * n) for s in spans)
    return 8 * b * n * c * c + 4 * b * pairs * (c // h)


_DEFAULT = {"batch": 2, "seq_len": 64, "dim": 32, "num_heads": 4, "alphas": [4.0, 8.0, 0.0, -4.0],
            "betas": [0.0, 0.0, 0.25, 0.5], "sink": 4, "block_size": 8}


def _example(config: dict | None = None):
    c = {**_DEFAULT, **(config or {})}
    m = MoA(c["dim"], c["num_heads"], alphas=c["alphas"], betas=c["betas"], sink=c["sink"], block_size=c["block_size"])
    return m, (torch.randn(c["batch"], c["seq_len"], c["dim"]),)


@register(
    name="moa", family="sparse",
    paper=Paper("MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression",
                "2406.14909", 2024),
    patterns=("causal-self",), complexity="O(N (alpha_h + beta_h N) D) per head", flops=_flops,
    example=_example, default_config=_DEFAULT,
    notes="N in the span rule is the length of the call (prompt length); spans round to the nearest token "
          "and clamp to [1, N]; sink = 64 tokens by default (the reference's one global block of 64). "
          "The profiling/search that chooses (alpha, beta) is not implemented: the plan is an input.",
)
class MoA(nn.Module):
    """MoA causal self-attention with a fixed per-head span plan.

    Args:
        dim: ``C``; num_heads: ``H``; alphas, betas: per-head span rule (length ``H``);
        sink: initial tokens always visible; block_size: engine tile.

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> m = MoA(64, 4, alphas=[256, 512, 0, 128], betas=[0, 0, 0.25, 0.1])
        >>> y = m(torch.randn(1, 2048, 64))
    """

    def __init__(self, dim: int, num_heads: int, *, alphas, betas, sink: int = 64, block_size: int = 64,
                 bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.sink, self.block_size = num_heads, sink, block_size
        self.register_buffer("alphas", torch.as_tensor(alphas, dtype=torch.float64).reshape(-1), persistent=True)
        self.register_buffer("betas", torch.as_tensor(betas, dtype=torch.float64).reshape(-1), persistent=True)
        if self.alphas.numel() != num_heads or self.betas.numel() != num_heads:
            raise ValueError(f"alphas and betas need one entry per head ({num_heads})")
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)  # (B, N, H, D)
        o = moa_attention(q, k, v, self.alphas, self.betas, sink=self.sink, block_size=self.block_size)
        return self.proj(o.reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, sink={self.sink}, block={self.block_size}"
