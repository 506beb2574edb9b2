"""A tiny language model around any registered causal sequence mechanism, for the small synthetic tasks.

Token embedding plus a learned absolute position embedding, ``layers`` pre-norm blocks (the mechanism as the
sequence mixer, then a GELU MLP, each with a residual), a final LayerNorm and an LM head. The mechanism is
built from its registry spec for ``causal-self`` at the model's width and sequence length
(:func:`mechanism_config`), so every registered mechanism is trained the same way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnkit.registry import info

READOUTS = ("lm", "compress")
# config keys that bound the sequence length a module accepts (e.g. RCMHA's relative range): raised to N
_LENGTH_BOUNDS = ("max_rel",)
_HEAD_KEYS = ("heads", "num_heads", "n_heads")
_KV_HEAD_KEYS = ("kv_heads", "num_kv_heads")


def mechanism_config(spec: Any, width: int, seq_len: int) -> dict[str, Any]:
    """The ``causal-self`` config of ``spec`` with model width ``width`` and ``seq_len`` tokens.

    Starts from the spec's registered defaults (heads and the mechanism's own options as registered), sets ``dim``
    and the sequence length (``seq_len`` or a 1-D ``input_size``), raises any length bound to ``seq_len``, and
    lowers a head count that does not divide ``width`` (key/value heads: the heads) to the nearest that does.

    Raises:
        ValueError: the spec is not a causal sequence mechanism, or its config has no way to set the width or
            the length (the first input's shape would not be ``(B, seq_len, width)``).
    """
    if str(spec.input_kind) != "sequence" or "causal-self" not in spec.patterns:
        raise ValueError(f"mechanism_config: {spec.name!r} is not a causal sequence mechanism (input kind "
                         f"{spec.input_kind}, patterns {spec.patterns})")
    cfg = spec.config(None)  # the registered defaults: module options and input sizes
    cfg["dim"] = width
    if "seq_len" in cfg:
        cfg["seq_len"] = seq_len
    if isinstance(cfg.get("input_size"), (tuple, list)) and len(cfg["input_size"]) == 1:
        cfg["input_size"] = (seq_len,)
    for key in _LENGTH_BOUNDS:
        if isinstance(cfg.get(key), int):
            cfg[key] = max(cfg[key], seq_len)
    # a head count registered for another width (3 heads, say) is lowered to the nearest that divides it, and
    # the key/value heads to one that divides the heads: sizing the model, the same rule for every mechanism
    for key, of in (*((k, width) for k in _HEAD_KEYS), *((k, None) for k in _KV_HEAD_KEYS)):
        v = cfg.get(key)
        total = of if of is not None else next((cfg[h] for h in _HEAD_KEYS if isinstance(cfg.get(h), int)), None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0 and total and total % v:
            cfg[key] = max(d for d in range(1, v + 1) if total % d == 0)
    cfg = spec.config(cfg, pattern="causal-self")
    shape = tuple(spec.input_shape(cfg))
    if shape[1:] != (seq_len, width):
        raise ValueError(f"mechanism_config: {spec.name!r}: its config gives inputs of shape {shape}, not "
                         f"(B, {seq_len}, {width}); the width or length cannot be set from its config keys")
    return cfg


def _first_tensor(out: Any) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first element of a tuple (aux outputs dropped)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


class _MLP(nn.Sequential):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class _Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, mixer: nn.Module, width: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(width), mixer
        self.norm2, self.mlp = nn.LayerNorm(width), _MLP(width, mlp_ratio * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _first_tensor(self.mixer(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Embedding, ``layers`` blocks of a registered causal mechanism + MLP, LM head.

    Args:
        mechanism: a registry name with the ``causal-self`` pattern and sequence inputs (``attnkit.info``).
        vocab_size: number of token ids.
        seq_len: ``N``, the (fixed) training length; the position embedding has ``N`` rows.
        width: model width ``C`` (the mechanism's ``dim``).
        layers: number of blocks.
        mlp_ratio: MLP hidden width over ``C``.
        readout: ``"lm"``: logits at every position from that position's hidden state; ``"compress"``
            (MAD's compression task): logits at every position ``j`` from the *last* position's hidden state
            plus a learned decoder embedding of ``j``, through an MLP -- the sequence must be gathered there.

    Shapes:
        ``forward(tokens)``: ``(B, N)`` int64 -> ``(B, N, V)``; with ``scored`` ``(B, N)`` bool -> ``(S, V)``
        for the ``S`` scored positions (row-major), which skips the head's work elsewhere.

    Example:
        >>> model = TinyLM("mha", vocab_size=64, seq_len=32, width=32)
        >>> model(torch.zeros(2, 32, dtype=torch.long)).shape
        torch.Size([2, 32, 64])
    """

    def __init__(self, mechanism: str, vocab_size: int, seq_len: int, width: int = 64, layers: int = 2,
                 mlp_ratio: int = 4, readout: str = "lm") -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"TinyLM: readout must be one of {READOUTS}, got {readout!r}")
        for name, v in (("vocab_size", vocab_size), ("seq_len", seq_len), ("width", width), ("layers", layers),
                        ("mlp_ratio", mlp_ratio)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TinyLM: {name} must be a positive int, got {v!r}")
        spec = info(mechanism)
        self.mechanism, self.readout, self.seq_len = spec.name, readout, seq_len
        self.mechanism_config = mechanism_config(spec, width, seq_len)
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(seq_len, width) * 0.02)
        self.blocks = nn.ModuleList(
            _Block(spec.module(**spec.options(self.mechanism_config)), width, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        if readout == "compress":
            self.decode_pos = nn.Parameter(torch.randn(seq_len, width) * 0.02)
            self.decode = _MLP(width, mlp_ratio * width)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(width))

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` token ids -> ``(B, N, C)`` final hidden states (after the last LayerNorm)."""
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"TinyLM: tokens must be (B, {self.seq_len}), got {tuple(tokens.shape)}")
        x = self.embed(tokens) + self.pos  # (B, N, C)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, scored: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden(tokens)  # (B, N, C)
        if self.readout == "compress":
            # every position is decoded from the last one: (B, 1, C) + (N, C) -> (B, N, C)
            z = h[:, -1:, :] + self.decode_pos
            h = z + self.decode(z)
        if scored is not None:
            h = h[scored]  # (S, C)
        return self.head(h)
