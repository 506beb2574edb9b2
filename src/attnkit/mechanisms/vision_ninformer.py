"""NiNformer's token-mixing-generated gating unit as a channels-last token mixer.

"NiNformer: A Network in Network Transformer with Token Mixing Generated Gating Function", arXiv 2403.02411
(2024), §3. The token MLP is :func:`attnkit.ops.vision.ninformer.token_mixing_mlp`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnkit.ops.vision.common import channels_last_hint
from attnkit.ops.vision.ninformer import token_mixing_mlp
from attnkit.reference.naive_vision_b import naive_ninformer_module
from attnkit.registry import Family, InputKind, Paper, check_input, int_option, register


def _hidden(cfg: dict, key: str) -> int:
    h = cfg.get("hidden_dim") or 2 * cfg["dim"]
    return (cfg.get("token_hidden_dim") or h) if key == "token" else h


def _flops(cfg: dict) -> float:
    b, c = cfg.get("batch", 1), cfg["dim"]
    n = math.prod(cfg["input_size"])
    return float(b * (2 * n * c * c + 4 * n * c * _hidden(cfg, "token") + 4 * n * c * _hidden(cfg, "channel")))


def _options(cfg: dict) -> dict:
    # the token MLP is sized by the input: the module is built for the config's resolution
    opts = {"dim": cfg["dim"], "num_tokens": math.prod(cfg["input_size"])}
    opts.update({k: cfg[k] for k in ("hidden_dim", "token_hidden_dim") if cfg.get(k) is not None})
    return opts


@register(
    name="ninformer_gating", family=Family.VISION,
    paper=Paper("NiNformer: A Network in Network Transformer with Token Mixing Generated Gating Function",
                "2403.02411", 2024),
    patterns=("noncausal-self",), complexity="O(N C (C + d))", flops=_flops, options=_options,
    reference=naive_ninformer_module, functional=token_mixing_mlp,
    default_config={"dim": 96, "num_tokens": 56 * 56}, tiny_config={"dim": 8, "num_tokens": 12},
    default_input={"batch": 1, "input_size": (56, 56)}, tiny_input={"batch": 1, "input_size": (3, 4)},
    input_kind=InputKind.IMAGE, fixed_size=True,
    notes="The gating unit that replaces attention: Linear(C, C)(u) * MixerBlock(u), MixerBlock(v) = v + TokMLP(LN(v)) "
          "then v + ChMLP(LN(v)), TokMLP Linear(N, d) -> GELU -> Linear(d, N) over the N = Y X tokens (op "
          "token_mixing_mlp), ChMLP Linear(C, d) -> GELU -> Linear(d, C), as the authors' ninformer.py "
          "(Abdullah-88/NiNformer). The outer NiN block (x + gate(LN(x)), x + FFN(LN(x)), the reference reusing one "
          "LayerNorm for both) belongs to the model around it. Hidden sizes: one d_ffn for both MLPs in the paper "
          "(512 for C = 256, so default d = 2C here; token_hidden_dim sets the token MLP's apart); dropout omitted. "
          "Tied to one resolution: num_tokens is fixed at construction (the registry derives it from input_size) and "
          "another token count raises ValueError naming num_tokens. Not permutation-equivariant over tokens.",
)
class NiNformerGating(nn.Module):
    """NiNformer's gating unit on ``x (B, Y, X, C)`` -> ``(B, Y, X, C)`` with ``Y X = num_tokens``.

    Args:
        dim: ``C``.
        num_tokens: ``N = Y X``, fixed (the token MLP's weights are ``N``-sized).
        hidden_dim: the channel MLP's hidden width (default ``2 C``); token_hidden_dim: the token MLP's
            (default ``hidden_dim``, NiNformer uses one ``d_ffn`` for both).

    Example:
        >>> m = NiNformerGating(256, num_tokens=64, hidden_dim=512)
        >>> y = m(torch.randn(2, 8, 8, 256))
    """

    def __init__(self, dim: int, num_tokens: int, hidden_dim: int | None = None,
                 token_hidden_dim: int | None = None):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.num_tokens = int_option(self, "num_tokens", num_tokens, 1)
        hidden = 2 * dim if hidden_dim is None else int_option(self, "hidden_dim", hidden_dim, 1)
        token_hidden = hidden if token_hidden_dim is None else int_option(self, "token_hidden_dim",
                                                                          token_hidden_dim, 1)
        self.gate = nn.Linear(dim, dim)
        self.token_norm = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(num_tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden,
                                                                                                  num_tokens))
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last_hint(type(self).__name__, x, self.dim)
        check_input(self, x, "(B, Y, X, C)", channels=self.dim)
        B, Y, X, C = x.shape
        if Y * X != self.num_tokens:
            raise ValueError(f"{type(self).__name__}: the map (Y, X) = {(Y, X)} has {Y * X} tokens but the token MLP "
                             f"was built for num_tokens = {self.num_tokens} (NiNformer is tied to one resolution)")
        u = x.reshape(B, Y * X, C)                                                     # (B, N, C)
        fc1, fc2 = self.token_mlp[0], self.token_mlp[2]
        v = u + token_mixing_mlp(self.token_norm(u), fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        v = v + self.channel_mlp(self.channel_norm(v))
        return (self.gate(u) * v).reshape(B, Y, X, C)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_tokens={self.num_tokens}"
