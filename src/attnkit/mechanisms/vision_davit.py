"""DaViT's two attentions: channel group attention and spatial window attention, channels-last.

"DaViT: Dual Attention Vision Transformers", arXiv 2204.03645 (ECCV 2022), §3.1-3.2.

Channel group attention treats each channel as a token whose features are the whole image (a ``Cg x Cg``
map per group, linear in pixels); window attention is plain multi-head attention inside non-overlapping
``w x w`` windows (no relative bias, no shift: DaViT's position comes from its conv position encodings).
``from_timm`` copies timm's ``davit.ChannelAttention`` / ``davit.WindowAttention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.local.multi_axis import block_attention
from attnkit.ops.vision.channel import channel_group_attention
from attnkit.ops.vision.common import channels_last_hint
from attnkit.reference.naive_vision import naive_davit_channel_module, naive_davit_window_module
from attnkit.registry import Family, InputKind, Paper, check_input, choice_option, divisible, int_option, register

PAPER = Paper("DaViT: Dual Attention Vision Transformers", "2204.03645", 2022)


def _copy_linear(mine: nn.Linear, theirs: nn.Linear) -> None:
    with torch.no_grad():
        mine.weight.copy_(theirs.weight)
        if mine.bias is not None:
            mine.bias.copy_(theirs.bias)


def _channel_flops(cfg: dict) -> float:
    y, x = cfg["input_size"]
    n, c = cfg.get("batch", 1) * y * x, cfg["dim"]
    return float(2 * n * c * 4 * c + 4 * n * c * (c // cfg["num_heads"]))


@register(
    name="davit_channel", family=Family.VISION, paper=PAPER,
    patterns=("noncausal-self",), complexity="O(N C^2 / G)", flops=_channel_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"], "wiring": c["wiring"]},
    reference=naive_davit_channel_module, functional=channel_group_attention,
    default_config={"dim": 96, "num_heads": 3, "wiring": "paper"}, tiny_config={"dim": 8, "num_heads": 2},
    default_input={"batch": 1, "input_size": (56, 56)}, tiny_input={"batch": 1, "input_size": (3, 4)},
    input_kind=InputKind.IMAGE,
    notes="One Linear(C, 3C) (no bias by default, as DaViT) -> channel_group_attention per group of C/G channels "
          "-> Linear(C, C). wiring='paper': A = softmax(Q^T K / sqrt(Cg)), out = V A^T (Eq. 3). wiring='official': "
          "the released code's and timm's use of the three chunks, A = softmax(K^T V / sqrt(Cg)), out = Q A^T "
          "(the same function family, the chunks in other roles); from_timm sets it. Scale Cg^-0.5 as the paper "
          "(DaViT-v2 / Florence-2 scale by P^-0.5; not offered). A token mixer: no norm, no CPE, no residual.",
)
class DaViTChannelAttention(nn.Module):
    """DaViT channel group attention on ``x (B, Y, X, C)`` -> ``(B, Y, X, C)``.

    Args:
        dim: ``C``; num_heads: ``G`` channel groups (``C % G == 0``).
        qkv_bias: bias on the qkv projection (False in DaViT).
        wiring: ``"paper"`` (``softmax(Q^T K) V``) or ``"official"`` (the released code / timm).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, wiring: str = "paper"):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.wiring = choice_option(self, "wiring", wiring, ("paper", "official"))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last_hint(type(self).__name__, x, self.dim)
        check_input(self, x, "(B, Y, X, C)", channels=self.dim)
        B, Y, X, C = x.shape
        G = self.num_heads
        q, k, v = self.qkv(x).view(B, Y * X, 3, G, C // G).unbind(2)  # each (B, P, G, Cg)
        out = channel_group_attention(q, k, v) if self.wiring == "paper" else channel_group_attention(k, v, q)
        return self.proj(out.reshape(B, Y, X, C))

    @classmethod
    def from_timm(cls, module) -> DaViTChannelAttention:
        """timm's ``davit.ChannelAttention`` (on ``(B, N, C)``): ``m(x) == module(x.flatten(1, 2))`` viewed
        ``(B, Y, X, C)``."""
        if type(module).__name__ != "ChannelAttention" or not hasattr(module, "qkv"):
            raise TypeError(f"{cls.__name__}.from_timm: expected timm.models.davit.ChannelAttention, "
                            f"got {type(module).__name__}")
        dim = module.qkv.in_features
        m = cls(dim, module.num_heads, qkv_bias=module.qkv.bias is not None, wiring="official")
        m = m.to(module.qkv.weight.device, module.qkv.weight.dtype)
        _copy_linear(m.qkv, module.qkv)
        _copy_linear(m.proj, module.proj)
        return m

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.num_heads}, wiring={self.wiring}"


def _window_flops(cfg: dict) -> float:
    y, x = cfg["input_size"]
    w = cfg["window_size"]
    yp, xp = -(-y // w) * w, -(-x // w) * w
    b, c = cfg.get("batch", 1), cfg["dim"]
    return float(b * (2 * yp * xp * c * 3 * c + 2 * y * x * c * c + 4 * yp * xp * w * w * c))


@register(
    name="davit_window", family=Family.VISION, paper=PAPER,
    patterns=("noncausal-self",), complexity="O(N w^2 C + N C^2)", flops=_window_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"], "window_size": c["window_size"]},
    reference=naive_davit_window_module, functional=block_attention,
    default_config={"dim": 96, "num_heads": 3, "window_size": 7},
    tiny_config={"dim": 8, "num_heads": 2, "window_size": 3},
    default_input={"batch": 1, "input_size": (56, 56)}, tiny_input={"batch": 1, "input_size": (4, 4)},
    input_kind=InputKind.IMAGE,
    notes="Linear(C, 3C) with bias -> attention inside each w x w window (block_attention on the windows as a "
          "batch of w x w images, scale D^-0.5, no relative bias, no shift) -> Linear(C, C). Maps not a "
          "multiple of w are "
          "zero-padded at the right and bottom and cropped back, as DaViT's code and timm's SpatialBlock do: the "
          "padded tokens are not masked (their keys and values are the projection biases). A token mixer: no "
          "norm, no CPE, no residual.",
)
class DaViTWindowAttention(nn.Module):
    """DaViT spatial window attention on ``x (B, Y, X, C)`` -> ``(B, Y, X, C)``.

    Args:
        dim: ``C``; num_heads: ``H`` (``C % H == 0``).
        window_size: ``w`` (7 in DaViT); maps are padded to a multiple of ``w``.
        qkv_bias: bias on the qkv projection (True in DaViT).
    """

    def __init__(self, dim: int, num_heads: int = 8, window_size: int = 7, qkv_bias: bool = True):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.window_size = int_option(self, "window_size", window_size, 1)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last_hint(type(self).__name__, x, self.dim)
        check_input(self, x, "(B, Y, X, C)", channels=self.dim)
        B, Y, X, C = x.shape
        w, H = self.window_size, self.num_heads
        py, px = (-Y) % w, (-X) % w
        if py or px:
            x = F.pad(x, (0, 0, 0, px, 0, py))                                  # (B, Y+py, X+px, C)
        ny, nx = (Y + py) // w, (X + px) // w
        # partition the input once (C channels), not q, k and v (3C): the windows become the batch
        win = x.view(B, ny, w, nx, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B * ny * nx, w, w, C)
        q, k, v = self.qkv(win).view(-1, w, w, 3, H, C // H).unbind(3)        # each (B*nW, w, w, H, D)
        out = self.proj(block_attention(q, k, v, w).reshape(-1, w * w, C))    # (B*nW, w*w, C): one window each
        out = out.view(B, ny, nx, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, ny * w, nx * w, C)
        return out[:, :Y, :X]

    @classmethod
    def from_timm(cls, module) -> DaViTWindowAttention:
        """timm's ``davit.WindowAttention`` as ``SpatialBlock`` uses it (pad, window partition, attention,
        reverse, crop), on a channels-last image."""
        if type(module).__name__ != "WindowAttention" or not hasattr(module, "qkv") or not hasattr(module,
                                                                                                   "window_size"):
            raise TypeError(f"{cls.__name__}.from_timm: expected timm.models.davit.WindowAttention, "
                            f"got {type(module).__name__}")
        ws = module.window_size
        if ws[0] != ws[1]:
            raise ValueError(f"{cls.__name__}.from_timm: only square windows, got {tuple(ws)}")
        m = cls(module.dim, module.num_heads, ws[0], qkv_bias=module.qkv.bias is not None)
        m = m.to(module.qkv.weight.device, module.qkv.weight.dtype)
        _copy_linear(m.qkv, module.qkv)
        _copy_linear(m.proj, module.proj)
        return m

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, window_size={self.window_size}"
