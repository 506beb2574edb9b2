"""CrossFormer long-short distance attention with the dynamic position bias, as a channels-last token mixer.

"CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention", arXiv 2108.00154 (ICLR 2022),
§3.2. The attention op is :func:`attnkit.ops.vision.lsda.long_short_distance_attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.vision.common import channels_last_hint
from attnkit.ops.vision.lsda import long_short_distance_attention, lsda_group_shape
from attnkit.reference.naive_vision_b import naive_crossformer_module
from attnkit.registry import Family, InputKind, Paper, check_input, choice_option, divisible, int_option, register


def dpb_offsets(gh: int, gw: int, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``((2gh-1)(2gw-1), 2)`` offsets ``(dy, dx)`` the DPB is evaluated at, and the ``(n, n)`` index of the
    offset ``slot_query - slot_key`` of every pair (``n = gh gw``), so that ``bias = mlp(offsets)[index]``."""
    dy, dx = torch.meshgrid(torch.arange(1 - gh, gh, device=device), torch.arange(1 - gw, gw, device=device),
                            indexing="ij")
    offsets = torch.stack([dy.reshape(-1), dx.reshape(-1)], -1).to(dtype)              # ((2gh-1)(2gw-1), 2)
    ty, tx = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    ty, tx = ty.reshape(-1), tx.reshape(-1)
    index = (ty[:, None] - ty[None, :] + gh - 1) * (2 * gw - 1) + (tx[:, None] - tx[None, :] + gw - 1)  # (n, n)
    return offsets, index


class DynamicPositionBias(nn.Module):
    """CrossFormer's DPB: ``Linear(2, m)`` then three ``[LayerNorm, ReLU, Linear]`` blocks (the last to ``H``),
    evaluated once per distinct offset and gathered per pair: ``(H, n, n)``. Parameter names follow the
    authors' ``DynamicPosBias`` (``pos_proj``, ``pos1``, ``pos2``, ``pos3``)."""

    def __init__(self, pos_dim: int, num_heads: int, residual: bool = False):
        super().__init__()
        self.residual = bool(residual)
        self.pos_proj = nn.Linear(2, pos_dim)
        self.pos1 = nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, pos_dim))
        self.pos2 = nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, pos_dim))
        self.pos3 = nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, num_heads))

    def forward(self, gh: int, gw: int) -> torch.Tensor:
        w = self.pos_proj.weight
        offsets, index = dpb_offsets(gh, gw, w.device, w.dtype)
        pos = self.pos_proj(offsets)
        if self.residual:
            pos = pos + self.pos1(pos)
            pos = self.pos3(pos + self.pos2(pos))
        else:
            pos = self.pos3(self.pos2(self.pos1(pos)))                                 # ((2gh-1)(2gw-1), H)
        return pos[index].permute(2, 0, 1)                                             # (H, n, n)


def _flops(cfg: dict) -> float:
    Y, X = cfg["input_size"]
    b, c = cfg.get("batch", 1), cfg["dim"]
    m = CrossFormerLSDA(c, cfg["num_heads"], cfg["group_size"], mode=cfg["mode"], interval=cfg.get("interval"),
                        pad=cfg.get("pad", False), position_bias=False)
    _, _, (gh, gw) = m.plan(Y, X)                                                         # raises for bad sizes
    n = b * Y * X
    return float(2 * n * c * 4 * c + 4 * n * gh * gw * c)


def _options(c: dict) -> dict:
    return {k: c[k] for k in ("dim", "num_heads", "group_size", "mode", "interval", "pad") if k in c}


@register(
    name="crossformer_lsda", family=Family.VISION,
    paper=Paper("CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention", "2108.00154", 2021),
    patterns=("noncausal-self",), complexity="O(N G^2 C + N C^2)", flops=_flops, options=_options,
    reference=naive_crossformer_module, functional=long_short_distance_attention,
    default_config={"dim": 96, "num_heads": 3, "group_size": 7, "mode": "short"},
    tiny_config={"dim": 16, "num_heads": 2, "group_size": 2, "mode": "long"},
    default_input={"batch": 1, "input_size": (56, 56)}, tiny_input={"batch": 1, "input_size": (4, 6)},
    input_kind=InputKind.IMAGE,
    notes="A pure token mixer (no norm, residual, MLP or cross-scale embedding): Linear(C, 3C) -> SDA (mode="
          "'short': G x G adjacent tokens, MaxViT's block partition) or LDA (mode='long': tokens spaced I apart; "
          "interval=None takes I = Y/G, X/G so groups are G x G, the classification code's reshape = MaxViT's grid "
          "partition; an int interval gives ceil(Y/I) x ceil(X/I) groups, the authors' detection backbone) -> "
          "Linear(C, C). Scale D^-0.5, qkv bias. Dynamic position bias: the authors' DynamicPosBias(residual=False) "
          "with width m = dim // 16 (their code passes dim/4 into a module that quarters it again; option dpb_dim), "
          "evaluated on the (2gh-1)(2gw-1) offsets (query slot - key slot, slot units for SDA and LDA) and gathered; "
          "position_bias=False drops it. As the released code: if min(Y, X) <= G the module runs SDA with G = min(Y, "
          "X) (one group per side). Sizes: the classification code reshapes without padding, so by default a map "
          "that is not a multiple of G (SDA, LDA with interval=None) or I raises ValueError naming the option; "
          "pad=True follows the dense-prediction backbones: zero-pad bottom/right, padded keys masked with the "
          "authors' additive -1e6 (finite, so an all-padding group cannot make the bias gradient NaN), crop.",
)
class CrossFormerLSDA(nn.Module):
    """CrossFormer SDA / LDA attention on ``x (B, Y, X, C)`` -> ``(B, Y, X, C)``.

    Args:
        dim: ``C``; num_heads: ``H``.
        group_size: ``G``, the group side (SDA, and LDA when ``interval`` is None). CrossFormer: 7.
        mode: ``"short"`` (SDA) or ``"long"`` (LDA); CrossFormer alternates them block by block.
        interval: LDA's interval ``I`` (None: ``Y/G``, ``X/G``, groups of ``G x G``).
        pad: pad the map to a multiple of the group / interval and crop (else such maps raise).
        position_bias: use the dynamic position bias; dpb_dim: its width (default ``max(1, dim // 16)``).
        dpb_residual: the DPB's residual variant (CrossFormer uses the plain one).
        qkv_bias: bias on the qkv projection.

    Example:
        >>> m = CrossFormerLSDA(96, 3, group_size=7, mode="long")
        >>> y = m(torch.randn(2, 56, 56, 96))   # (2, 56, 56, 96): LDA, interval 8
    """

    def __init__(self, dim: int, num_heads: int, group_size: int = 7, *, mode: str = "short",
                 interval: int | None = None, pad: bool = False, position_bias: bool = True,
                 dpb_dim: int | None = None, dpb_residual: bool = False, qkv_bias: bool = True):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.group_size = int_option(self, "group_size", group_size, 1)
        self.mode = choice_option(self, "mode", mode, ("short", "long"))
        self.interval = None if interval is None else int_option(self, "interval", interval, 1)
        for name, flag in (("pad", pad), ("position_bias", position_bias), ("dpb_residual", dpb_residual)):
            if not isinstance(flag, bool):
                raise TypeError(f"{type(self).__name__}: {name} must be a bool, got {type(flag).__name__}")
        self.pad = pad
        pos_dim = max(1, dim // 16) if dpb_dim is None else int_option(self, "dpb_dim", dpb_dim, 1)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.pos = DynamicPositionBias(pos_dim, num_heads, dpb_residual) if position_bias else None

    def plan(self, Y: int, X: int) -> tuple[str, tuple[int, int], tuple[int, int]]:
        """``(mode, size, (gh, gw))`` the forward runs for a ``(Y, X)`` map; ValueError naming the option that
        does not divide the map (when ``pad`` is False)."""
        who, G = type(self).__name__, self.group_size
        mode = self.mode
        if min(Y, X) <= G:  # the released code: one group per side, short distance
            mode, G = "short", min(Y, X)
        if mode == "short":
            size, name = (G, G), "group_size"
        elif self.interval is None:
            size, name = (-(-Y // G), -(-X // G)), "group_size"
            if not self.pad and (Y % G or X % G):
                raise ValueError(f"{who}: the map (Y, X) = {(Y, X)} must be a multiple of group_size ({G}) on both "
                                 "sides for long distance groups of G x G; pass pad=True or an interval")
        else:
            size, name = (self.interval, self.interval), "interval"
        if not self.pad and (Y % size[0] or X % size[1]):
            raise ValueError(f"{who}: the map (Y, X) = {(Y, X)} must be a multiple of {name} ({size[0]}) on both "
                             "sides; pad=True pads and crops as CrossFormer's detection backbone")
        return mode, size, lsda_group_shape(Y, X, size, mode, self.pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last_hint(type(self).__name__, x, self.dim)
        check_input(self, x, "(B, Y, X, C)", channels=self.dim)
        B, Y, X, C = x.shape
        H = self.num_heads
        mode, size, (gh, gw) = self.plan(Y, X)
        q, k, v = self.qkv(x).view(B, Y, X, 3, H, C // H).unbind(3)                   # each (B, Y, X, H, D)
        bias = self.pos(gh, gw) if self.pos is not None else None                      # (H, n, n)
        out = long_short_distance_attention(q, k, v, size, mode=mode, bias=bias, pad=self.pad)
        return self.proj(out.reshape(B, Y, X, C))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, group_size={self.group_size}, mode={self.mode!r}, "
                f"interval={self.interval}, pad={self.pad}")
