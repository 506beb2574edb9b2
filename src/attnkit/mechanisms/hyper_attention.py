"""HyperAttention: Long-context Attention in Near-Linear Time (arXiv 2310.05869).

The module: parameters and projections around the op in ``attnkit.ops.routed.hyper``, whose docstring
describes the algorithm.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.ops.routed.hyper import hyper_attention
from attnkit.reference.naive_modules import naive_hyper_module
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, h = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    bs, m, nmin = cfg["block_size"], cfg["sample_size"], cfg["min_seq_len"]
    d = c // h
    if n <= nmin:
        return 8 * b * n * c * c + 4 * b * h * n * n * d / (2 if cfg["causal"] else 1)
    levels = math.ceil(math.log2(n / nmin)) if cfg["causal"] else 1
    return 8 * b * n * c * c + 4 * b * h * n * (bs + m) * d * levels + 4 * b * h * n * nmin * d / 2


_DEFAULT = {"dim": 32, "num_heads": 4, "block_size": 8, "sample_size": 8, "lsh_bits": 3, "min_seq_len": 16,
            "causal": True, "seed": 0}
# N = 16 over min 4: the causal path recurses twice, every level hashes and samples
_TINY = {"dim": 8, "num_heads": 2, "block_size": 4, "sample_size": 3, "lsh_bits": 2, "min_seq_len": 4}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "block_size": c["block_size"],
            "sample_size": c["sample_size"], "lsh_bits": c["lsh_bits"], "min_seq_len": c["min_seq_len"],
            "causal": c["causal"], "seed": c["seed"]}


@register(
    name="hyper_attention", family=Family.ROUTED,
    paper=Paper("HyperAttention: Long-context Attention in Near-Linear Time", "2310.05869", 2023),
    patterns=("noncausal-self", "causal-self"),
    complexity="O(N (b + m) D log(N / n_min) + n_min N D)", flops=_flops, options=_options,
    reference=naive_hyper_module, functional=hyper_attention, default_config=_DEFAULT, tiny_config=_TINY,
    default_input={"batch": 2, "seq_len": 64}, tiny_input={"batch": 1, "seq_len": 16},
    notes="Released (practical) estimator: uniform sampling with replacement, own-block samples dropped, weight "
          "n_k/m as an ln(n_k/m) lse shift; Gray rank g^-1(c) (not the reference's g(c)); one set of LSH "
          "directions per call shared by all batch elements and heads (hashing per query head under GQA); ragged "
          "lengths padded (padded keys masked, rank order unchanged); causal recursion splits at n//2; exact "
          "attention (ak.attention) when max(Nq, Nk) <= min_seq_len. The module runs the op once per example with "
          "a generator seeded from `seed` each time, so every example gets the same LSH directions and samples "
          "whatever batch it is in: the layer is a fixed function of each example (m(x)[i] == m(x[i:i+1])).",
)
class HyperAttention(nn.Module):
    """HyperAttention self-attention layer (projections -> :func:`hyper_attention` -> projection).

    Args:
        dim: ``C``; num_heads: ``H``; block_size, sample_size, lsh_bits, min_seq_len, causal: see
        :func:`hyper_attention`; seed: the generator seed, reset for every example of every forward
        (the random draws do not depend on the batch an example is in).

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = HyperAttention(256, 4, causal=True)(torch.randn(1, 16384, 256))
    """

    def __init__(self, dim: int, num_heads: int, *, block_size: int = 256, sample_size: int = 256,
                 lsh_bits: int = 7, min_seq_len: int = 4096, causal: bool = False, seed: int = 0, bias: bool = False):
        super().__init__()
        divisible(self, dim, num_heads)
        for name, value in (("block_size", block_size), ("sample_size", sample_size), ("lsh_bits", lsh_bits),
                            ("min_seq_len", min_seq_len)):
            int_option(self, name, value, 1)
        if lsh_bits > 30:
            raise ValueError(f"{type(self).__name__}: lsh_bits must be <= 30, got {lsh_bits}")
        self.dim, self.num_heads, self.causal = dim, num_heads, bool(causal)
        self.seed = int_option(self, "seed", seed, 0)
        self.kw = {"block_size": block_size, "sample_size": sample_size, "lsh_bits": lsh_bits,
                   "min_seq_len": min_seq_len}
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim, meta="LSH buckets depend on the values")
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)  # (B, N, H, D)
        # one op call per example, each with a fresh generator: the op draws its samples per (batch, head)
        # in order, so a batched call would give example i draws that depend on examples 0..i-1
        o = torch.cat([hyper_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], causal=self.causal,
                                       generator=torch.Generator().manual_seed(self.seed), **self.kw)
                       for i in range(b)])  # (B, N, H, D)
        return self.proj(o.reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, causal={self.causal}, seed={self.seed}, {self.kw}"

