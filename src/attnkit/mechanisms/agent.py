"""Agent Attention: softmax attention through a few pooled agent tokens (generalised linear attention).

"Agent Attention: On the Integration of Softmax and Linear Attention", arXiv 2312.08874
(ECCV 2024).

The module: parameters and projections around the op in ``attnkit.ops.linear.agent``, whose docstring
describes the algorithm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.linear.agent import agent_attention, depthwise_conv
from attnkit.reference.naive_modules import naive_agent
from attnkit.registry import Family, InputKind, Paper, check_input, divisible, int_option, register


@dataclass(frozen=True)
class AgentConfig:
    dim: int
    num_heads: int
    num_agents: int = 49
    grid: tuple[int, ...] = (7, 7)  # token grid the row/column biases are sized for; (N,) in 1-D
    agent_bias: bool = True
    dwc: bool = True
    qkv_bias: bool = True


class AgentAttention(nn.Module):
    """Agent attention token mixer for ``x (B, h, w, C)`` (``len(grid) == 2``) or ``x (B, N, C)`` (1-D).

    Example:
        >>> m = AgentAttention(64, 4, num_agents=16, grid=(14, 14))
        >>> y = m(torch.randn(2, 14, 14, 64))
    """

    def __init__(self, dim: int, num_heads: int, num_agents: int = 49, grid: tuple[int, ...] = (7, 7),
                 agent_bias: bool = True, dwc: bool = True, qkv_bias: bool = True):
        super().__init__()
        who = type(self).__name__
        if not isinstance(grid, (tuple, list)) or len(grid) not in (1, 2):
            raise ValueError(f"{who}: grid must be (N,) or (h, w), got {grid!r}")
        grid = tuple(int_option(self, "grid entry", g, 1) for g in grid)
        divisible(self, dim, num_heads)
        side = math.isqrt(int_option(self, "num_agents", num_agents, 1))
        if len(grid) == 2 and side * side != num_agents:
            raise ValueError(f"{who}: num_agents must be a perfect square for 2-D inputs, got {num_agents}")
        self.config = AgentConfig(dim, num_heads, num_agents, grid, agent_bias, dwc, qkv_bias)
        H, n = num_heads, num_agents
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        conv = nn.Conv2d if len(grid) == 2 else nn.Conv1d
        self.dwc = conv(dim, dim, 3, padding=1, groups=dim) if dwc else None
        if agent_bias:
            pos = (7, 7) if len(grid) == 2 else (7,)
            self.an_bias = nn.Parameter(torch.empty(H, n, *pos))  # agent -> key, low-res position bias
            self.na_bias = nn.Parameter(torch.empty(H, n, *pos))  # query -> agent
            params = [self.an_bias, self.na_bias]
            if len(grid) == 2:
                h, w = grid
                self.ah_bias = nn.Parameter(torch.empty(H, n, h, 1))
                self.aw_bias = nn.Parameter(torch.empty(H, n, 1, w))
                self.ha_bias = nn.Parameter(torch.empty(H, n, h, 1))
                self.wa_bias = nn.Parameter(torch.empty(H, n, 1, w))
                params += [self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias]
            for p in params:
                nn.init.trunc_normal_(p, std=0.02)

    def agents(self, q: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """Pool queries ``(B, N, C)`` on their grid to ``(B, n, C)`` (all H*D channels at once, per channel)."""
        B, _, C = q.shape
        n = self.config.num_agents
        if len(size) == 2:
            side = math.isqrt(n)
            grid = q.transpose(1, 2).reshape(B, C, *size)  # (B, C, h, w)
            return F.adaptive_avg_pool2d(grid, (side, side)).flatten(2).transpose(1, 2)  # (B, n, C)
        return F.adaptive_avg_pool1d(q.transpose(1, 2), n).transpose(1, 2)  # (B, n, C)

    def biases(self, size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``B1 (H, n, N)`` and ``B2 (H, N, n)`` for a token grid of ``size`` (bilinear, align_corners=False)."""
        H, n = self.config.num_heads, self.config.num_agents
        if len(size) == 1:
            b1 = F.interpolate(self.an_bias, size=size, mode="linear")  # (H, n, N)
            b2 = F.interpolate(self.na_bias, size=size, mode="linear").transpose(1, 2)  # (H, N, n)
            return b1, b2
        h, w = size

        def rs(p, s):
            return p if tuple(p.shape[-2:]) == s else F.interpolate(p, size=s, mode="bilinear")

        b1 = rs(self.an_bias, (h, w)) + rs(self.ah_bias, (h, 1)) + rs(self.aw_bias, (1, w))  # (H, n, h, w)
        b2 = rs(self.na_bias, (h, w)) + rs(self.ha_bias, (h, 1)) + rs(self.wa_bias, (1, w))  # (H, n, h, w)
        return b1.reshape(H, n, h * w), b2.reshape(H, n, h * w).transpose(1, 2)  # (H, n, N), (H, N, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        check_input(self, x, "(B, Y, X, C)" if len(c.grid) == 2 else "(B, N, C)", channels=c.dim)
        size = tuple(x.shape[1:-1])
        B, C = x.shape[0], x.shape[-1]
        N, H, D = math.prod(size), c.num_heads, C // c.num_heads
        q, k, v = self.qkv(x.reshape(B, N, C)).chunk(3, dim=-1)  # (B, N, C) each
        a = self.agents(q, size).reshape(B, c.num_agents, H, D)  # (B, n, H, D)
        b1, b2 = self.biases(size) if c.agent_bias else (None, None)
        o = agent_attention(q.reshape(B, N, H, D), k.reshape(B, N, H, D), v.reshape(B, N, H, D), a,
                            bias1=b1, bias2=b2).reshape(B, N, C)  # (B, N, C)
        if self.dwc is not None:
            vg = v.transpose(1, 2).reshape(B, C, *size)  # (B, C, h, w) or (B, C, N)
            o = o + depthwise_conv(vg, self.dwc).reshape(B, C, N).transpose(1, 2)  # (B, N, C)
        return self.proj(o).reshape(x.shape)


def _flops(cfg: dict) -> float:
    B, C, n = cfg.get("batch", 1), cfg["dim"], cfg["num_agents"]
    N = math.prod(cfg["grid"])
    return float(B * (2 * N * C * 3 * C + 2 * N * C * C + 4 * N * n * C + 9 * 2 * N * C))


_DEFAULT = {"dim": 32, "num_heads": 2, "num_agents": 9, "grid": (6, 6)}
_DEFAULT_1D = {"dim": 32, "num_heads": 2, "num_agents": 8, "grid": (40,)}
_TINY = {"dim": 8, "num_agents": 4, "grid": (4, 4)}
_TINY_1D = {"dim": 8, "num_agents": 3, "grid": (8,)}


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "num_agents": c["num_agents"], "grid": tuple(c["grid"])}


def _shape(c: dict) -> tuple[int, ...]:
    return (c["batch"], *c.get("input_size", c["grid"]), c["dim"])  # (B, h, w, C) or (B, N, C); default: the grid


_PAPER = Paper("Agent Attention: On the Integration of Softmax and Linear Attention", "2312.08874", 2023)


register(
    name="agent_attention", family=Family.LINEAR, paper=_PAPER, patterns=("noncausal-self",),
    complexity="O(N n D)", flops=_flops, options=_options, reference=naive_agent, functional=agent_attention,
    default_config=_DEFAULT, tiny_config=_TINY, input_kind=InputKind.IMAGE, shape=_shape,
    default_input={"batch": 2}, tiny_input={"batch": 1},
    notes="2-D: agents by adaptive avg-pool to sqrt(n) x sqrt(n); agent bias = bilinear 7x7 position bias + "
          "row + column biases (resized when the grid differs); 3x3 DWC on V; no class token.",
)(AgentAttention)


class AgentAttention1d(AgentAttention):
    """1-D agent attention on ``x (B, N, C)``: ``AgentAttention`` with ``grid=(N,)``."""


register(
    name="agent_attention_1d", family=Family.LINEAR, paper=_PAPER, patterns=("noncausal-self",),
    complexity="O(N n D)", flops=_flops, options=_options, reference=naive_agent, functional=agent_attention,
    default_config=_DEFAULT_1D, tiny_config=_TINY_1D, shape=_shape, default_input={"batch": 2},
    tiny_input={"batch": 1},
    notes="1-D variant (our choice, the paper is 2-D): adaptive avg-pool of queries to n agents, agent bias "
          "= linear resize of a length-7 position bias, size-3 depthwise Conv1d on V.",
)(AgentAttention1d)
