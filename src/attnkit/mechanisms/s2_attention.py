"""S2-Attention: Hardware-Aware Context Sharding Among Attention Heads (arXiv 2407.17678).

Each head sees a local band of blocks plus a strided shard of distant blocks, at absolute
block positions offset per head, so that the heads together cover the context (HHST). The
per-head block layout plus a causal element mask runs on the block-gather engine.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit._validate import check_qkv
from attnkit.backends.block_gather import block_gather_attention
from attnkit.registry import Paper, register


class _Causal:
    def mask_mod(self, b, h, q_idx, kv_idx):
        return q_idx >= kv_idx


def s2_layout(num_heads: int, n_blocks: int, local_blocks: int, vert_stride: int, *, causal: bool = True,
              num_dense_heads: int = 0, head_offset: int = 0, homo_head: bool = False,
              device: torch.device | None = None) -> torch.Tensor:
    """Block layout ``(H, n, n)`` of S2-Attention (dkernel's rule).

    causal: ``i >= j and (i - j < l or (j + h*sigma + o) % v == 0)`` with ``sigma = max(1, v // H)``
    (``sigma = 0`` for homogeneous heads); bidirectional: ``((left + right) % v == 0)`` with
    ``left = max(0, i - j - l + 1)``, ``right = max(0, j - i - l + 1)``. The last
    ``num_dense_heads`` heads are dense (causal or full).
    """
    if local_blocks < 1 or vert_stride < 1:
        raise ValueError(f"local_blocks and vert_stride must be >= 1, got {local_blocks}, {vert_stride}")
    if not 0 <= num_dense_heads <= num_heads:
        raise ValueError(f"num_dense_heads must be in [0, {num_heads}], got {num_dense_heads}")
    i = torch.arange(n_blocks, device=device).view(1, -1, 1)
    j = torch.arange(n_blocks, device=device).view(1, 1, -1)
    h = torch.arange(num_heads, device=device).view(-1, 1, 1)
    sigma = 0 if homo_head else max(1, vert_stride // num_heads)
    if causal:
        lay = (i >= j) & ((i - j < local_blocks) | ((j + h * sigma + head_offset) % vert_stride == 0))
        dense = (i >= j).expand_as(lay)
    else:
        left = (i - j - local_blocks + 1).clamp_min(0)
        right = (j - i - local_blocks + 1).clamp_min(0)
        lay = ((left + right) % vert_stride == 0).expand(num_heads, n_blocks, n_blocks)
        dense = torch.ones_like(lay)
    is_dense = (h >= num_heads - num_dense_heads).expand_as(lay)
    return torch.where(is_dense, dense, lay)


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, local_blocks: int,
                 vert_stride: int, *, causal: bool = True, num_dense_heads: int = 0, head_offset: int = 0,
                 homo_head: bool = False, scale: float | None = None) -> torch.Tensor:
    """S2-Attention (heterogeneous strided + local block-sparse heads).

    Args:
        q: ``(B, N, Hq, D)``; k: ``(B, N, Hkv, D)``; v: ``(B, N, Hkv, Dv)``. With GQA the pattern is
            indexed by the KV head and shared by its query group (keeps the KV savings).
        block_size: ``b``; local_blocks: ``l`` (incl. the current block); vert_stride: ``v``.
        causal, num_dense_heads, head_offset, homo_head: see :func:`s2_layout`.

    Returns:
        ``(B, N, Hq, Dv)``.

    Example:
        >>> q = k = v = torch.randn(1, 1024, 8, 32)
        >>> out = s2_attention(q, k, v, block_size=64, local_blocks=4, vert_stride=8)
    """
    hq, hkv = check_qkv(q, k, v, same_extent=True)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    n = math.ceil(q.shape[1] / block_size)
    lay = s2_layout(hkv, n, local_blocks, vert_stride, causal=causal, num_dense_heads=num_dense_heads,
                    head_offset=head_offset, homo_head=homo_head, device=q.device)
    lay = lay.repeat_interleave(hq // hkv, dim=0).unsqueeze(0)  # (1, Hq, n, n)
    return block_gather_attention(q, k, v, lay, block_size, extra_mask=_Causal() if causal else None, scale=scale)


def _density(cfg: dict) -> float:
    n = math.ceil(cfg["seq_len"] / cfg["block_size"])
    lay = s2_layout(cfg["num_heads"], n, cfg["local_blocks"], cfg["vert_stride"], causal=cfg["causal"])
    return lay.float().mean().item()


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    return 8 * b * n * c * c + 4 * b * n * n * c * _density(cfg)


_DEFAULT = {"batch": 2, "seq_len": 64, "dim": 32, "num_heads": 4, "block_size": 4, "local_blocks": 2,
            "vert_stride": 4, "causal": True}


def _example(config: dict | None = None):
    c = {**_DEFAULT, **(config or {})}
    m = S2Attention(c["dim"], c["num_heads"], block_size=c["block_size"], local_blocks=c["local_blocks"],
                    vert_stride=c["vert_stride"], causal=c["causal"])
    return m, (torch.randn(c["batch"], c["seq_len"], c["dim"]),)


@register(
    name="s2_attention", family="sparse",
    paper=Paper("S2-Attention: Hardware-Aware Context Sharding Among Attention Heads", "2407.17678", 2024),
    patterns=("causal-self", "noncausal-self"), complexity="O(N (l b + N / v) D)", flops=_flops,
    example=_example, default_config=_DEFAULT,
    notes="dkernel's layout rule: absolute stripes offset by h*max(1, v // H) (causal); the bidirectional "
          "rule (relative stripes) is the same for every head. GQA: indexed by KV head. The layer-level "
          "hybrid (dense every n-th layer) is a model choice outside this module.",
)
class S2Attention(nn.Module):
    """S2-Attention self-attention layer.

    Args:
        dim: ``C``; num_heads: ``H``; block_size: ``b`` (64); local_blocks: ``l`` (16);
        vert_stride: ``v`` (8); causal; num_dense_heads: dense heads at the end.

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = S2Attention(256, 8, block_size=64, local_blocks=4, vert_stride=8)(torch.randn(1, 2048, 256))
    """

    def __init__(self, dim: int, num_heads: int, *, block_size: int = 64, local_blocks: int = 16,
                 vert_stride: int = 8, causal: bool = True, num_dense_heads: int = 0, bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.block_size = num_heads, block_size
        self.local_blocks, self.vert_stride = local_blocks, vert_stride
        self.causal, self.num_dense_heads = causal, num_dense_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)  # (B, N, H, D)
        o = s2_attention(q, k, v, self.block_size, self.local_blocks, self.vert_stride, causal=self.causal,
                         num_dense_heads=self.num_dense_heads)
        return self.proj(o.reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, block={self.block_size}, local={self.local_blocks}, " \
               f"vert_stride={self.vert_stride}, causal={self.causal}"
