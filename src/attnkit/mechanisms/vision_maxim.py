"""MAXIM's multi-axis gated MLP as a channels-last token mixer.

"MAXIM: Multi-Axis MLP for Image Processing", arXiv 2201.02973 (CVPR 2022), §3.1.

``u = GELU(Dense_{C -> 2C}(LN(x)))``, split into a local half (gMLP over the ``b x b`` pixels of each block)
and a global half (gMLP over the ``g x g`` pixels of each dilated grid group, MaxViT's grid), then
``Dense_{C -> C}(concat(local, global))`` (each gMLP output has C/2 channels).
``gMLP(z) = z1 * (W LN(z2) + bias)`` with the dense layer over
the tokens of each group (``axis_token_mixing``). The block's residual ``x + ...`` is not applied here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.vision.common import channels_last_hint
from attnkit.ops.vision.gmlp import axis_token_mixing
from attnkit.reference.naive_vision2 import naive_maxim_gmlp_module
from attnkit.registry import Family, InputKind, Paper, check_input, int_option, register

PAPER = Paper("MAXIM: Multi-Axis MLP for Image Processing", "2201.02973", 2022)


class _AxisGate(nn.Module):
    """One gMLP branch: LN over the gating half's channels, then a dense layer over the tokens of each group."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        n = size * size
        # near-identity start (weights 0, bias 1: every gate 1) as MAXIM's gMLP initialises its token dense layer
        self.weight = nn.Parameter(torch.zeros(n, n))
        self.bias = nn.Parameter(torch.ones(n))


def _gmlp_flops(cfg: dict) -> float:
    y, x = cfg["input_size"]
    b, g = cfg["block_size"], cfg["grid_size"]
    if y % b or x % b or y % g or x % g:
        raise ValueError(f"maxim_gmlp: input {(y, x)} is not a multiple of block_size {b} and grid_size {g}")
    n, c = cfg.get("batch", 1) * y * x, cfg["dim"]
    return float(2 * n * c * 2 * c + 2 * n * 2 * c * c + 2 * n * (c // 2) * (b * b + g * g))


@register(
    name="maxim_gmlp", family=Family.VISION, paper=PAPER,
    patterns=("noncausal-self",), complexity="O(N C (b^2 + g^2) + N C^2)", flops=_gmlp_flops,
    options=lambda c: {"dim": c["dim"], "block_size": c["block_size"], "grid_size": c["grid_size"]},
    reference=naive_maxim_gmlp_module, functional=axis_token_mixing,
    default_config={"dim": 96, "block_size": 8, "grid_size": 8},
    tiny_config={"dim": 8, "block_size": 2, "grid_size": 2},
    default_input={"batch": 1, "input_size": (56, 56)}, tiny_input={"batch": 1, "input_size": (4, 6)},
    input_kind=InputKind.IMAGE,
    notes="MAXIM's multi-axis gated MLP on channels-last (B, Y, X, C): LayerNorm -> Linear(C, 2C) -> GELU -> "
          "local half: gMLP over each b x b block; global half: gMLP over each g x g grid group (pixels spaced "
          "(Y/g, X/g) apart) -> concat (C) -> Linear(C, C). gMLP splits its C channels in two halves (C even): z1 * "
          "(W LN(z2) + bias), W (n, n) over the group's tokens, initialised to W = 0, bias = 1 (all gates 1) "
          "[inferred from the paper's description of gMLP initialisation]. Y, X must be multiples of b and g: "
          "MAXIM pads and crops around the layer; this layer raises instead. The block's residual is not "
          "applied (a token mixer). Default b = g = 8 as MAXIM's early stages. Simplified against the released "
          "code, which wraps each branch in its own LN, Dense(C, 2C), GELU, Dense and residual and gates with "
          "u * (v + 1) [from memory, not checked against the source]; here the paper-level form above, one "
          "shared LN + Dense(C, 2C) and the bias-1 init.",
)
class MaximGatedMLP(nn.Module):
    """MAXIM multi-axis gated MLP on ``x (B, Y, X, C)`` -> ``(B, Y, X, C)``.

    Args:
        dim: ``C`` (even).
        block_size: ``b``, the local branch's block side; grid_size: ``g``, the global branch's grid side.
    """

    def __init__(self, dim: int, block_size: int = 8, grid_size: int = 8):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 2)
        if dim % 2:
            raise ValueError(f"{type(self).__name__}: dim must be even (each gMLP halves it), got {dim}")
        self.block_size = int_option(self, "block_size", block_size, 1)
        self.grid_size = int_option(self, "grid_size", grid_size, 1)
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * dim)
        self.local_gate = _AxisGate(dim // 2, self.block_size)
        self.global_gate = _AxisGate(dim // 2, self.grid_size)
        self.out_proj = nn.Linear(dim, dim)  # the two gMLP outputs are C/2 each

    @staticmethod
    def _gmlp(z: torch.Tensor, gate: _AxisGate, size: int, axis: str) -> torch.Tensor:
        z1, z2 = z.chunk(2, dim=-1)                                        # each (B, Y, X, C/2)
        return z1 * axis_token_mixing(gate.norm(z2), gate.weight, gate.bias, size, axis=axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last_hint(type(self).__name__, x, self.dim)
        check_input(self, x, "(B, Y, X, C)", channels=self.dim)
        Y, X = x.shape[1:3]
        for name, s in (("block_size", self.block_size), ("grid_size", self.grid_size)):
            if Y % s or X % s:
                raise ValueError(f"{type(self).__name__}: x's map (Y, X) = {(Y, X)} must be a multiple of "
                                 f"{name} {s} on both sides (MAXIM pads and crops around the layer)")
        u_local, u_global = F.gelu(self.in_proj(self.norm(x))).chunk(2, dim=-1)  # each (B, Y, X, C)
        local = self._gmlp(u_local, self.local_gate, self.block_size, "block")
        glob = self._gmlp(u_global, self.global_gate, self.grid_size, "grid")
        return self.out_proj(torch.cat([local, glob], dim=-1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, block_size={self.block_size}, grid_size={self.grid_size}"
