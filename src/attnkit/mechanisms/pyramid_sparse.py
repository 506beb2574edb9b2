"""PSA: Pyramid Sparse Attention for Efficient Video Understanding and Generation (arXiv 2512.04025).

The module: parameters and projections around the op in ``attnkit.ops.routed.psa``, whose docstring
describes the algorithm.
"""
from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.routed.psa import DEFAULT_RATIOS, PSAConfig, psa_attention
from attnkit.reference.naive_modules import naive_pyramid_sparse
from attnkit.registry import Family, Paper, check_input, divisible, named_errors, register


def _flops(cfg: dict) -> float:
    b, n, c, h = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    dens = sum(f / 2 ** i for i, f in enumerate(cfg["mask_ratios"]))
    d = c // h
    return 8 * b * n * c * c + 4 * b * h * (n / 4) ** 2 * d + 4 * b * h * n * n * dens * d


_DEFAULT = {"dim": 32, "num_heads": 4, "block_q": 16, "block_kv": 8, "levels": 4,
            "mask_ratios": (0.25, 0.25, 0.0, 0.25), "causal": False}
# four KV blocks: one at x1, one pooled x2, one pooled x4, one skipped
_TINY = {"dim": 8, "num_heads": 2, "block_q": 4, "block_kv": 4, "levels": 3, "mask_ratios": (0.25, 0.25, 0.25)}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "block_q": c["block_q"], "block_kv": c["block_kv"],
            "levels": c["levels"], "mask_ratios": tuple(c["mask_ratios"]), "causal": c["causal"]}


@register(
    name="pyramid_sparse", family=Family.ROUTED,
    paper=Paper("PSA: Pyramid Sparse Attention for Efficient Video Understanding and Generation", "2512.04025", 2025),
    patterns=("noncausal-self", "causal-self"), complexity="O(N^2 D / 16 + N D sum_l f_l N / r_l)", flops=_flops,
    options=_options, reference=naive_pyramid_sparse, functional=psa_attention,
    default_config=_DEFAULT, tiny_config=_TINY, default_input={"batch": 2, "seq_len": 64},
    tiny_input={"batch": 1, "seq_len": 16},
    notes="Level map = pool factors {0,1,2,4,8} from rank bands per query-block row (cumulative round-half-up, "
          "top block always x1, ties to the lower index); importance = the sampled estimator (bq/4 x bk/4 "
          "strided samples, or random with a generator) for both causal and non-causal (the reference's causal "
          "anti-diagonal estimator is not reproduced; causal masks sampled future keys, excludes blocks starting "
          "after the query block and pins diagonal blocks at x1); pooled tokens are visible causally only when "
          "their last member is in the past; Nk % block_kv == 0 required; similarity constraint and "
          "thresholdbound mode not implemented; no gradient through routing.",
)
class PyramidSparseAttention(nn.Module):
    """PSA self-attention layer (projections -> :func:`psa_attention` -> projection).

    Args:
        dim: ``C``; num_heads: ``H``; block_q, block_kv, levels, mask_ratios, causal: see :class:`PSAConfig`.

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``, ``N % block_kv == 0``.

    Example:
        >>> y = PyramidSparseAttention(256, 4)(torch.randn(1, 4096, 256))
    """

    def __init__(self, dim: int, num_heads: int, *, block_q: int = 128, block_kv: int = 64, levels: int = 4,
                 mask_ratios: tuple[float, ...] = DEFAULT_RATIOS, causal: bool = False, bias: bool = False):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        with named_errors(self):
            self.config = PSAConfig(block_q, block_kv, levels, tuple(mask_ratios), bool(causal))
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim, meta="block importance and levels depend on the values")
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)  # (B, N, H, D)
        return self.proj(psa_attention(q, k, v, self.config).reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, {self.config}"

