"""HAT's two attention pieces as channels-last modules: the channel attention block (CAB) and the
overlapping cross-attention (OCA) of the OCAB.

"Activating More Pixels in Image Super-Resolution Transformer" (HAT), arXiv 2205.04437 (CVPR 2023), §3.2-3.3.

* ``hat_channel``: ``Conv3x3(C -> C/beta) -> GELU -> Conv3x3(C/beta -> C)`` then the squeeze-and-excitation gate
  ``y * sigmoid(W2 relu(W1 mean(y) + b1) + b2)`` with ``W1: C -> C/gamma`` (beta = 3, gamma = 30 in HAT).
* ``hat_ocab``: ``Linear(C, 3C)`` -> each ``M x M`` query window attends the ``Mo x Mo`` key window centred on
  it (``Mo = M + floor(ratio * M)``) with a relative bias table of ``(M + Mo - 1)^2`` entries per head ->
  ``Linear(C, C)``. Token mixers only: the LayerNorm, residual and MLP belong to the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.vision.common import channels_last_hint
from attnkit.ops.vision.gate import channel_gate
from attnkit.ops.vision.overlap import overlapping_window_attention
from attnkit.reference.naive_vision2 import naive_hat_channel_module, naive_hat_ocab_module
from attnkit.registry import Family, InputKind, Paper, check_input, divisible, float_option, int_option, register

PAPER = Paper("Activating More Pixels in Image Super-Resolution Transformer", "2205.04437", 2022)


def _channel_flops(cfg: dict) -> float:
    y, x = cfg["input_size"]
    n, c = cfg.get("batch", 1) * y * x, cfg["dim"]
    mid = c // cfg["compress_ratio"]
    return float(2 * n * 9 * c * mid * 2 + 2 * n * c)


@register(
    name="hat_channel", family=Family.VISION, paper=PAPER,
    patterns=("noncausal-self",), complexity="O(N C^2 / beta)", flops=_channel_flops,
    options=lambda c: {"dim": c["dim"], "compress_ratio": c["compress_ratio"], "squeeze_factor": c["squeeze_factor"]},
    reference=naive_hat_channel_module, functional=channel_gate,
    default_config={"dim": 96, "compress_ratio": 3, "squeeze_factor": 30},
    tiny_config={"dim": 8, "compress_ratio": 2, "squeeze_factor": 4},
    default_input={"batch": 1, "input_size": (56, 56)}, tiny_input={"batch": 1, "input_size": (3, 4)},
    input_kind=InputKind.IMAGE,
    notes="HAT's CAB on channels-last (B, Y, X, C): two 3x3 convs with bias (C -> C//compress_ratio -> C, GELU "
          "between, zero padding), then channel_gate (mean over pixels, C -> C//squeeze_factor -> C with bias, "
          "ReLU, sigmoid). The gate's 1x1 convs are stored as nn.Linear (same numbers, weights of shape (out, in) "
          "instead of (out, in, 1, 1)). HAT adds this branch to the window-attention branch with weight 0.01; "
          "that scale, the LayerNorm and the residual belong to the block and are not applied here.",
)
class HATChannelAttention(nn.Module):
    """HAT's channel attention block on ``x (B, Y, X, C)`` -> ``(B, Y, X, C)``.

    Args:
        dim: ``C``.
        compress_ratio: ``beta``: the convs run at ``C // beta`` channels (3 in HAT).
        squeeze_factor: ``gamma``: the gate squeezes to ``C // gamma`` channels (30 in HAT).
    """

    def __init__(self, dim: int, compress_ratio: int = 3, squeeze_factor: int = 30):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.compress_ratio = int_option(self, "compress_ratio", compress_ratio, 1)
        self.squeeze_factor = int_option(self, "squeeze_factor", squeeze_factor, 1)
        mid, sq = dim // compress_ratio, dim // squeeze_factor
        if mid < 1 or sq < 1:
            raise ValueError(f"{type(self).__name__}: dim={dim} must be >= compress_ratio ({compress_ratio}) and "
                             f">= squeeze_factor ({squeeze_factor}) so both reduced widths are >= 1")
        self.conv1 = nn.Conv2d(dim, mid, 3, padding=1)
        self.conv2 = nn.Conv2d(mid, dim, 3, padding=1)
        self.squeeze = nn.Linear(dim, sq)
        self.excite = nn.Linear(sq, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last_hint(type(self).__name__, x, self.dim)
        check_input(self, x, "(B, Y, X, C)", channels=self.dim)
        # the channels-first view of channels-last storage: conv2d keeps the channels-last memory format
        y = self.conv2(F.gelu(self.conv1(x.permute(0, 3, 1, 2))))  # (B, C, Y, X)
        y = y.permute(0, 2, 3, 1)                                   # (B, Y, X, C)
        return channel_gate(y, self.squeeze.weight, self.squeeze.bias, self.excite.weight, self.excite.bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, compress_ratio={self.compress_ratio}, squeeze_factor={self.squeeze_factor}"


def overlap_size(window_size: int, overlap_ratio: float) -> int:
    """HAT's enlarged key window ``Mo = M + int(ratio * M)``."""
    return window_size + int(overlap_ratio * window_size)


def oca_relative_index(M: int, Mo: int) -> torch.Tensor:
    """``(M*M, Mo*Mo)`` indices into HAT's ``(M + Mo - 1)^2`` OCA bias table, as the released code builds them.

    Per axis ``r = key_coord - query_coord + (M - Mo + 1)`` with window-local coordinates (the key patch's
    own origin), ``idx = r_y (M + Mo - 1) + r_x``; negative values wrap around the table (taken mod its size),
    a bijection onto the table that reproduces the released layout.
    """
    S = M + Mo - 1
    qy, qx = torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")
    ky, kx = torch.meshgrid(torch.arange(Mo), torch.arange(Mo), indexing="ij")
    ry = ky.reshape(1, -1) - qy.reshape(-1, 1) + (M - Mo + 1)  # (M*M, Mo*Mo)
    rx = kx.reshape(1, -1) - qx.reshape(-1, 1) + (M - Mo + 1)
    return (ry * S + rx) % (S * S)


def _ocab_flops(cfg: dict) -> float:
    y, x = cfg["input_size"]
    M = cfg["window_size"]
    Mo = overlap_size(M, cfg["overlap_ratio"])
    if y % M or x % M:
        raise ValueError(f"hat_ocab: input {(y, x)} is not a multiple of window_size {M}")
    n, c = cfg.get("batch", 1) * y * x, cfg["dim"]
    return float(2 * n * c * 4 * c + 4 * n * Mo * Mo * c)


@register(
    name="hat_ocab", family=Family.VISION, paper=PAPER,
    patterns=("noncausal-self",), complexity="O(N Mo^2 C + N C^2)", flops=_ocab_flops,
    options=lambda c: {"dim": c["dim"], "num_heads": c["num_heads"], "window_size": c["window_size"],
                       "overlap_ratio": c["overlap_ratio"], "mask_padded_keys": c["mask_padded_keys"]},
    reference=naive_hat_ocab_module, functional=overlapping_window_attention,
    default_config={"dim": 96, "num_heads": 3, "window_size": 8, "overlap_ratio": 0.5, "mask_padded_keys": False},
    tiny_config={"dim": 8, "num_heads": 2, "window_size": 2, "overlap_ratio": 1.0},
    default_input={"batch": 1, "input_size": (56, 56)}, tiny_input={"batch": 1, "input_size": (4, 6)},
    input_kind=InputKind.IMAGE,
    notes="HAT's OCA on channels-last (B, Y, X, C): Linear(C, 3C) with bias -> overlapping_window_attention "
          "(query windows M x M, key windows Mo = M + int(overlap_ratio * M) centred on them, zero-padded at the "
          "border, scale D^-0.5, relative bias table ((M + Mo - 1)^2, H) indexed exactly as the released code, "
          "negative indices wrapping) -> Linear(C, C). Mo - M must be even (a centred key window; HAT: M = 16, "
          "ratio 0.5, Mo = 24). Y and X must be multiples of M: HAT pads the whole image at the network input, "
          "not inside the layer, so this layer raises instead of padding. mask_padded_keys=False (default) "
          "attends the zero keys outside the image as the released code does; True skips them. default_config "
          "uses M = 8 (56 = 7 x 8) instead of HAT's 16 so the benchmark sizes divide. A token mixer: no "
          "LayerNorm, residual or MLP.",
)
class HATOverlappingCrossAttention(nn.Module):
    """HAT's overlapping cross-attention on ``x (B, Y, X, C)`` -> ``(B, Y, X, C)``; ``Y, X`` multiples of ``M``.

    Args:
        dim: ``C``; num_heads: ``H`` (``C % H == 0``).
        window_size: ``M`` (16 in HAT); overlap_ratio: key windows ``Mo = M + int(ratio * M)`` (0.5 in HAT).
        mask_padded_keys: skip the zero keys outside the image (False: the released code attends them).
        qkv_bias: bias on the qkv projection (True in HAT).
    """

    def __init__(self, dim: int, num_heads: int = 6, window_size: int = 16, overlap_ratio: float = 0.5,
                 mask_padded_keys: bool = False, qkv_bias: bool = True):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.window_size = int_option(self, "window_size", window_size, 1)
        self.overlap_ratio = float_option(self, "overlap_ratio", overlap_ratio, minimum=0.0)
        self.overlap_size = overlap_size(self.window_size, self.overlap_ratio)
        if (self.overlap_size - self.window_size) % 2:
            raise ValueError(f"{type(self).__name__}: overlap_ratio={overlap_ratio} gives key windows of "
                             f"{self.overlap_size} for window_size {window_size}; the difference must be even")
        if not isinstance(mask_padded_keys, bool):
            raise TypeError(f"{type(self).__name__}: mask_padded_keys must be a bool, got {mask_padded_keys!r}")
        self.mask_padded_keys = mask_padded_keys
        M, Mo = self.window_size, self.overlap_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.empty((M + Mo - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", oca_relative_index(M, Mo), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last_hint(type(self).__name__, x, self.dim)
        check_input(self, x, "(B, Y, X, C)", channels=self.dim)
        B, Y, X, C = x.shape
        M, H = self.window_size, self.num_heads
        if Y % M or X % M:
            raise ValueError(f"{type(self).__name__}: x's map (Y, X) = {(Y, X)} must be a multiple of window_size "
                             f"{M} on both sides (HAT pads the image before the network)")
        q, k, v = self.qkv(x).view(B, Y, X, 3, H, C // H).unbind(3)            # each (B, Y, X, H, D)
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # (H, M*M, Mo*Mo)
        out = overlapping_window_attention(q, k, v, M, self.overlap_size, bias=bias,
                                           mask_padded_keys=self.mask_padded_keys)
        return self.proj(out.reshape(B, Y, X, C))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, window_size={self.window_size}, "
                f"overlap_size={self.overlap_size}, mask_padded_keys={self.mask_padded_keys}")
