"""Token Coordinated Prompt Attention is Needed for Visual Prompting (arXiv 2505.02406) — one TCPA layer.

Multi-head self-attention over ViT tokens (the first ``num_cls_tokens`` are [CLS]) with this layer's learnable
CLS prompts and image prompts as extra keys/values; the module holds the projections and prompts, builds the
visibility with :func:`~attnkit.ops.sequence.prompt.tcpa_prompt_mask` and calls
:func:`~attnkit.ops.sequence.prompt.prompt_attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.sequence.prompt import COORDINATIONS, prompt_attention, tcpa_prompt_mask
from attnkit.reference.naive_sequence3 import naive_prompt_module
from attnkit.registry import Family, Paper, check_input, choice_option, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    nc, npr, k = cfg["num_cls_prompts"], cfg["num_image_prompts"], cfg["top_k"]
    seen = {"token": min(k, npr), "role": npr, "none": nc + npr}[cfg["coordination"]]
    return float(b * (8 * n * c * c + 4 * n * (n + seen) * c + 2 * n * npr * c) + 6 * (nc + npr) * c * c)


_DEFAULT = {"dim": 768, "num_heads": 12, "num_cls_prompts": 10, "num_image_prompts": 10, "top_k": 5,
            "num_cls_tokens": 1, "coordination": "token"}


@register(
    name="prompt_attention", family=Family.VISION,
    paper=Paper("Token Coordinated Prompt Attention is Needed for Visual Prompting", "2505.02406", 2025),
    patterns=("noncausal-self",), complexity="O(N (N + Nc + k) C + N Np C)", flops=_flops,
    options=lambda c: {k: c[k] for k in _DEFAULT}, reference=naive_prompt_module, functional=prompt_attention,
    default_config=_DEFAULT,
    tiny_config={"dim": 8, "num_heads": 2, "num_cls_prompts": 2, "num_image_prompts": 4, "top_k": 2},
    default_input={"batch": 8, "seq_len": 197}, tiny_input={"batch": 2, "seq_len": 6},
    notes="One layer of VPT-deep with TCPA's coordination, on a token sequence (B, N, C) whose first num_cls_tokens "
          "tokens are [CLS]. The prompts pass through the layer's own K/V projection and act as keys/values only "
          "(their outputs are dropped, as VPT-deep replaces prompts at every layer). Role level: [CLS] sees the "
          "CLS prompts, image tokens the image prompts; token level: each image token sees its top_k image "
          "prompts by cosine similarity between its input and the prompts themselves (matching in >= float32, "
          "no gradient through the choice). The paper's matching keys and any auxiliary matching loss are not "
          "modelled: the prompts are their own keys, so every parameter is trained by the attention path. "
          "Defaults Nc = Np = 10, top_k = 5 are our choice (ViT-B/16 sizes). coordination='role' / 'none' "
          "(VPT-deep) as options; 0 prompts give plain attention. Non-causal (a ViT layer).",
)
class TokenCoordinatedPromptAttention(nn.Module):
    """TCPA attention layer.

    Args:
        dim: ``C``; num_heads: ``H``; num_cls_prompts: ``Nc``; num_image_prompts: ``Np``; top_k: image prompts
        per image token; num_cls_tokens: leading [CLS] tokens; coordination: ``"token"``, ``"role"``, ``"none"``.

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = TokenCoordinatedPromptAttention(768, 12)(torch.randn(2, 197, 768))
    """

    def __init__(self, dim: int, num_heads: int = 12, num_cls_prompts: int = 10, num_image_prompts: int = 10,
                 top_k: int = 5, num_cls_tokens: int = 1, coordination: str = "token"):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.num_heads = int_option(self, "num_heads", num_heads, 1)
        divisible(self, dim, num_heads)
        self.num_cls_prompts = int_option(self, "num_cls_prompts", num_cls_prompts, 0)
        self.num_image_prompts = int_option(self, "num_image_prompts", num_image_prompts, 0)
        self.top_k = int_option(self, "top_k", top_k, 1)
        self.num_cls_tokens = int_option(self, "num_cls_tokens", num_cls_tokens, 0)
        self.coordination = choice_option(self, "coordination", coordination, COORDINATIONS)
        self.cls_prompts = nn.Parameter(torch.randn(num_cls_prompts, dim) * 0.02)
        self.image_prompts = nn.Parameter(torch.randn(num_image_prompts, dim) * 0.02)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim,
                    meta=None if self.coordination != "token" or not self.num_image_prompts
                    else "the top-k prompt choice depends on values")
        B, N, C = x.shape
        H, D = self.num_heads, C // self.num_heads
        q, k, v = self.qkv(x).view(B, N, 3, H, D).unbind(2)  # (B, N, H, D)
        prompts = torch.cat([self.cls_prompts, self.image_prompts], 0)  # (P, C)
        _, pk, pv = self.qkv(prompts).view(-1, 3, H, D).unbind(1)  # (P, H, D)
        mask = tcpa_prompt_mask(x, self.image_prompts, num_cls_prompts=self.num_cls_prompts, top_k=self.top_k,
                                num_cls_tokens=self.num_cls_tokens, coordination=self.coordination)
        return self.proj(prompt_attention(q, k, v, pk, pv, mask).reshape(B, N, C))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, prompts={self.num_cls_prompts}+{self.num_image_prompts}, "
                f"top_k={self.top_k}, coordination={self.coordination!r}")
