"""GC ViT global window attention: global query tokens generated from the whole map attend inside each window.

"Global Context Vision Transformers", arXiv 2206.09959 (ICML 2023), §3.2-3.3.

A generator of ``feat_levels`` Fused-MBConv blocks (depthwise 3x3, GELU, squeeze-excitation, pointwise,
residual), each followed by a stride-2 max pool while the map is larger than the window, turns the
stage input into an ``M x M`` map of global queries; one ``Linear(C, 2C)`` gives the keys and values of
every window, and each window attends with the image's global queries (plus a Swin-style relative bias).
``from_timm`` copies timm's ``gcvit.WindowAttentionGlobal`` (and optionally its ``FeatureBlock``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.local.multi_axis import relative_bias
from attnkit.ops.vision.common import channels_last_hint
from attnkit.ops.vision.global_query import global_query_window_attention
from attnkit.reference.naive_vision import naive_gcvit_global_module
from attnkit.registry import Family, InputKind, Paper, check_input, divisible, int_option, register


class _MBConv(nn.Module):
    """GC ViT's Fused-MBConv of the query generator, channels-last: ``x + PW(SE(GELU(DW3x3(x))))``, no biases."""

    def __init__(self, dim: int, se_dim: int):
        super().__init__()
        self.dw = nn.Parameter(torch.empty(dim, 1, 3, 3))
        nn.init.kaiming_uniform_(self.dw, a=5 ** 0.5)
        self.se_fc1 = nn.Linear(dim, se_dim, bias=False)
        self.se_fc2 = nn.Linear(se_dim, dim, bias=False)
        self.pw = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(F.conv2d(x.permute(0, 3, 1, 2), self.dw, padding=1, groups=x.shape[-1]).permute(0, 2, 3, 1))
        s = torch.sigmoid(self.se_fc2(F.gelu(self.se_fc1(y.mean(dim=(1, 2), keepdim=True)))))  # (B, 1, 1, C)
        return x + self.pw(y * s)


def _flops(cfg: dict) -> float:
    y, x = cfg["input_size"]
    b, c, m = cfg.get("batch", 1), cfg["dim"], cfg["window_size"]
    n = b * y * x
    gen = sum(2 * b * (y >> i) * (x >> i) * c * (9 + c) for i in range(max(1, cfg["feat_levels"])))
    return float(2 * n * c * 2 * c + 2 * n * c * c + 4 * n * m * m * c + gen)


def _options(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("dim", "num_heads", "window_size", "feat_levels")}


@register(
    name="gcvit_global", family=Family.VISION,
    paper=Paper("Global Context Vision Transformers", "2206.09959", 2022),
    patterns=("noncausal-self",), complexity="O(N M^2 C + N C^2)", flops=_flops, options=_options,
    reference=naive_gcvit_global_module, functional=global_query_window_attention,
    default_config={"dim": 96, "num_heads": 3, "window_size": 7, "feat_levels": 3},
    tiny_config={"dim": 8, "num_heads": 2, "window_size": 2, "feat_levels": 1},
    default_input={"batch": 1, "input_size": (56, 56)}, tiny_input={"batch": 1, "input_size": (4, 4)},
    input_kind=InputKind.IMAGE,
    notes="Global queries from the generator (or passed as q_global, shared by a stage's global blocks as the "
          "paper does), not projected further; keys and values from Linear(C, 2C); relative bias table "
          "((2M-1)^2, H) indexed as Swin / timm's RelPosBias; scale D^-0.5; proj Linear(C, C). Each image's "
          "queries serve only its own windows (repeat per image, as timm 1.0; an early port tiled across the "
          "batch). Generator: feat_levels MBConv blocks (timm: max(1, log2(map/M)) with SE ratio rounded to a "
          "multiple of 8; here se_dim defaults to int(C/4) as the paper's code, from_timm copies timm's), each "
          "followed by MaxPool(3, 2, 1) while the map is larger than M; further pools are added if it is still "
          "larger (so a map of M * 2^j works at any resolution), ValueError if the map is not M * 2^j square. "
          "Y, X must be multiples of M (no padding rule in the paper). A token mixer: no norm, no residual.",
)
class GCViTGlobalAttention(nn.Module):
    """GC ViT global window attention on ``x (B, Y, X, C)`` -> ``(B, Y, X, C)``.

    Args:
        dim: ``C``; num_heads: ``H``.
        window_size: ``M``; the map must be a multiple of ``M`` (and ``M * 2^j`` square to generate queries).
        feat_levels: MBConv blocks of the query generator (GC ViT: ``log2(map / M)``, at least 1 block).
        qkv_bias: bias on the key/value projection.
        se_dim: squeeze width of the generator's SE (default ``int(C / 4)``).

    ``forward(x, q_global=None)``: ``q_global (B, M, M, C)`` replaces the generator's output (a stage computes
    it once and shares it between its global blocks).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, feat_levels: int = 0, qkv_bias: bool = True,
                 se_dim: int | None = None):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.window_size = int_option(self, "window_size", window_size, 1)
        self.feat_levels = int_option(self, "feat_levels", feat_levels, 0)
        se_dim = max(1, dim // 4) if se_dim is None else int_option(self, "se_dim", se_dim, 1)
        self.generator = nn.ModuleList(_MBConv(dim, se_dim) for _ in range(max(1, feat_levels)))
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window_size - 1) ** 2, num_heads) * 0.02)

    def global_queries(self, x: torch.Tensor) -> torch.Tensor:
        """The generator: ``x (B, Y, X, C)`` -> ``(B, M, M, C)``; ``Y = X = M * 2^j``."""
        Y, X = x.shape[1:3]
        M = self.window_size
        j = (Y // M).bit_length() - 1
        if Y != X or Y % M or Y // M != 1 << j:
            raise ValueError(f"{type(self).__name__}: generating global queries needs a square map of window_size * "
                             f"2^j, got (Y, X) = {(Y, X)} with window_size {M}; pass q_global (B, {M}, {M}, C)")
        for block in self.generator:
            x = block(x)
            if x.shape[1] > M:
                x = F.max_pool2d(x.permute(0, 3, 1, 2), 3, 2, 1).permute(0, 2, 3, 1)
        while x.shape[1] > M:
            x = F.max_pool2d(x.permute(0, 3, 1, 2), 3, 2, 1).permute(0, 2, 3, 1)
        return x

    def forward(self, x: torch.Tensor, q_global: torch.Tensor | None = None) -> torch.Tensor:
        channels_last_hint(type(self).__name__, x, self.dim)
        check_input(self, x, "(B, Y, X, C)", channels=self.dim)
        B, Y, X, C = x.shape
        M, H = self.window_size, self.num_heads
        if Y % M or X % M:
            raise ValueError(f"{type(self).__name__}: the map (Y, X) = {(Y, X)} must be a multiple of window_size "
                             f"({M}) on both sides; pad or crop the input")
        if q_global is None:
            q_global = self.global_queries(x)
        elif tuple(q_global.shape) != (B, M, M, C):
            raise ValueError(f"{type(self).__name__}: q_global must be (B, M, M, C) = {(B, M, M, C)}, got "
                             f"{tuple(q_global.shape)}")
        k, v = self.kv(x).view(B, Y, X, 2, H, C // H).unbind(3)                  # each (B, Y, X, H, D)
        qg = q_global.reshape(B, M, M, H, C // H)                                 # (B, M, M, H, D)
        out = global_query_window_attention(qg, k, v, M, bias=relative_bias(self.relative_position_bias_table, M))
        return self.proj(out.reshape(B, Y, X, C))

    @classmethod
    def from_timm(cls, module, feature_block=None) -> GCViTGlobalAttention:
        """timm's ``gcvit.WindowAttentionGlobal`` (``use_global=True``) and optionally the stage's
        ``FeatureBlock`` (the query generator; without it pass ``q_global``)."""
        who = f"{cls.__name__}.from_timm"
        if type(module).__name__ != "WindowAttentionGlobal" or not getattr(module, "use_global", False):
            raise TypeError(f"{who}: expected timm.models.gcvit.WindowAttentionGlobal with use_global=True, "
                            f"got {type(module).__name__}")
        ws = module.window_size
        if ws[0] != ws[1]:
            raise ValueError(f"{who}: only square windows, got {tuple(ws)}")
        dim = module.qkv.in_features
        blocks = [] if feature_block is None else [b for b in feature_block.blocks if hasattr(b, "conv_dw")]
        se_dim = blocks[0].se.fc1.out_channels if blocks else None
        m = cls(dim, module.num_heads, ws[0], feat_levels=len(blocks), qkv_bias=module.qkv.bias is not None,
                se_dim=se_dim)
        m = m.to(module.qkv.weight.device, module.qkv.weight.dtype)
        with torch.no_grad():
            for mine, theirs in ((m.kv, module.qkv), (m.proj, module.proj)):
                mine.weight.copy_(theirs.weight)
                if mine.bias is not None:
                    mine.bias.copy_(theirs.bias)
            m.relative_position_bias_table.copy_(module.rel_pos.relative_position_bias_table)
            for mine, theirs in zip(m.generator, blocks):
                if theirs.conv_dw.bias is not None or theirs.se.fc1.bias is not None:
                    raise ValueError(f"{who}: the generator's convolutions must have no bias (GC ViT)")
                mine.dw.copy_(theirs.conv_dw.weight)
                mine.se_fc1.weight.copy_(theirs.se.fc1.weight[:, :, 0, 0])
                mine.se_fc2.weight.copy_(theirs.se.fc2.weight[:, :, 0, 0])
                mine.pw.weight.copy_(theirs.conv_pw.weight[:, :, 0, 0])
        return m

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, window_size={self.window_size}, feat_levels={self.feat_levels}"
