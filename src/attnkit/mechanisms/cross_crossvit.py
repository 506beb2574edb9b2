"""CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification (arXiv 2103.14899).

Two ViT branches fuse through their CLS tokens (§3.3): branch ``l``'s CLS token, projected to the
other branch's width, is the only query over that branch's patch tokens plus itself; the result,
added to the projected CLS and projected back, replaces branch ``l``'s CLS token. One query makes
the fusion linear in the number of tokens. The attention is ``ak.attention`` with ``Nq = 1``: the
paper adds a wiring, not a new attention operator. :meth:`CrossViTCLSAttention.from_timm` copies
timm's ``crossvit.CrossAttention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.dense.call import attention
from attnkit.reference.naive_cross import naive_crossvit_cls_module
from attnkit.registry import Family, Paper, check_input, choice_option, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    m = cfg.get("context_len") or n
    # one query: q and out projections on one token, k and v on every token of the fused sequence
    return 2 * b * (2 * c * c + 2 * m * c * c) + 4 * b * m * c + (4 * b * c * c if cfg["fusion"] == "full" else 0)


def _options(cfg: dict) -> dict:
    return {"dim": cfg["dim"], "num_heads": cfg["num_heads"], "fusion": cfg["fusion"]}


@register(
    name="crossvit_cls", family=Family.CROSS,
    paper=Paper("CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification", "2103.14899",
                2021),
    patterns=("noncausal-cross",), complexity="O(M d^2 + M d)", flops=_flops, options=_options,
    reference=naive_crossvit_cls_module, functional=attention,
    default_config={"dim": 64, "num_heads": 4, "fusion": "full"},
    tiny_config={"dim": 8, "num_heads": 2},
    default_input={"batch": 2, "seq_len": 65}, tiny_input={"batch": 1, "seq_len": 6},
    notes="No new op: the CLS row is ak.attention with one query over [CLS; other branch's patches] (keys include "
          "the query token). fusion='full' is one direction of timm's MultiScaleBlock fusion (LN-GELU-Linear to the "
          "other width, LN, cross-attention, residual on the projected CLS, LN-GELU-Linear back; no MLP, as the "
          "released models); fusion='attention' is timm's CrossAttention alone on [x_cls; context patches]. "
          "Token 0 of x and of the context is the CLS token; x's patch tokens pass through unchanged. LayerNorm "
          "eps 1e-6, qkv bias on (released models). Without a context the branch fuses with itself.",
)
class CrossViTCLSAttention(nn.Module):
    """CrossViT's CLS-token cross-attention from branch ``x`` into branch ``context``.

    Args:
        dim: ``C`` of branch ``x``; num_heads: ``H`` (the other branch's head count in the paper).
        context_dim: width of the other branch (default ``C``); the attention runs at this width.
        fusion: ``"full"`` (projections, norm and residual of the paper's fusion) or ``"attention"``
            (timm's ``CrossAttention`` alone; needs ``context_dim == dim``).
        qkv_bias: bias on the q/k/v projections (True in the released models).

    Shapes:
        ``x (B, 1 + N, C)``, ``context (B, 1 + M, Cctx)`` (CLS first) -> ``(B, 1 + N, C)``: the CLS
        token replaced by the fused one, the patch tokens unchanged.

    Example:
        >>> m = CrossViTCLSAttention(192, 6, context_dim=384)
        >>> small = m(small_tokens, large_tokens)
    """

    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None, fusion: str = "full",
                 qkv_bias: bool = True):
        super().__init__()
        int_option(self, "dim", dim, 1)
        context_dim = dim if context_dim is None else int_option(self, "context_dim", context_dim, 1)
        divisible(self, context_dim, num_heads, "context_dim")
        self.fusion = choice_option(self, "fusion", fusion, ("full", "attention"))
        if fusion == "attention" and context_dim != dim:
            raise ValueError(f"{type(self).__name__}: fusion='attention' needs context_dim == dim, got {context_dim} "
                             f"and {dim}")
        self.dim, self.context_dim, self.num_heads = dim, context_dim, num_heads
        cd = context_dim
        if fusion == "full":
            self.f_norm, self.f_proj = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, cd)
            self.norm = nn.LayerNorm(cd, eps=1e-6)
            self.g_norm, self.g_proj = nn.LayerNorm(cd, eps=1e-6), nn.Linear(cd, dim)
        self.wq, self.wk, self.wv = (nn.Linear(cd, cd, bias=qkv_bias) for _ in range(3))
        self.proj = nn.Linear(cd, cd)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        if context is None:
            if self.context_dim != self.dim:
                raise ValueError(f"{type(self).__name__}: context is required when context_dim ({self.context_dim}) "
                                 f"differs from dim ({self.dim})")
            context = x
        check_input(self, context, "(B, M, C)", channels=self.context_dim, name="context")
        b, h = x.shape[0], self.num_heads
        cls = x[:, :1]
        if self.fusion == "full":
            cls = self.f_proj(F.gelu(self.f_norm(cls)))                          # (B, 1, Cctx)
        z = torch.cat([cls, context[:, 1:]], 1)                                  # (B, M, Cctx)
        zn = self.norm(z) if self.fusion == "full" else z
        q = self.wq(zn[:, :1]).reshape(b, 1, h, -1)                              # (B, 1, H, D)
        k = self.wk(zn).reshape(b, z.shape[1], h, -1)                            # (B, M, H, D)
        v = self.wv(zn).reshape(b, z.shape[1], h, -1)
        o = self.proj(attention(q, k, v).reshape(b, 1, -1))                      # (B, 1, Cctx)
        if self.fusion == "full":
            o = self.g_proj(F.gelu(self.g_norm(cls + o)))                        # (B, 1, C)
        return torch.cat([o, x[:, 1:]], 1)

    @classmethod
    def from_timm(cls, module) -> CrossViTCLSAttention:
        """The same attention from timm's ``crossvit.CrossAttention`` (``fusion="attention"``):
        ``timm_module(x) == m(x)[:, :1]`` for ``x (B, N, C)``.

        timm's scale is ``head_dim ** -0.5``, as here; its dropouts act only in training.
        """
        who = f"{cls.__name__}.from_timm"
        if type(module).__name__ != "CrossAttention" or not all(hasattr(module, a) for a in ("wq", "wk", "wv", "proj")):
            raise TypeError(f"{who}: expected timm.models.crossvit.CrossAttention, got {type(module).__name__}")
        dim, heads = module.wq.in_features, module.num_heads
        if abs(module.scale - (dim // heads) ** -0.5) > 1e-12:
            raise ValueError(f"{who}: the module's scale {module.scale} is not head_dim ** -0.5 (an old checkpoint "
                             "convention); not supported")
        m = cls(dim, heads, fusion="attention", qkv_bias=module.wq.bias is not None)
        m = m.to(module.wq.weight.device, module.wq.weight.dtype)
        with torch.no_grad():
            for name in ("wq", "wk", "wv", "proj"):
                mine, theirs = getattr(m, name), getattr(module, name)
                mine.weight.copy_(theirs.weight)
                if mine.bias is not None:
                    mine.bias.copy_(theirs.bias)
        return m

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, context_dim={self.context_dim}, fusion={self.fusion}"
