"""MixFormer: End-to-End Tracking with Iterative Mixed Attention (arXiv 2203.11082).

The mixed attention module (§3.2) runs one attention over the concatenated template and search tokens
with an asymmetric mask: template queries see template keys only (so template features can be cached
across frames), search queries see everything. The paper adds the mask,
:func:`attnkit.masks.cross.mixed_attention`; the attention is ``ak.attention``.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.masks.cross import mixed_attention
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_cross import naive_mixformer_module
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, nz = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_template"]
    area = n * n if cfg["symmetric"] else nz * nz + (n - nz) * n
    return 2 * b * n * 4 * c * c + 4 * b * area * c


@register(
    name="mixformer", family=Family.CROSS,
    paper=Paper("MixFormer: End-to-End Tracking with Iterative Mixed Attention", "2203.11082", 2022),
    patterns=("noncausal-self",), complexity="O((Nz^2 + Ns (Nz + Ns)) d)", flops=_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"], "num_template": c["num_template"],
                       "symmetric": c["symmetric"]},
    reference=naive_mixformer_module, functional=attention,
    default_config={"dim": 64, "num_heads": 4, "num_template": 64, "symmetric": False},
    tiny_config={"dim": 8, "num_heads": 2, "num_template": 2},
    default_input={"batch": 2, "seq_len": 320}, tiny_input={"batch": 1, "seq_len": 6},
    notes="No new op: ak.attention under mixed_attention(Nz). MixViT's linear q/k/v projections (MixCvT's "
          "depthwise-conv projections are not modelled); online templates are simply more template tokens.",
)
class MixedAttentionModule(nn.Module):
    """MixFormer's mixed attention over ``[template tokens; search tokens]``.

    Args:
        dim: ``C``; num_heads: ``H``; num_template: ``Nz``, the leading template tokens;
        symmetric: full attention over the concatenation (the paper's ablation).

    Shapes:
        ``x (B, Nz + Ns, C)`` -> ``(B, Nz + Ns, C)``.

    Example:
        >>> y = MixedAttentionModule(384, 6, num_template=128)(torch.cat([template, search], 1))
    """

    def __init__(self, dim: int, num_heads: int, *, num_template: int = 64, symmetric: bool = False,
                 qkv_bias: bool = True):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.num_template = int_option(self, "num_template", num_template, 0)
        self.symmetric = bool(symmetric)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim,
                    meta=None if self.symmetric else "the masked attention's tile walk reads tensor values")
        b, n, c = x.shape
        q, k, v = (t.reshape(b, n, self.num_heads, -1) for t in self.qkv(x).chunk(3, -1))   # (B, N, H, D)
        mask = None if self.symmetric else mixed_attention(self.num_template)
        return self.proj(attention(q, k, v, mask=mask).reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, num_template={self.num_template}, symmetric={self.symmetric}"
