"""Lightning Attention token mixers: TNL's gated linear attention and MiniMax's lightning layer.

"Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention",
arXiv 2405.17381 (TNL, 2307.14995); "Lightning Attention-2", arXiv 2401.04658;
"MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", arXiv 2506.13585
(same lightning layer as MiniMax-01, arXiv 2501.08313).

The module: parameters and projections around the op in ``attnkit.ops.linear.decay``, whose docstring
describes the algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.linear.call import linear_attention
from attnkit.ops.linear.decay import srms_norm, tnl_decay
from attnkit.reference.naive_modules import naive_lightning
from attnkit.registry import Family, Paper, check_input, choice_option, float_option, int_option, named_errors, register


@dataclass(frozen=True)
class LightningConfig:
    dim: int
    num_heads: int
    head_dim: int
    layer_idx: int = 0
    num_layers: int = 24
    schedule: str = "released"
    style: str = "tnl"  # "tnl": SiLU(q,k), SRMSNorm * u; "minimax": SiLU(q,k,v), RMSNorm(weight) * sigmoid gate
    eps: float = 1e-6
    chunk_size: int = 64


class LightningAttention(nn.Module):
    """TNL gated linear attention (GLA) on ``x (B, N, C)`` (arXiv 2307.14995).

    ``[q, k, v, u] = x W``; ``q, k = SiLU``; ``a = lightning(q, k, v, lambda_l)`` (scale 1, no denominator);
    ``y = (SRMSNorm_{H*D}(a) * u) W_o``. The norm spans all heads jointly. LRPE (TNL's first layer only) is
    not included. ``style="minimax"`` gives the MiniMax lightning layer instead (arXiv 2501.08313).

    Example:
        >>> m = LightningAttention(64, 4, layer_idx=0, num_layers=12)
        >>> y, state = m(torch.randn(2, 100, 64), return_state=True)
        >>> y1 = m(torch.randn(2, 1, 64), state=state)   # one decoding step
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, layer_idx: int = 0,
                 num_layers: int = 24, schedule: str = "released", style: str = "tnl", eps: float = 1e-6,
                 chunk_size: int = 64):
        super().__init__()
        who = type(self).__name__
        choice_option(self, "style", style, ("tnl", "minimax"))
        int_option(self, "dim", dim, 1)
        int_option(self, "num_heads", num_heads, 1)
        if head_dim is None and dim % num_heads:
            raise ValueError(f"{who}: dim ({dim}) must be divisible by num_heads ({num_heads}) or head_dim given")
        hd = dim // num_heads if head_dim is None else int_option(self, "head_dim", head_dim, 1)
        int_option(self, "num_layers", num_layers, 1)
        if not 0 <= int_option(self, "layer_idx", layer_idx, 0) < num_layers:
            raise ValueError(f"{who}: layer_idx must be in [0, num_layers={num_layers}), got {layer_idx}")
        int_option(self, "chunk_size", chunk_size, 1)
        float_option(self, "eps", eps, minimum=0.0)
        self.config = LightningConfig(dim, num_heads, hd, layer_idx, num_layers, schedule, style, eps, chunk_size)
        inner = num_heads * hd
        # lambda stays a python-side fp32 constant (not a buffer): module.to(bf16) must not round it
        with torch.device("cpu"), named_errors(self):  # also when the module is built under torch.device("meta")
            self._decay = tnl_decay(num_heads, layer_idx, num_layers, schedule).tolist()
        if style == "tnl":
            self.qkvu = nn.Linear(dim, 4 * inner, bias=False)
        else:
            self.qkv = nn.Linear(dim, 3 * inner, bias=False)
            self.gate = nn.Linear(dim, inner, bias=False)
            self.norm_weight = nn.Parameter(torch.ones(inner))
        self.out = nn.Linear(inner, dim, bias=False)

    @property
    def decay(self) -> torch.Tensor:
        return torch.tensor(self._decay, dtype=torch.float32)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, return_state: bool = False):
        c = self.config
        check_input(self, x, "(B, N, C)", channels=c.dim, meta="the linear_attention op has no meta path")
        B, N, _ = x.shape
        H, D = c.num_heads, c.head_dim
        if c.style == "tnl":
            q, k, v, u = self.qkvu(x).chunk(4, dim=-1)  # each (B, N, H*D)
            q, k = F.silu(q), F.silu(k)
        else:
            q, k, v = F.silu(self.qkv(x)).chunk(3, dim=-1)  # SiLU on v too in MiniMax
        q, k, v = (t.reshape(B, N, H, D) for t in (q, k, v))  # (B, N, H, D)
        # the unnormalised sums can exceed fp16's range (inputs ~1e4): keep them in fp32 through the norm
        a, new_state = linear_attention(q, k, v, decay=self.decay, scale=1.0, initial_state=state,
                                        return_state=True, chunk_size=c.chunk_size, out_dtype=_sum_dtype(x))
        a = srms_norm(a.reshape(B, N, H * D), c.eps).to(x.dtype)  # (B, N, H*D): the norm spans all heads jointly
        if c.style == "tnl":
            o = a * u
        else:
            o = a * self.norm_weight * torch.sigmoid(self.gate(x))
        y = self.out(o)
        return (y, new_state) if return_state else y


def _sum_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


class MiniMaxLightningAttention(LightningAttention):
    """MiniMax-01/M1 lightning layer: ``LightningAttention(style="minimax")`` (arXiv 2501.08313)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, layer_idx: int = 0,
                 num_layers: int = 80, schedule: str = "released", eps: float = 1e-6, chunk_size: int = 64):
        super().__init__(dim, num_heads, head_dim, layer_idx, num_layers, schedule, "minimax", eps, chunk_size)


def _flops(cfg: dict) -> float:
    B, N, C, H = cfg.get("batch", 1), cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    D = cfg.get("head_dim") or C // H
    chunk = cfg.get("chunk_size", 64)
    proj = 2 * B * N * C * H * D * (4 + 1)  # qkv(u/gate) in, out
    core = B * H * N * (4 * D * D + 2 * min(chunk, N) * D)  # chunked lightning (causal half of the tile)
    return float(proj + core)


_DEFAULT = {"dim": 32, "num_heads": 2, "layer_idx": 1, "num_layers": 4, "chunk_size": 16}
_TINY = {"dim": 8, "chunk_size": 8}
_INPUT, _TINY_INPUT = {"batch": 2, "seq_len": 40}, {"batch": 1, "seq_len": 20}  # N > 16: the chunked algorithm


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "head_dim": c.get("head_dim"), "layer_idx": c["layer_idx"],
            "num_layers": c["num_layers"], "chunk_size": c["chunk_size"]}


register(
    name="lightning_attention", family=Family.LINEAR,
    paper=Paper("Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention",
                "2405.17381", 2024),
    patterns=("causal-self",), complexity="O(N H D^2 + N H C D)", flops=_flops, options=_options,
    reference=naive_lightning, functional=linear_attention, default_config=_DEFAULT, tiny_config=_TINY,
    default_input=_INPUT, tiny_input=_TINY_INPUT,
    notes="TNL GLA mixer; decay schedule 'released' (ALiBi slopes x (1 - l/(L-1) + 1e-5)) by default, "
          "'paper' and 'fla' selectable; no LRPE; decay fixed (not learnable) as in the paper.",
)(LightningAttention)

register(
    name="minimax_lightning", family=Family.LINEAR,
    paper=Paper("MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", "2506.13585", 2025),
    patterns=("causal-self",), complexity="O(N H D^2 + N H C D)", flops=_flops, options=_options,
    reference=naive_lightning, functional=linear_attention, default_config=_DEFAULT, tiny_config=_TINY,
    default_input=_INPUT, tiny_input=_TINY_INPUT,
    notes="MiniMax-01/M1 lightning layer: SiLU on q,k,v; RMSNorm over all H*D (learnable weight); sigmoid "
          "output gate; decay schedule 'released' with the global layer index.",
)(MiniMaxLightningAttention)
