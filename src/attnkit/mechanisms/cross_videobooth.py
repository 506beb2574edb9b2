"""VideoBooth: Diffusion-based Video Generation with Image Prompts (arXiv 2312.00777).

Fine image-prompt injection (§3.3): the image prompt's latent features are appended as extra keys and
values of the cross-frame attention, seen by the first frame only; every later frame attends to the
first frame and itself, so the prompt reaches it through frame 0. The pattern is the mask
:func:`attnkit.masks.cross.first_frame`; the attention is ``ak.attention``.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.masks.cross import first_frame
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_cross import naive_videobooth_module
from attnkit.registry import Family, Paper, check_input, divisible, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, p = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["tokens_per_frame"]
    m = cfg.get("context_len") or 0
    return 2 * b * (4 * n + 2 * m) * c * c + 4 * b * (p * (m + p) + (n - p) * 2 * p) * c


@register(
    name="videobooth", family=Family.CROSS,
    paper=Paper("VideoBooth: Diffusion-based Video Generation with Image Prompts", "2312.00777", 2024),
    patterns=("noncausal-self", "noncausal-cross"), complexity="O(N P d + P Ni d)", flops=_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"], "tokens_per_frame": c["tokens_per_frame"]},
    reference=naive_videobooth_module, functional=attention,
    default_config={"dim": 64, "num_heads": 4, "tokens_per_frame": 16},
    tiny_config={"dim": 8, "num_heads": 2, "tokens_per_frame": 2},
    default_input={"batch": 2, "seq_len": 64}, tiny_input={"batch": 1, "seq_len": 6},
    notes="x holds the frames' tokens frame-major (tokens_per_frame each, the last frame may be shorter) and the "
          "context the image prompt's tokens at this scale; new image key/value projections initialised from the "
          "frame ones (IP-Adapter practice). Frame t > 0 attends to [frame 0; frame t], the base cross-frame "
          "pattern assumed for frames other than the first. The coarse stage (the CLIP embedding replacing the "
          "subject word) is ordinary text cross-attention. Without a context: the base cross-frame attention.",
)
class VideoBoothAttention(nn.Module):
    """VideoBooth's cross-frame attention with image-prompt keys and values on the first frame.

    Args:
        dim: ``C``; num_heads: ``H``; tokens_per_frame: ``P``.

    Shapes:
        ``x (B, F * P, C)`` frames, optional ``context (B, Ni, C)`` image-prompt tokens -> ``(B, F * P, C)``.

    Example:
        >>> y = VideoBoothAttention(320, 8, tokens_per_frame=32 * 32)(frames.flatten(1, 2), prompt_tokens)
    """

    def __init__(self, dim: int, num_heads: int, *, tokens_per_frame: int = 1):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.tokens_per_frame = int_option(self, "tokens_per_frame", tokens_per_frame, 1)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_k_img, self.to_v_img = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        with torch.no_grad():
            self.to_k_img.weight.copy_(self.to_k.weight)
            self.to_v_img.weight.copy_(self.to_v.weight)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim, meta="its masked tile walk reads tensor values")
        b, n, c = x.shape
        h = self.num_heads
        q = self.to_q(x).reshape(b, n, h, -1)                                       # (B, N, H, D)
        k, v = self.to_k(x), self.to_v(x)                                           # (B, N, C)
        ni = 0
        if context is not None:
            check_input(self, context, "(B, M, C)", channels=self.dim, name="context")
            ni = context.shape[1]
            k = torch.cat([self.to_k_img(context), k], 1)                           # (B, Ni + N, C)
            v = torch.cat([self.to_v_img(context), v], 1)
        k, v = k.reshape(b, ni + n, h, -1), v.reshape(b, ni + n, h, -1)             # (B, Ni + N, H, D)
        out = attention(q, k, v, mask=first_frame(ni, self.tokens_per_frame))
        return self.to_out(out.reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, tokens_per_frame={self.tokens_per_frame}"
