"""MaxViT multi-axis attention: block (window) attention followed by grid (dilated global) attention.

"MaxViT: Multi-Axis Vision Transformer", arXiv 2204.01697 (ECCV 2022).

The module: parameters and projections around the op in ``attnkit.ops.local.multi_axis``, whose docstring
describes the algorithm.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.local.multi_axis import block_attention, grid_attention, partition_map, relative_bias, unpartition_map
from attnkit.reference.naive_modules import naive_maxvit
from attnkit.registry import Family, InputKind, Paper, check_input, choice_option, divisible, int_option, register


class _RelAttention(nn.Module):
    """``Linear(C, 3C)`` -> block or grid attention with a relative bias table -> ``Linear(C, C)``."""

    def __init__(self, dim: int, num_heads: int, size: int, kind: str, bias: bool = True):
        super().__init__()
        self.num_heads, self.size, self.kind = num_heads, size, kind
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.table = nn.Parameter(torch.randn((2 * size - 1) ** 2, num_heads) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Y, X, C = x.shape[1:]
        M, H = self.size, self.num_heads
        # Partition the C-channel input once (not q, k and v, 3C): every block or grid group becomes an
        # M x M window of the batch, where block attention over one window is the group's attention.
        win = partition_map(x, self.kind, M)                                      # (B*nW, M, M, C)
        q, k, v = self.qkv(win).view(-1, M, M, 3, H, C // H).unbind(3)           # each (B*nW, M, M, H, D)
        out = block_attention(q, k, v, M, bias=relative_bias(self.table, M))     # (B*nW, M, M, H, D)
        out = self.proj(out.reshape(-1, M, M, C))                                 # (B*nW, M, M, C)
        return unpartition_map(out, self.kind, M, Y, X)                           # (B, Y, X, C)


class MultiAxisAttention(nn.Module):
    """MaxViT multi-axis attention on channels-last ``(B, Y, X, C)``: a pure token mixer, block then grid.

    ``y = GridAttn(BlockAttn(x))``, each with its own qkv / output projections and relative bias table.
    Like every other mixer of the library it has no norm and no residual: MaxViT's block wraps each
    attention as ``x + Attn(LN(x))`` (with MBConv and FFNs), which belongs to the model around it.
    ``Y`` and ``X`` must be multiples of ``block_size`` and ``grid_size`` (MaxViT's released code and
    timm assert the same). ``bias=False`` drops the biases of both projections (timm's ``attn_bias``).
    """

    def __init__(self, dim: int, num_heads: int, block_size: int = 7, grid_size: int = 7, bias: bool = True):
        super().__init__()
        divisible(self, dim, num_heads)
        self.dim = dim
        self.block_size = int_option(self, "block_size", block_size, 1)
        self.grid_size = int_option(self, "grid_size", grid_size, 1)
        bias = choice_option(self, "bias", bias, (True, False))
        self.block = _RelAttention(dim, num_heads, block_size, "block", bias)
        self.grid = _RelAttention(dim, num_heads, grid_size, "grid", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, Y, X, C)`` -> ``(B, Y, X, C)``."""
        check_input(self, x, "(B, Y, X, C)", channels=self.dim)
        Y, X = x.shape[1:3]
        for name, size in (("block_size", self.block_size), ("grid_size", self.grid_size)):
            if Y % size or X % size:
                raise ValueError(f"{type(self).__name__}: the map (Y, X) = {(Y, X)} must be a multiple of {name} "
                                 f"({size}) on both sides; pad or crop the input")
        return self.grid(self.block(x))

    @classmethod
    def from_timm(cls, timm_module: nn.Module, grid_module: nn.Module | None = None) -> MultiAxisAttention:
        """The attention half of timm's MaxViT block, with timm's weights.

        ``timm_module`` is a ``timm.models.maxxvit.MaxxVitBlock`` (its ``attn_block`` and ``attn_grid``),
        or the block-partition ``PartitionAttentionCl`` with ``grid_module`` the grid-partition one.
        What is copied is each ``PartitionAttentionCl``'s attention path, i.e. partition -> ``attn``
        (qkv, relative position bias table, softmax attention, proj) -> reverse, so that
        ``from_timm(b, g)(x) == g._partition_attn(b._partition_attn(x))`` for ``x (B, Y, X, C)``. timm's
        ``norm1`` / ``norm2``, ``mlp``, layer scales, drop paths, the residuals and the block's MBConv
        stay in the model around this mixer (see the class docstring). Only timm's ``rel_pos_type='bias'``
        (``RelPosBias``), square partitions, no attention / projection dropout and the channels-last
        layout (``use_nchw_attn=False``) are supported; anything else raises ``ValueError`` naming it.
        """
        who = f"{cls.__name__}.from_timm"
        if grid_module is None:
            if type(timm_module).__name__ != "MaxxVitBlock":
                raise TypeError(f"{who}: timm_module must be a timm MaxxVitBlock, or the block PartitionAttentionCl "
                                f"with grid_module the grid one; got {type(timm_module).__name__} and no grid_module")
            if getattr(timm_module, "nchw_attn", False):
                raise ValueError(f"{who}: use_nchw_attn=True (PartitionAttention2d) is not supported; "
                                 f"expected the channels-last PartitionAttentionCl")
            if timm_module.attn_block is None:
                raise ValueError(f"{who}: no_block_attn=True (grid attention only) is not supported: this module "
                                 f"is block then grid")
            timm_module, grid_module = timm_module.attn_block, timm_module.attn_grid
        for arg, part, want in (("timm_module", timm_module, True), ("grid_module", grid_module, False)):
            if type(part).__name__ != "PartitionAttentionCl":
                raise TypeError(f"{who}: {arg} must be a timm PartitionAttentionCl, got {type(part).__name__}")
            if bool(part.partition_block) != want:
                raise ValueError(f"{who}: {arg} must have partition_type={'block' if want else 'grid'!r}")
        a, b = timm_module.attn, grid_module.attn
        dim, heads = a.qkv.in_features, a.num_heads
        if a.proj.out_features != dim or 3 * dim != a.qkv.out_features:
            raise ValueError(f"{who}: timm_module.attn must map dim -> dim (attention width == dim), got "
                             f"qkv {a.qkv.in_features}->{a.qkv.out_features}, proj -> {a.proj.out_features}")
        if (b.qkv.in_features, b.num_heads, b.qkv.bias is None) != (dim, heads, a.qkv.bias is None):
            raise ValueError(f"{who}: grid_module must have the same dim, heads and attn_bias as timm_module")
        sizes = []
        for arg, name, part in (("timm_module", "window_size", timm_module), ("grid_module", "grid_size",
                                                                               grid_module)):
            ps = tuple(part.partition_size)
            if ps[0] != ps[1]:
                raise ValueError(f"{who}: {arg} has a non-square partition {name}={ps}; only square is supported")
            rp = part.attn.rel_pos
            if type(rp).__name__ != "RelPosBias" or getattr(rp, "prefix_tokens", 0):
                raise ValueError(f"{who}: {arg} has rel_pos_type giving {type(rp).__name__}; only 'bias' (RelPosBias "
                                 f"without prefix tokens) is supported, not the 'mlp' / 'bias_tf' variants")
            if tuple(rp.window_size) != ps:
                raise ValueError(f"{who}: {arg}'s relative bias window {tuple(rp.window_size)} != its {name} {ps}")
            if part.attn.attn_drop.p or part.attn.proj_drop.p:
                raise ValueError(f"{who}: {arg} has attn_drop/proj_drop > 0; only dropout-free attention is "
                                 f"reproduced")
            sizes.append(ps[0])
        w = a.qkv.weight
        m = cls(dim, heads, block_size=sizes[0], grid_size=sizes[1], bias=a.qkv.bias is not None).to(w.device, w.dtype)
        for mine, theirs in ((m.block, a), (m.grid, b)):
            _copy_attention(mine, theirs)
        return m

    def extra_repr(self) -> str:
        return f"dim={self.dim}, block_size={self.block_size}, grid_size={self.grid_size}"


def _copy_attention(mine: _RelAttention, theirs: nn.Module) -> None:
    """timm ``AttentionCl`` -> ``_RelAttention``: qkv rows in ``(3, H, D)`` order, proj and bias table as they are.

    timm's ``head_first=True`` orders the qkv output channels ``(H, 3, D)``; ours are ``(3, H, D)``
    (``head_first=False``). timm's relative index is ``(dy + M-1)(2M-1) + (dx + M-1)`` with ``d = query -
    key``, the convention of :func:`relative_bias`, so the table copies unchanged.
    """
    H, C = theirs.num_heads, theirs.qkv.in_features
    D = C // H
    w, b = theirs.qkv.weight, theirs.qkv.bias
    if theirs.head_first:
        w = w.view(H, 3, D, C).transpose(0, 1).reshape(3 * C, C)  # (H, 3, D, C) -> (3, H, D, C) rows
        b = None if b is None else b.view(H, 3, D).transpose(0, 1).reshape(3 * C)
    with torch.no_grad():
        mine.qkv.weight.copy_(w)
        mine.proj.weight.copy_(theirs.proj.weight)
        if b is not None:
            mine.qkv.bias.copy_(b)
            mine.proj.bias.copy_(theirs.proj.bias)
        mine.table.copy_(theirs.rel_pos.relative_position_bias_table)


def _flops(cfg: dict) -> float:
    B, C = cfg.get("batch", 1), cfg["dim"]
    n = cfg["input_size"][0] * cfg["input_size"][1]
    return float(B * 2 * (2 * n * C * 4 * C) + B * 4 * n * (cfg["block_size"] ** 2 + cfg["grid_size"] ** 2) * C)


_DEFAULT = {"dim": 32, "num_heads": 4, "block_size": 4, "grid_size": 2}
_TINY = {"dim": 8, "num_heads": 2, "block_size": 2}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "block_size": c["block_size"], "grid_size": c["grid_size"]}


register(name="maxvit_attention", family=Family.LOCAL,
         paper=Paper("MaxViT: Multi-Axis Vision Transformer", "2204.01697", 2022),
         patterns=("noncausal-self",), complexity="O(N (P^2 + G^2) D)", flops=_flops, options=_options,
         reference=naive_maxvit, functional=(block_attention, grid_attention), default_config=_DEFAULT,
         tiny_config=_TINY, default_input={"batch": 2, "input_size": (8, 8)},
         tiny_input={"batch": 1, "input_size": (4, 4)},
         notes="A pure token mixer: grid(block(x)), each attention with its own qkv/proj and ((2M-1)^2, H) "
               "relative bias (trunc-normal-ish init 0.02). MaxViT's pre-norm residual around each attention, "
               "MBConv and FFNs belong to the block around it (no LayerNorm, no residual here). Block and grid "
               "sizes must divide the map (ValueError, as the released code and timm assert). from_timm copies the "
               "attention path (partition, qkv, RelPosBias table, proj, reverse) of timm maxxvit's block and grid "
               "PartitionAttentionCl (or a MaxxVitBlock): timm's head_first qkv rows are reordered to (3, H, D), the "
               "bias table copies unchanged (same (dy+M-1)(2M-1)+(dx+M-1) index, d = query - key); bias=False is "
               "timm's attn_bias=False. timm's rel-pos MLP / TF variants, non-square partitions, dropout and the "
               "NCHW variant are refused. timm's norms, MLPs, layer scales and residuals are outside this mixer.",
         input_kind=InputKind.IMAGE)(MultiAxisAttention)

