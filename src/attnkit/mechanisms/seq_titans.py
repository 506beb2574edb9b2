"""Titans: Learning to Memorize at Test Time (arXiv 2501.00663).

A neural long-term memory (:func:`~attnkit.ops.memory.titans.titans_memory`) written by a surprise
gradient with momentum and forgetting, combined with attention in one of the paper's three ways
(section 4): memory as a context (``mac``), as a gate (``mag``) or as a layer (``mal``); ``lmm`` is the
memory alone. Learnable persistent tokens ``P`` are prepended (section 3.3). Causal by construction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnkit import masks
from attnkit.ops.dense.call import attention
from attnkit.ops.memory.titans import titans_memory, titans_retrieve
from attnkit.reference.naive_sequence import naive_titans_module
from attnkit.registry import Family, Paper, check_input, choice_option, divisible, float_option, int_option, register

VARIANTS = ("lmm", "mac", "mag", "mal")


def _flops(cfg: dict) -> float:
    b, n, c, h = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_heads"]
    d = c // h
    e = d * cfg["memory_expansion"] if cfg["memory_depth"] == 2 else d
    bs = cfg["chunk_size"]
    per_token_mem = 2 * h * (d * e + (e * d if cfg["memory_depth"] == 2 else 0)) * 3  # fwd at k, grad, read at q
    intra = 2 * h * bs * (d + e) * 2  # (b, b) score-like products per layer, per token
    proj = 2 * n * c * 3 * c + 2 * n * c * c
    attn = 0.0
    if cfg["variant"] != "lmm":
        w = cfg["segment_size"] * 2 if cfg["variant"] == "mac" else cfg["window"]
        attn = 2 * n * c * 3 * c + 4 * n * min(n, w + cfg["num_persistent"]) * c
    return b * (n * (per_token_mem + intra) + proj + attn)


_DEFAULT = {"dim": 64, "num_heads": 4, "variant": "mag", "memory_depth": 2, "memory_expansion": 2, "chunk_size": 16,
            "segment_size": 64, "window": 32, "num_persistent": 4, "inner_lr": 0.05, "activation": "silu"}
_TINY = {"dim": 8, "num_heads": 2, "chunk_size": 3, "segment_size": 4, "window": 3, "num_persistent": 2}


def _options(c: dict) -> dict:
    return {k: c[k] for k in _DEFAULT}


@register(
    name="titans_memory", family=Family.LINEAR,
    paper=Paper("Titans: Learning to Memorize at Test Time", "2501.00663", 2025),
    patterns=("causal-self",), complexity="O(N cost(M) + N b d) memory; O(N w C) attention", flops=_flops,
    options=_options, reference=naive_titans_module, functional=(titans_memory, titans_retrieve, attention),
    default_config=_DEFAULT, tiny_config=_TINY, default_input={"batch": 1, "seq_len": 128},
    tiny_input={"batch": 1, "seq_len": 9},
    notes="Gates [recon]: alpha = sigmoid(x W_a), eta = sigmoid(x W_e), theta = inner_lr * sigmoid(x W_t), per "
          "token and head (the paper leaves the parametrisation open). q, k = l2norm(silu(.)), v linear; the short "
          "depthwise convolution of q, k, v is left out. Memory depth 1 (matrix) or 2 (act(x W1) W2, no residual). "
          "Gradients inside a chunk of chunk_size tokens are taken at the chunk's first state (section 3.2), "
          "chunk_size=1 is the exact online rule. MAG: o = rms(y) g_y * sigmoid(rms(m) g_m) with y the sliding-"
          "window attention (persistent tokens always visible). MAL: sliding-window attention over the memory's "
          "output. MAC: per segment, h = M_{i-1}(q) is a causal prefix (token t sees h_j for j <= t, so "
          "the layer stays causal), the attention output y is written into memory and o = y * sigmoid(M_t(q(y))) "
          "with the per-token memory M_t (the paper reads the segment's final memory, which would leak the "
          "segment's future). The half-precision inner loop runs in float32. Default inner_lr 0.05 (was 0.5): "
          "the chunked form sums a chunk's b surprise gradients taken at the chunk's first state, so with "
          "l2-normalised keys one chunk is a gradient step of size up to 2 b theta on the memory's error "
          "(factor 1 - 2 b theta along a repeated key); the bounded sigmoid gates alone do not keep it stable, "
          "and inner_lr 0.5 at chunk 16 diverged (NaN loss in the quality suite from the first step). "
          "inner_lr <= 1 / chunk_size keeps the linear memory's chunk update a contraction.",
)
class TitansMemory(nn.Module):
    """Titans layer: neural long-term memory (+ attention for ``mac`` / ``mag`` / ``mal``).

    Args:
        dim: ``C``; num_heads: ``H`` (memory and attention heads, ``D = C / H``);
        variant: ``"lmm"`` (memory only), ``"mac"``, ``"mag"`` or ``"mal"``;
        memory_depth: 1 (matrix memory) or 2 (MLP memory with hidden ``memory_expansion * D``);
        chunk_size: tokens per chunk of the parallel form; segment_size: MAC's segment length;
        window: sliding-window span of MAG / MAL (keys ``t - window .. t``); num_persistent: ``N_p``
        persistent tokens; inner_lr: the largest inner learning rate (0 keeps the memory at ``M_0``; keep
        ``inner_lr * chunk_size <= 1``: a chunk sums its tokens' gradients taken at one state, and with unit keys
        a larger step overshoots and the memory diverges);
        activation: the MLP memory's activation.

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = TitansMemory(64, 4, variant="mag")(torch.randn(2, 256, 64))
    """

    def __init__(self, dim: int, num_heads: int, *, variant: str = "mag", memory_depth: int = 2,
                 memory_expansion: int = 2, chunk_size: int = 16, segment_size: int = 64, window: int = 32,
                 num_persistent: int = 4, inner_lr: float = 0.05, activation: str = "silu"):
        super().__init__()
        d = divisible(self, dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.variant = choice_option(self, "variant", variant, VARIANTS)
        depth = int_option(self, "memory_depth", memory_depth, 1)
        self.memory_depth = choice_option(self, "memory_depth", depth, (1, 2))
        self.memory_expansion = int_option(self, "memory_expansion", memory_expansion, 1)
        self.chunk_size = int_option(self, "chunk_size", chunk_size, 1)
        self.segment_size = int_option(self, "segment_size", segment_size, 1)
        self.window = int_option(self, "window", window, 0)
        self.num_persistent = int_option(self, "num_persistent", num_persistent, 0)
        self.inner_lr = float_option(self, "inner_lr", inner_lr, minimum=0.0)
        self.activation = choice_option(self, "activation", activation, ("silu", "gelu", "relu"))
        self.mem_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.gates = nn.Linear(dim, 3 * num_heads)
        if memory_depth == 1:
            self.memory = nn.ParameterList([nn.Parameter(torch.randn(num_heads, d, d) / math.sqrt(d))])
        else:
            e = d * memory_expansion
            self.memory = nn.ParameterList([nn.Parameter(torch.randn(num_heads, d, e) / math.sqrt(d)),
                                            nn.Parameter(torch.randn(num_heads, e, d) / math.sqrt(e))])
        self.persistent = nn.Parameter(0.02 * torch.randn(num_persistent, dim))
        if variant != "lmm":
            self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        if variant == "mag":
            self.gain_y = nn.Parameter(torch.ones(dim))
            self.gain_m = nn.Parameter(torch.ones(dim))
        self.proj = nn.Linear(dim, dim, bias=False)

    # -------------------------------------------------------------------------------------- pieces

    def _mem_inputs(self, x: torch.Tensor):
        b, n, c = x.shape
        # the memory path runs in float32 for half inputs: its rms-normalised read amplifies bf16 rounding
        wd = torch.promote_types(x.dtype, torch.float32)
        x = x.to(wd)
        qkv = F.linear(x, self.mem_qkv.weight.to(wd))
        q, k, v = qkv.view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)  # (B, N, H, D)
        q, k = F.normalize(F.silu(q), dim=-1), F.normalize(F.silu(k), dim=-1)
        gates = F.linear(x, self.gates.weight.to(wd), self.gates.bias.to(wd))
        a, e, t = torch.sigmoid(gates).view(b, n, 3, self.num_heads).unbind(2)  # (B, N, H) each
        return q, k, v, a, e, self.inner_lr * t

    def _memory(self, x: torch.Tensor, state=None):
        q, k, v, a, e, t = self._mem_inputs(x)
        ws, ms = (tuple(w.to(q.dtype) for w in self.memory), None) if state is None else state
        y, state = titans_memory(q, k, v, a, e, t, ws, momentum=ms, chunk_size=self.chunk_size,
                                 activation=self.activation, return_state=True)
        return y.reshape(x.shape).to(x.dtype), state  # (B, N, C)

    def _attend(self, x: torch.Tensor, mask) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.attn_qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)  # (B, N, H, D)
        return attention(q, k, v, mask).reshape(b, n, c)

    def _swa_mask(self):
        m = masks.causal() & masks.sliding_window(self.window, 0)
        if self.num_persistent:
            m = masks.causal() & (masks.sliding_window(self.window, 0) | masks.global_tokens(self.num_persistent))
        return m

    def _mac(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        p = self.num_persistent
        state, outs = None, []
        for s0 in range(0, n, self.segment_size):
            seg = x[:, s0:s0 + self.segment_size]  # (B, L, C)
            L = seg.shape[1]
            q = self._mem_inputs(seg)[0]
            ws = tuple(self.memory) if state is None else state[0]
            h = titans_retrieve(q, ws, activation=self.activation).reshape(b, L, c).to(x.dtype)  # (B, L, C)
            ctx = torch.cat([self.persistent.expand(b, p, c), h, seg], 1)  # (B, P + 2L, C)
            y = self._attend(ctx, _mac_mask(p, L, x.device))[:, p + L:]  # (B, L, C)
            m, state = self._memory(y, state)
            outs.append(y * torch.sigmoid(m))
        return torch.cat(outs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim,
                    meta="the memory's inner loop takes gradients of the values")
        b, _, c = x.shape
        if self.variant == "mac":
            return self.proj(self._mac(x))
        p = self.num_persistent
        xt = torch.cat([self.persistent.expand(b, p, c), x], 1)  # (B, P + N, C)
        if self.variant == "lmm":
            o = self._memory(xt)[0]
        elif self.variant == "mal":
            o = self._attend(self._memory(xt)[0], self._swa_mask())
        else:  # mag
            y = F.rms_norm(self._attend(xt, self._swa_mask()), (c,), self.gain_y, eps=1e-6)
            m = F.rms_norm(self._memory(xt)[0], (c,), self.gain_m, eps=1e-6)
            o = y * torch.sigmoid(m)
        return self.proj(o[:, p:])

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, variant={self.variant}, depth={self.memory_depth}, chunk={self.chunk_size}, "
                f"persistent={self.num_persistent}, inner_lr={self.inner_lr}")


def _mac_mask(p: int, L: int, device) -> torch.Tensor:
    """MAC's mask over ``[P; h; S]`` ``(P + 2L, P + 2L)``: segment row t sees P, h_j and S_j for j <= t;
    the P and h rows (discarded) attend causally so no row is empty."""
    n = p + 2 * L
    i = torch.arange(n, device=device).view(-1, 1)
    j = torch.arange(n, device=device).view(1, -1)
    t = i - p - L  # segment position of row i
    seg_row = t >= 0
    rel = torch.where(j >= p + L, j - p - L, j - p)  # position of key j inside h or S
    ok = (j < p) | ((j >= p) & (rel <= t))
    return torch.where(seg_row, ok, j <= i)
