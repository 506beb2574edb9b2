"""RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling (arXiv 2308.03429).

The module: parameters and projections around the op in ``attnkit.ops.dense.relative``, whose docstring
describes the algorithm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.dense.relative import relative_position_attention
from attnkit.reference.naive_modules import naive_rcmha
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    return 8 * b * n * c * c + 6 * b * n * n * c + 18 * b * n * c


_DEFAULT = {"dim": 64, "num_heads": 4, "max_rel": 64, "causal": True}
_TINY = {"dim": 8, "num_heads": 2, "max_rel": 8}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "max_rel": c["max_rel"], "causal": c["causal"]}


@register(
    name="rcmha", family=Family.DENSE,
    paper=Paper("RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling",
                "2308.03429", 2023),
    patterns=("causal-self", "noncausal-self"), complexity="O(N^2 H D)", flops=_flops,
    options=_options, reference=naive_rcmha, functional=relative_position_attention,
    default_config=_DEFAULT, tiny_config=_TINY, default_input={"batch": 2, "seq_len": 32},
    tiny_input={"batch": 1, "seq_len": 6},
    notes="Learned relative key embeddings R and scalar biases b (labml variant, not sinusoidal), direct "
          "t-s indexing instead of the shift trick; depthwise conv (kernel 3) shared by heads, causal left "
          "padding (centred padding when causal=False). u, R, b init 0; q/k without bias, v with bias. "
          "Lengths above P = max_rel raise.",
)
class RCMHA(nn.Module):
    """Relative convolutional multi-head attention.

    Args:
        dim: ``C``; num_heads: ``H``; kernel_size: depthwise conv taps (3); max_rel: ``P``
            (relative offsets in ``[-P, P)``); causal: causal attention and causal convolutions (default False,
            as every module of the library).

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = RCMHA(64, 4, max_rel=512)(torch.randn(2, 128, 64))
    """

    def __init__(self, dim: int, num_heads: int, *, kernel_size: int = 3, max_rel: int = 4096, causal: bool = False):
        super().__init__()
        divisible(self, dim, num_heads)
        int_option(self, "kernel_size", kernel_size, 1)
        int_option(self, "max_rel", max_rel, 1)
        self.dim = dim
        self.num_heads, self.head_dim, self.causal, self.kernel_size = num_heads, dim // num_heads, causal, kernel_size
        d = self.head_dim
        self.wq, self.wk = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.wv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.convs = nn.ModuleList(nn.Conv1d(d, d, kernel_size, groups=d) for _ in range(3))
        self.u = nn.Parameter(torch.zeros(num_heads, d))
        self.rel_k = nn.Parameter(torch.zeros(2 * max_rel, num_heads, d))
        self.rel_b = nn.Parameter(torch.zeros(2 * max_rel, num_heads))

    def _dwconv(self, conv: nn.Conv1d, t: torch.Tensor) -> torch.Tensor:
        """Depthwise conv along N of ``t (B, N, H, D)``, one kernel shared by heads.

        Written as a sum of shifted copies: ``Conv1d`` with ``groups=D`` takes a slow im2col
        path on CPU (fp64 especially) and costs more than the attention at these sizes.
        """
        n, kk = t.shape[1], self.kernel_size - 1
        left = kk if self.causal else kk // 2  # causal: left padding only, no future leak
        tp = F.pad(t, (0, 0, 0, 0, left, kk - left))  # (B, N + K - 1, H, D)
        w = conv.weight[:, 0].t()  # (K, D)
        out = conv.bias.view(1, 1, 1, -1).expand_as(t)
        for j in range(self.kernel_size):
            out = out + tp[:, j:j + n] * w[j]
        return out  # (B, N, H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        b, n, c = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q, k, v = (self._dwconv(cv, w(x).view(shape)) for cv, w in zip(self.convs, (self.wq, self.wk, self.wv)))
        o = relative_position_attention(q, k, v, self.u, self.rel_k, self.rel_b, causal=self.causal)
        return self.proj(o.reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kernel={self.kernel_size}, P={self.rel_k.shape[0] // 2}, causal={self.causal}"

