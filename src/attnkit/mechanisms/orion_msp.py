"""Orion-MSP: Multi-Scale Sparse Attention for Tabular In-Context Learning (arXiv 2511.02818).

The attention layer of one scale of Orion-MSP's row interaction: projections around
:func:`~attnkit.ops.routed.orion.orion_msp_attention` (special tokens, window, random links).
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.routed.orion import orion_msp_attention, orion_msp_mask
from attnkit.reference.naive_sparse2 import naive_orion_msp_module
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register


def _allowed_pairs(cfg: dict) -> int:
    n = cfg["seq_len"]
    m = orion_msp_mask(n, cfg["num_special"], cfg["window"], cfg["num_random"], cfg["random_block"], cfg["seed"])
    return m.count(n, n)


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    return 8 * b * n * c * c + 4 * b * _allowed_pairs(cfg) * c


_DEFAULT = {"dim": 32, "num_heads": 4, "num_special": 6, "window": 4, "num_random": 2, "random_block": 1, "seed": 0}
_TINY = {"dim": 8, "num_heads": 2, "num_special": 3, "window": 2, "num_random": 2}


def _options(c: dict) -> dict:
    return {k: c[k] for k in ("dim", "num_heads", "num_special", "window", "num_random", "random_block", "seed")}


@register(
    name="orion_msp", family=Family.LOCAL,
    paper=Paper("Orion-MSP: Multi-Scale Sparse Attention for Tabular In-Context Learning", "2511.02818", 2025),
    patterns=("noncausal-self",), complexity="O(L (2w + 1 + n_special + n_rand b) D)", flops=_flops,
    options=_options, reference=naive_orion_msp_module, functional=orion_msp_attention,
    default_config=_DEFAULT, tiny_config=_TINY, default_input={"batch": 2, "seq_len": 64},
    tiny_input={"batch": 1, "seq_len": 12},
    notes="One scale's row-interaction attention (allow(i, j) = i or j special, |i - j| <= window, i == j, or a "
          "random link), True = attend (the released builder returns True = blocked for nn.MultiheadAttention). "
          "The input's first num_special tokens are the CLS + global tokens (the model prepends them); the "
          "multi-scale pooling of features, RoPE, the per-scale encoders and the CLS averaging are the model's "
          "part, not the attention's. Random links: the released builder draws, per non-special query, "
          "randperm(L - n_special)[:n_rand] + n_special from the global generator at every mask build; here they "
          "come from a generator seeded with `seed` (one draw per query block, in the same order), so a fixed "
          "seed is deterministic, and random_block=b > 1 draws BigBird-style key blocks per query block (b=1 is "
          "the released rule; 64 aligns the links with the kernel tiles). Deviation found in the released code "
          "(interaction.py, _build_block_sparse_mask): its window term `(dist <= window) * 0.0 + -inf` is -inf "
          "everywhere, so the released model attends specials + diagonal + random links only; window=0 "
          "reproduces that, window > 0 is the paper's sliding window (the default here, w=4 as the code's "
          "default argument). Repository defaults: n_cls=4, n_global=2 (num_special=6), window=4, n_rand=0.",
)
class OrionMSPAttention(nn.Module):
    """Orion-MSP sparse self-attention layer (one scale).

    Args:
        dim: ``C``; num_heads: ``H``; num_special: leading CLS + global tokens (full rows and columns);
        window: ``|i - j| <= window`` attended; num_random: random links per query block; random_block:
        their block size (1 = per token, as released); seed: their generator's seed; bias: projection biases.

    Shapes:
        ``x (B, L, C)`` -> ``(B, L, C)``.

    Example:
        >>> y = OrionMSPAttention(64, 4, num_special=6, window=4)(torch.randn(2, 38, 64))
    """

    def __init__(self, dim: int, num_heads: int, *, num_special: int = 6, window: int = 4, num_random: int = 0,
                 random_block: int = 1, seed: int = 0, bias: bool = True):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.num_special = int_option(self, "num_special", num_special, 0)
        self.window = int_option(self, "window", window, 0)
        self.num_random = int_option(self, "num_random", num_random, 0)
        self.random_block = int_option(self, "random_block", random_block, 1)
        self.seed = int_option(self, "seed", seed, 0)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)  # (B, L, H, D)
        o = orion_msp_attention(q, k, v, num_special=self.num_special, window=self.window,
                                num_random=self.num_random, random_block=self.random_block, seed=self.seed)
        return self.proj(o.reshape(b, n, c))  # (B, L, C)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, num_special={self.num_special}, window={self.window}, "
                f"num_random={self.num_random}, random_block={self.random_block}, seed={self.seed}")
