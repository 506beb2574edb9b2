"""Video-CCAM: Enhancing Video-Language Understanding with Causal Cross-Attention Masks for Short and Long
Videos (arXiv 2408.14023).

The projector between a frame-wise image encoder and the LLM is a cross-attention of ``Q`` queries over
the visual tokens of ``T`` frames under a causal cross-attention mask (§3): query ``i`` sees frames
``0..ceil((i + 1) T / Q) - 1``, so query outputs follow temporal order and one projector serves any
``T``. The paper adds a mask, :func:`attnkit.masks.cross.frame_causal`; the attention is ``ak.attention``.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.masks.cross import frame_causal
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_cross import naive_video_ccam_module
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register

_META = "the masked attention's tile walk reads tensor values"


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    m = cfg.get("context_len") or n
    t = -(-m // cfg["tokens_per_frame"])
    area = n * m * (t + 1) / (2 * t)                                  # the mask's density when T divides Q
    return 2 * b * (2 * n + 2 * m) * c * c + 4 * b * area * c


def _options(cfg: dict) -> dict:
    return {"dim": cfg["dim"], "num_heads": cfg["num_heads"], "tokens_per_frame": cfg["tokens_per_frame"]}


@register(
    name="video_ccam", family=Family.CROSS,
    paper=Paper("Video-CCAM: Enhancing Video-Language Understanding with Causal Cross-Attention Masks for Short and "
                "Long Videos", "2408.14023", 2024),
    patterns=("noncausal-cross",), complexity="O(Q T P d (T + 1) / (2 T))", flops=_flops, options=_options,
    reference=naive_video_ccam_module, functional=attention,
    default_config={"dim": 64, "num_heads": 4, "tokens_per_frame": 16},
    tiny_config={"dim": 8, "num_heads": 2, "tokens_per_frame": 2},
    default_input={"batch": 2, "seq_len": 32}, tiny_input={"batch": 1, "seq_len": 6},
    notes="No new op: ak.attention under frame_causal(Q, T, P), T = ceil(M / P) from the context length (the last "
          "frame may be shorter). The query rounding for Q not a multiple of T is not stated in the paper: "
          "f(i) = ceil((i + 1) T / Q) - 1, which never leaves a row empty and lets the last query see the whole "
          "video. x is the query stream (the projector's learnable queries, expanded over the batch); the "
          "projector's FFN and norms are outside this layer. Without a context x is its own visual context.",
)
class VideoCCAMAttention(nn.Module):
    """Cross-attention of queries over frame-major visual tokens under Video-CCAM's causal frame mask.

    Args:
        dim: ``C``; num_heads: ``H``; tokens_per_frame: ``P`` visual tokens per frame.

    Shapes:
        ``x (B, Q, C)`` queries, ``context (B, M, C)`` visual tokens frame-major (``T = ceil(M / P)``
        frames) -> ``(B, Q, C)``.

    Example:
        >>> m = VideoCCAMAttention(1024, 16, tokens_per_frame=729)
        >>> y = m(queries.expand(b, -1, -1), frames.flatten(1, 2))
    """

    def __init__(self, dim: int, num_heads: int, *, tokens_per_frame: int = 1, bias: bool = True):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.tokens_per_frame = int_option(self, "tokens_per_frame", tokens_per_frame, 1)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim, bias=bias) for _ in range(4))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim, meta=_META)
        ctx = x if context is None else check_input(self, context, "(B, M, C)", channels=self.dim, name="context")
        b, n, _ = x.shape
        m, h = ctx.shape[1], self.num_heads
        q = self.q_proj(x).reshape(b, n, h, -1)                                  # (B, Q, H, D)
        k = self.k_proj(ctx).reshape(b, m, h, -1)                                # (B, M, H, D)
        v = self.v_proj(ctx).reshape(b, m, h, -1)
        mask = frame_causal(n, -(-m // self.tokens_per_frame), self.tokens_per_frame)
        return self.out_proj(attention(q, k, v, mask=mask).reshape(b, n, -1))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, tokens_per_frame={self.tokens_per_frame}"
