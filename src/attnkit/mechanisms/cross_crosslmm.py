"""CrossLMM: Decoupling Long Video Sequences from LMMs via Dual Cross-Attention Mechanisms (arXiv 2505.17020).

Few pooled visual tokens enter the LLM; inside it, gated cross-attention blocks let the pooled tokens
(visual-to-visual, V2V) and the text tokens (text-to-visual, T2V) read the original, unpooled visual
tokens (§3). One block class serves both: V2V is frame-local by default (a pooled token of frame ``t``
sees frame ``t``'s tokens: ``varlen_cross`` over equal frame splits), T2V global. The attention is
``ak.attention``; the paper adds the wiring and the gate, not an operator.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from attnkit.masks.cross import varlen_cross
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_cross import naive_crosslmm_module
from attnkit.registry import Family, Paper, check_input, choice_option, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c = cfg["batch"], cfg["seq_len"], cfg["dim"]
    m = cfg.get("context_len") or n
    t = cfg["num_frames"] if cfg["local"] == "frame" else 1
    return 2 * b * (2 * n + 2 * m) * c * c + 4 * b * n * m * c / t


def _frame_lengths(n: int, frames: int) -> list[int]:
    """Frame ``t`` holds rows ``floor(t n / T)..floor((t + 1) n / T) - 1``."""
    edges = [t * n // frames for t in range(frames + 1)]
    return [b - a for a, b in itertools.pairwise(edges)]


@register(
    name="crosslmm", family=Family.CROSS,
    paper=Paper("CrossLMM: Decoupling Long Video Sequences from LMMs via Dual Cross-Attention Mechanisms",
                "2505.17020", 2025),
    patterns=("noncausal-cross",), complexity="O(N M d / T) frame-local, O(N M d) global", flops=_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"], "num_frames": c["num_frames"],
                       "local": c["local"]},
    reference=naive_crosslmm_module, functional=attention,
    default_config={"dim": 64, "num_heads": 4, "num_frames": 4, "local": "frame"},
    tiny_config={"dim": 8, "num_heads": 2, "num_frames": 2},
    default_input={"batch": 2, "seq_len": 16}, tiny_input={"batch": 1, "seq_len": 6},
    notes="Not confirmed from the paper body: the gate (a per-block scalar tanh(alpha), alpha initialised to 0, "
          "Flamingo-style, so a new block is the identity), frame-local V2V (local='frame': queries and context "
          "each split into num_frames equal, frame-major parts) versus global (local='global', T2V), and "
          "pre-norm on the queries only. Keys and values are the original visual tokens through k/v "
          "projections (the paper's visual projector folded into them). Without a context x is its own context.",
)
class CrossLMMBlock(nn.Module):
    """CrossLMM's gated cross-attention block: ``x + tanh(alpha) * W_o Attn(W_q LN(x), W_k V, W_v V)``.

    Args:
        dim: ``C``; num_heads: ``H``; num_frames: ``T`` (frame-local attention);
        local: ``"frame"`` (V2V, each frame's queries see that frame's tokens) or ``"global"`` (T2V).

    Shapes:
        ``x (B, N, C)`` pooled visual or text tokens, ``context (B, M, C)`` original visual tokens -> ``(B, N, C)``.

    Example:
        >>> v2v = CrossLMMBlock(896, 14, num_frames=16)
        >>> pooled = v2v(pooled, visual)          # identity at initialisation (gate 0)
    """

    def __init__(self, dim: int, num_heads: int, *, num_frames: int = 1, local: str = "frame"):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.num_frames = int_option(self, "num_frames", num_frames, 1)
        self.local = choice_option(self, "local", local, ("frame", "global"))
        self.norm = nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        local = self.local == "frame" and self.num_frames > 1
        check_input(self, x, "(B, N, C)", channels=self.dim,
                    meta="the frame-local mask's tile walk reads tensor values" if local else None)
        ctx = x if context is None else check_input(self, context, "(B, M, C)", channels=self.dim, name="context")
        b, n, c = x.shape
        m, h = ctx.shape[1], self.num_heads
        q = self.q_proj(self.norm(x)).reshape(b, n, h, -1)                        # (B, N, H, D)
        k = self.k_proj(ctx).reshape(b, m, h, -1)                                 # (B, M, H, D)
        v = self.v_proj(ctx).reshape(b, m, h, -1)
        mask = None
        if local:
            mask = varlen_cross(_frame_lengths(n, self.num_frames), _frame_lengths(m, self.num_frames))
        return x + torch.tanh(self.gate) * self.out_proj(attention(q, k, v, mask=mask).reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, num_frames={self.num_frames}, local={self.local}"
