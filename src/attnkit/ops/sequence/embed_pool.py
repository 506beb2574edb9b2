"""Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models? (arXiv 2409.02727).

Multi-Layers Trainable Pooling: the per-layer sentence states of an LLM (the EOS-last token, or the mean over
tokens, of every hidden layer, embedding layer included) form a short stack ``(B, L, C)``; learned latent
queries read it with cross-attention, so the embedding weighs the layers by content. This file holds the
cross-attention of the latents over the stack (:func:`latent_attention_pool`) and the extraction of the stack
from a model's hidden states (:func:`layer_states`).

Backends of ``latent_attention_pool``: ``attention`` (``ak.attention`` with the latents broadcast over the
batch) and ``reference``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_sequence3 import naive_latent_pool


@dataclass(frozen=True, eq=False)
class LatentPoolCall:
    latents: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float

    def describe(self) -> str:
        return f"latents {tuple(self.latents.shape)} k {tuple(self.k.shape)} {self.k.dtype}"


def make_call(latents, k, v, *, scale=None) -> LatentPoolCall:
    fn = "latent_attention_pool"
    try:
        check_qkv(k, k, v)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: {e}") from None
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point() or latents.dim() != 3 \
            or latents.shape[0] == 0 or latents.shape[1:] != k.shape[2:]:
        raise ValueError(f"{fn}: latents must be a float (r, H, D) tensor with k's (H, D) = {tuple(k.shape[2:])}, "
                         f"got {getattr(latents, 'shape', type(latents).__name__)}")
    return LatentPoolCall(latents, k, v, resolve_scale(scale, latents.shape[-1]))


def _attention(c: LatentPoolCall) -> torch.Tensor:
    q = c.latents.unsqueeze(0).expand(c.k.shape[0], *c.latents.shape)  # (B, r, H, D), a view
    return attention(q, c.k, c.v, scale=c.scale)


def _reference(c: LatentPoolCall) -> torch.Tensor:
    return naive_latent_pool(c.latents, c.k, c.v, scale=c.scale)


DISPATCHER = Dispatcher("latent_attention_pool", [
    Backend("attention", _attention, note="ak.attention, latents broadcast over the batch"),
    Backend("reference", _reference, auto=False, note="naive_latent_pool"),
])
register_op("latent_attention_pool", make_call, DISPATCHER)


def latent_attention_pool(latents: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                          backend: str | None = None) -> torch.Tensor:
    """Learned latent queries attend a stack of per-layer states.

    Args:
        latents: ``(r, H, D)`` learned queries, shared by the batch.
        k: ``(B, L, H, D)``; v: ``(B, L, H, Dv)`` (one entry per layer).
        scale: default ``D ** -0.5``. backend: None, ``"attention"`` or ``"reference"``.

    Returns:
        ``(B, r, H, Dv)``.

    Example:
        >>> z = latent_attention_pool(torch.randn(1, 8, 64), k, v)   # k, v (B, 25, 8, 64)
    """
    return DISPATCHER.run(make_call(latents, k, v, scale=scale), backend)


def layer_states(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None, *,
                 mode: str = "last") -> torch.Tensor:
    """The per-layer sentence states that multi-layer pooling reads.

    Args:
        hidden_states: ``L`` tensors ``(B, N, C)`` (e.g. ``output_hidden_states=True`` of a transformers model:
            the embedding layer and every block).
        attention_mask: ``(B, N)`` (1 / True = real token), right padding, or None (no padding).
        mode: ``"last"`` (EOS-last: the last real token of each layer) or ``"mean"`` (mean over real tokens).

    Returns:
        ``(B, L, C)``.
    """
    if mode not in ("last", "mean"):
        raise ValueError(f"layer_states: mode must be 'last' or 'mean', got {mode!r}")
    if not isinstance(hidden_states, (list, tuple)) or not hidden_states:
        raise ValueError("layer_states: hidden_states must be a non-empty sequence of (B, N, C) tensors")
    h = torch.stack(list(hidden_states), 1)  # (B, L, N, C)
    B, _, N, _ = h.shape  # (B, L, N, C)
    m = (torch.ones(B, N, dtype=torch.bool, device=h.device) if attention_mask is None
         else attention_mask.to(device=h.device).bool())
    if m.shape != (B, N):
        raise ValueError(f"layer_states: attention_mask must be (B, N) = {(B, N)}, got {tuple(m.shape)}")
    if mode == "mean":
        w = m.to(h.dtype).view(B, 1, N, 1)
        return (h * w).sum(2) / w.sum(2).clamp_min(1)
    last = (m.long().sum(1) - 1).clamp_min(0)  # (B,) right padding: the last real token
    return h[torch.arange(B, device=h.device), :, last]  # (B, L, C)


__all__ = ["latent_attention_pool", "layer_states"]
