"""Softmax / linear attention hybrids by layer (MiniMax-M1) and by head (HydraHead, MiniCPM-SALA style).

"MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", arXiv 2506.13585
(7 lightning : 1 softmax layers); "HydraHead: From Head-Level Functional Heterogeneity to
Specialized Attention Hybridization", arXiv 2606.20097 (softmax and linear heads inside one layer,
scale-normalised fusion); "MiniCPM-SALA", arXiv 2602.11761 (1 : 3 by layer). HydraHead's fusion
formula and head selection are [unverified] in the notes: the fusion here is our default
(per-head RMS normalisation with a learnable gain), and the softmax heads are given explicitly
(selection by a retrieval score is left to the caller).

One module, :class:`HybridAttention`, is a layer whose heads in ``softmax_heads`` run causal softmax
attention (``ak.attention``) and whose other heads run decayed linear attention
(``ak.linear_attention``, lightning decay). All heads softmax is a softmax layer, none is a linear
layer, so a layer-level hybrid is a list of these built from :class:`HybridSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnkit import masks
from attnkit.ops.dense.call import attention
from attnkit.ops.linear.call import linear_attention
from attnkit.ops.linear.decay import tnl_decay
from attnkit.reference.naive_modules import naive_hybrid
from attnkit.registry import Family, Paper, check_input, choice_option, divisible, int_option, named_errors, register


@dataclass(frozen=True)
class HybridSpec:
    """Which layers (and heads) are softmax.

    Attributes:
        num_layers: L.
        softmax_every: layer l is a softmax layer iff ``(l + 1) % softmax_every == 0`` (MiniMax: 8, i.e.
            7 linear : 1 softmax; MiniCPM-SALA's 1 : 3 is 4). 0 means no softmax layer.
        head_ratio: in the other layers, ``num_heads // (head_ratio + 1)`` heads (the first ones) keep
            softmax attention (HydraHead's LA:FA ratio r, default 3 -> 25 %); None = pure linear layers.
    """

    num_layers: int
    softmax_every: int = 8
    head_ratio: int | None = None

    def layer_types(self) -> list[str]:
        """``"softmax"``, ``"linear"`` or ``"mixed"`` per layer."""
        out = []
        for layer in range(self.num_layers):
            if self.softmax_every and (layer + 1) % self.softmax_every == 0:
                out.append("softmax")
            else:
                out.append("linear" if self.head_ratio is None else "mixed")
        return out

    def softmax_heads(self, layer: int, num_heads: int) -> tuple[int, ...]:
        kind = self.layer_types()[layer]
        if kind == "softmax":
            return tuple(range(num_heads))
        if kind == "linear":
            return ()
        return tuple(range(max(1, num_heads // (self.head_ratio + 1))))

    def build(self, dim: int, num_heads: int, **kwargs) -> nn.ModuleList:
        """One :class:`HybridAttention` per layer; linear heads use the lightning decay of their global layer index."""
        return nn.ModuleList(
            HybridAttention(dim, num_heads, self.softmax_heads(layer, num_heads), layer_idx=layer,
                            num_layers=self.num_layers, **kwargs)
            for layer in range(self.num_layers))


class HybridAttention(nn.Module):
    """A causal layer mixing softmax heads and linear heads on ``x (B, N, C)``.

    Softmax heads: ``softmax(q k^T / sqrt(D), causal) v``. Linear heads: ``SiLU`` on q, k, decay
    ``tnl_decay(H, layer_idx, num_layers)`` of those heads, scale ``D^-1/2``. Fusion (``fusion="rms"``):
    every head's output is divided by its RMS over Dv and multiplied by a learnable gain (init 1), before
    ``W_o`` and in the original head order. ``forward(x, cache=None, return_cache=False)`` supports
    prefill then decode: the cache holds K/V of the softmax heads and the state of the linear heads.

    Example:
        >>> layer = HybridAttention(64, 8, softmax_heads=(0, 1))      # 3:1 linear:softmax heads
        >>> y, cache = layer(torch.randn(1, 100, 64), return_cache=True)
        >>> y1 = layer(torch.randn(1, 1, 64), cache=cache)
    """

    def __init__(self, dim: int, num_heads: int, softmax_heads: tuple[int, ...] = (), layer_idx: int = 0,
                 num_layers: int = 1, schedule: str = "released", fusion: str | None = "rms"):
        super().__init__()
        who = type(self).__name__
        divisible(self, dim, num_heads)
        sm = sorted(set(int_option(self, "softmax_heads entry", h, 0) for h in softmax_heads))
        if any(not 0 <= h < num_heads for h in sm):
            raise ValueError(f"{who}: softmax_heads must be in [0, {num_heads}), got {softmax_heads}")
        choice_option(self, "fusion", fusion, ("rms", None))
        int_option(self, "num_layers", num_layers, 1)
        if not 0 <= int_option(self, "layer_idx", layer_idx, 0) < num_layers:
            raise ValueError(f"{who}: layer_idx must be in [0, num_layers={num_layers}), got {layer_idx}")
        self.dim = dim
        self.num_heads, self.fusion = num_heads, fusion
        self.softmax_heads = tuple(sm)
        self.linear_heads = tuple(h for h in range(num_heads) if h not in sm)
        with torch.device("cpu"), named_errors(self):  # a python-side constant, also under torch.device("meta")
            lam = tnl_decay(num_heads, layer_idx, num_layers, schedule)
        self._decay = lam[list(self.linear_heads)].tolist()  # python-side fp32 constant, see lightning.py
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.gain = nn.Parameter(torch.ones(num_heads)) if fusion == "rms" else None
        self.out = nn.Linear(dim, dim, bias=False)

    @property
    def decay(self) -> torch.Tensor:
        """The linear heads' lightning decay ``(Hl,)`` float32 (in ``linear_heads`` order)."""
        return torch.tensor(self._decay, dtype=torch.float32)

    def forward(self, x: torch.Tensor, cache: dict | None = None, return_cache: bool = False):
        check_input(self, x, "(B, N, C)", channels=self.dim, meta=None if not self.linear_heads else
                    "the linear_attention op has no meta path")
        B, N, C = x.shape
        H, D = self.num_heads, C // self.num_heads
        q, k, v = self.qkv(x).view(B, N, 3, H, D).unbind(2)  # (B, N, H, D)
        heads = [None] * H
        new_cache: dict = {}
        if self.softmax_heads:
            idx = list(self.softmax_heads)
            ks, vs = k[:, :, idx], v[:, :, idx]  # (B, N, Hs, D)
            past = 0
            if cache is not None and cache.get("kv") is not None:
                past = cache["kv"][0].shape[1]
                ks, vs = torch.cat([cache["kv"][0], ks], 1), torch.cat([cache["kv"][1], vs], 1)
            o = attention(q[:, :, idx], ks, vs, mask=masks.causal(past))  # (B, N, Hs, D)
            new_cache["kv"] = (ks, vs)
            for j, h in enumerate(idx):
                heads[h] = o[:, :, j]
        if self.linear_heads:
            idx = list(self.linear_heads)
            state = None if cache is None else cache.get("state")
            # with the rms fusion the unnormalised linear sums stay in fp32 until normalised: for half inputs
            # around 1e4 they exceed fp16's range
            wide = self.gain is not None and x.dtype in (torch.float16, torch.bfloat16)
            o, new_cache["state"] = linear_attention(
                F.silu(q[:, :, idx]), F.silu(k[:, :, idx]), v[:, :, idx], decay=torch.tensor(self._decay),
                initial_state=state, return_state=True,
                out_dtype=torch.float32 if wide else None)  # (B, N, Hl, D)
            for j, h in enumerate(idx):
                heads[h] = o[:, :, j]
        wide = torch.promote_types(x.dtype, torch.float32) if self.gain is not None else x.dtype
        o = torch.stack([h.to(wide) for h in heads], dim=2)  # (B, N, H, D) in the original head order
        if self.gain is not None:
            o = (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.gain[:, None]
        y = self.out(o.reshape(B, N, C))
        return (y, new_cache) if return_cache else y


def _flops(cfg: dict) -> float:
    B, N, C, H = cfg.get("batch", 1), cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    D, nf = C // H, len(cfg.get("softmax_heads", ()))
    return float(2 * B * N * C * 4 * C + B * nf * 2 * N * N * D + B * (H - nf) * N * (4 * D * D + 128 * D))


_DEFAULT = {"dim": 32, "num_heads": 4, "softmax_heads": (1,)}
_TINY = {"dim": 8, "num_heads": 2}
_INPUT, _TINY_INPUT = {"batch": 2, "seq_len": 40}, {"batch": 1, "seq_len": 20}  # N > 16: the chunked linear algorithm


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "softmax_heads": tuple(c["softmax_heads"])}


register(
    name="hybrid_attention", family=Family.LINEAR,
    paper=Paper("HydraHead: From Head-Level Functional Heterogeneity to Specialized Attention Hybridization",
                "2606.20097", 2026),
    patterns=("causal-self",), complexity="(Hs/H) O(N^2 D) + (Hl/H) O(N D^2)", flops=_flops, options=_options,
    reference=naive_hybrid, functional=(attention, linear_attention), default_config=_DEFAULT, tiny_config=_TINY,
    default_input=_INPUT, tiny_input=_TINY_INPUT,
    notes="Head-level hybrid; HybridSpec gives MiniMax-M1's 7:1 layer ratio (softmax_every=8). Linear heads: "
          "SiLU q/k, lightning decay, scale D^-1/2 (no Gated DeltaNet). Fusion = per-head RMS norm x gain "
          "[unverified in the paper]; softmax heads are chosen by the caller (no retrieval-score selection).",
)(HybridAttention)
