"""Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers (arXiv 2303.13755).

Multi-head self-attention whose connectivity comes from the paper's low-rank predictor (reduced channels
``D -> D / reduce_c``, keys reduced along tokens ``N -> N / reduce_n`` by a learned ``W_n``, a thresholded
learned basis ``U``); the module holds the parameters and calls
:func:`~attnkit.ops.routed.sparsifiner.sparsifiner_attention` on the predicted ``C`` and ``U``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.ops.routed.sparsifiner import sparsifiner_attention
from attnkit.reference.naive_sparse2 import naive_sparsifiner_module
from attnkit.registry import Family, Paper, check_input, choice_option, divisible, float_option, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, h = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    d = c // h
    dc, r = max(1, d // cfg["reduce_c_factor"]), max(1, cfg["num_tokens"] // cfg["reduce_n_factor"])
    kept = math.ceil(cfg["keep_rate"] * n)
    predictor = 2 * b * n * h * (2 * d * dc + r * dc + r * dc + r * n)  # projections, W_n, C, C U
    return 8 * b * n * c * c + predictor + 4 * b * h * n * kept * d


_DEFAULT = {"dim": 32, "num_heads": 4, "num_tokens": 64, "keep_rate": 0.25, "reduce_n_factor": 8,
            "reduce_c_factor": 2, "basis_threshold": 0.0, "cls_tokens": 1, "granularity": "token", "block_size": 64}
_TINY = {"dim": 8, "num_heads": 2, "num_tokens": 24, "reduce_n_factor": 4}


def _options(c: dict) -> dict:
    return {k: c[k] for k in ("dim", "num_heads", "num_tokens", "keep_rate", "reduce_n_factor", "reduce_c_factor",
                              "basis_threshold", "cls_tokens", "granularity", "block_size")}


@register(
    name="sparsifiner", family=Family.ROUTED,
    paper=Paper("Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers",
                "2303.13755", 2023),
    patterns=("noncausal-self",), complexity="O(N (N/8) D/2 + N nnz(U col) + N k D)", flops=_flops,
    options=_options, reference=naive_sparsifiner_module, functional=sparsifiner_attention,
    default_config=_DEFAULT, tiny_config=_TINY, default_input={"batch": 2, "seq_len": 64},
    tiny_input={"batch": 1, "seq_len": 12},
    notes="Predictor as the released code (models/sparsifiner.py MaskPredictor): Linear(D, D/2) with bias on q and "
          "k shared over heads, W_n (N, N/8), coefficient scale H^-1/2 (coef_scale), U = |W_up^T| with entries "
          "<= basis_threshold set to 0, the CLS row (cls_tokens=1) attends every key, top_k = ceil(keep_rate N), "
          "mask detached (no gradient reaches the predictor from the output: train it with `connectivity(x)` "
          "against a teacher's attention, the paper's reconstruction loss). Ties in the top-k go to the lower key "
          "index. Deviations: the CLS row's predictor output is computed and ignored rather than sliced off; "
          "inputs shorter than num_tokens use the first N rows of W_n and W_up (the paper fixes N); the "
          "optional top-8 / threshold sparsification of C and token pruning are not offered. "
          "granularity='block' is an attnkit option (tile-mean score, ceil(top_k / block) key blocks per query "
          "block) that runs at the kept-pair cost; 'token' is the paper's rule and computes about every tile at "
          "keep rate 0.25 (unstructured top-k touches nearly all 64x64 tiles) and its N^2 top-k selection costs more "
          "than dense attention on CPU (sparse-suite cases: block at N=16384 about 58-74% of the 4x ideal, token at "
          "N=4096 about 1%, busy-machine figures). The paper's N/8 predictor rank makes C U an O(N^3/8) product "
          "at long N: it is a ViT-length (N ~ 200) design.",
)
class SparsifinerAttention(nn.Module):
    """Sparsifiner self-attention layer.

    Args:
        dim: ``C``; num_heads: ``H``; num_tokens: the longest ``N`` (the predictor's token axis is learned);
        keep_rate: ``rho``, keys kept per query ``ceil(rho N)``; reduce_n_factor / reduce_c_factor: the
        predictor's token and channel reductions; basis_threshold: ``tau`` of ``U``; cls_tokens: leading rows
        attending every key (1: the ViT CLS token); granularity: ``"token"`` (paper) or ``"block"``;
        block_size: its block; coef_scale: the coefficient logit scale (default ``H ** -0.5``, as released);
        qkv_bias: bias of the q, k, v projection.

    Shapes:
        ``x (B, N, C)`` with ``N <= num_tokens`` -> ``(B, N, C)``.

    Example:
        >>> y = SparsifinerAttention(384, 6, num_tokens=197)(torch.randn(2, 197, 384))
    """

    def __init__(self, dim: int, num_heads: int, num_tokens: int, *, keep_rate: float = 0.25,
                 reduce_n_factor: int = 8, reduce_c_factor: int = 2, basis_threshold: float = 0.0,
                 cls_tokens: int = 1, granularity: str = "token", block_size: int = 64,
                 coef_scale: float | None = None, qkv_bias: bool = False):
        super().__init__()
        d = divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.num_tokens = int_option(self, "num_tokens", num_tokens, 1)
        self.keep_rate = float_option(self, "keep_rate", keep_rate, minimum=0.0, exclusive=True)
        if self.keep_rate > 1:
            raise ValueError(f"{type(self).__name__}: keep_rate must be in (0, 1], got {keep_rate}")
        int_option(self, "reduce_n_factor", reduce_n_factor, 1)
        int_option(self, "reduce_c_factor", reduce_c_factor, 1)
        self.reduce_n_factor, self.reduce_c_factor = reduce_n_factor, reduce_c_factor
        self.basis_threshold = float_option(self, "basis_threshold", basis_threshold, minimum=0.0)
        self.cls_tokens = int_option(self, "cls_tokens", cls_tokens, 0)
        self.granularity = choice_option(self, "granularity", granularity, ("token", "block"))
        self.block_size = int_option(self, "block_size", block_size, 1)
        self.coef_scale = float_option(self, "coef_scale", num_heads ** -0.5 if coef_scale is None else coef_scale)
        rc, rn = max(1, d // reduce_c_factor), max(1, num_tokens // reduce_n_factor)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)  # biased, as the released (timm ViT) attention
        self.proj_c_q = nn.Linear(d, rc)
        self.proj_c_k = nn.Linear(d, rc)
        self.proj_n = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_tokens, rn), std=0.02))       # W_n
        self.proj_back_n = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_tokens, rn), std=0.02))  # W_up^T

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_input(self, x, "(B, N, C)", channels=self.dim, meta="its top-k connectivity depends on the values")
        b, n, c = x.shape
        if n > self.num_tokens:
            raise ValueError(f"{type(self).__name__}: x has N={n} tokens, more than num_tokens={self.num_tokens} "
                             "(the predictor's token axis is learned)")
        return self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)  # (B, N, H, D)

    def _predictor(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``C (B, N, H, R)`` and ``U (R, N)`` (section 3.2)."""
        n = q.shape[1]
        qc, kc = self.proj_c_q(q), self.proj_c_k(k)                       # (B, N, H, D/2)
        kr = torch.einsum("bnhc,nr->brhc", kc, self.proj_n[:n])           # (B, R, H, D/2): tokens reduced
        coef = torch.softmax(torch.einsum("bnhc,brhc->bnhr", qc, kr) * self.coef_scale, dim=-1)
        u = self.proj_back_n[:n].t().abs()                                 # (R, N)
        return coef, torch.where(u > self.basis_threshold, u, torch.zeros((), dtype=u.dtype))

    def connectivity(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted connectivity ``M~ = C U`` ``(B, H, N, N)``, differentiable w.r.t. the predictor (for the
        paper's reconstruction loss against a teacher's attention)."""
        q, k, _ = self._qkv(x)
        coef, basis = self._predictor(q, k)
        return torch.einsum("bnhr,rm->bhnm", coef, basis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        b, n, c = x.shape
        coef, basis = self._predictor(q, k)
        o = sparsifiner_attention(q, k, v, coef, basis, top_k=self.top_k_for(n), granularity=self.granularity,
                                  block_size=self.block_size, cls_tokens=min(self.cls_tokens, n))
        return self.proj(o.reshape(b, n, c))  # (B, N, C)

    def top_k_for(self, n: int) -> int:
        """Keys kept per query for ``n`` tokens: ``ceil(keep_rate n)``."""
        return max(1, math.ceil(self.keep_rate * n))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, num_tokens={self.num_tokens}, keep_rate={self.keep_rate}, "
                f"granularity={self.granularity}, block={self.block_size}, cls_tokens={self.cls_tokens}")
