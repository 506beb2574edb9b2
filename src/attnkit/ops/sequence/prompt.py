"""Token Coordinated Prompt Attention is Needed for Visual Prompting (arXiv 2505.02406) — TCPA.

Visual prompt tuning (VPT-deep) appends learnable prompts to every layer's keys and values, and every token
sees every prompt. TCPA coordinates them: CLS prompts are seen by the [CLS] token only, image prompts by
image tokens only (role level), and each image token sees only the few image prompts that match it best
(token level). The coordination is a boolean key mask over the prompts, so the op is softmax attention over
``[tokens; prompts]`` with that mask; :func:`tcpa_prompt_mask` builds it.

Backends of ``prompt_attention``: ``attention`` (``ak.attention`` on the concatenated keys with a bool mask) and
``reference``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import check_qkv, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_sequence3 import naive_prompt_attention

COORDINATIONS = ("token", "role", "none")


@dataclass(frozen=True, eq=False)
class PromptCall:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pk: torch.Tensor
    pv: torch.Tensor
    prompt_mask: torch.Tensor | None
    scale: float

    def describe(self) -> str:
        return f"q {tuple(self.q.shape)} {self.q.dtype}, {self.pk.shape[0]} prompts"


def make_call(q, k, v, pk, pv, prompt_mask=None, *, scale=None) -> PromptCall:
    fn = "prompt_attention"
    try:
        hq, hkv = check_qkv(q, k, v, same_extent=True)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: {e}") from None
    if hq != hkv:
        raise ValueError(f"{fn}: needs as many K/V heads as query heads, got {hq} and {hkv}")
    for name, t, like in (("pk", pk, k), ("pv", pv, v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[1:] != like.shape[2:] or t.dtype != like.dtype:
            raise ValueError(f"{fn}: {name} must be a (P, H, D) tensor with H, D and dtype of "
                             f"{'k' if name == 'pk' else 'v'} {tuple(like.shape[2:])} {like.dtype}, "
                             f"got {getattr(t, 'shape', type(t).__name__)} {getattr(t, 'dtype', '')}")
    if pk.shape[0] != pv.shape[0]:
        raise ValueError(f"{fn}: pk and pv hold {pk.shape[0]} and {pv.shape[0]} prompts")
    if prompt_mask is not None:
        want = (q.shape[0], q.shape[1], pk.shape[0])
        if not isinstance(prompt_mask, torch.Tensor) or prompt_mask.dtype != torch.bool or prompt_mask.dim() != 3 \
                or any(s not in (1, w) for s, w in zip(prompt_mask.shape, want)):
            raise ValueError(f"{fn}: prompt_mask must be a bool tensor broadcastable to (B, N, P) = {want}, "
                             f"got {getattr(prompt_mask, 'shape', type(prompt_mask).__name__)}")
        prompt_mask = prompt_mask.expand(want)
    return PromptCall(q, k, v, pk, pv, prompt_mask, resolve_scale(scale, q.shape[-1]))


def _attention(c: PromptCall) -> torch.Tensor:
    B, N = c.q.shape[:2]
    P = c.pk.shape[0]
    if P == 0:
        return attention(c.q, c.k, c.v, scale=c.scale)
    k = torch.cat([c.k, c.pk.unsqueeze(0).expand(B, *c.pk.shape)], 1)  # (B, N + P, H, D)
    v = torch.cat([c.v, c.pv.unsqueeze(0).expand(B, *c.pv.shape)], 1)  # (B, N + P, H, Dv)
    if c.prompt_mask is None:
        return attention(c.q, k, v, scale=c.scale)
    tokens = torch.ones(B, N, N, dtype=torch.bool, device=c.q.device)
    mask = torch.cat([tokens, c.prompt_mask], -1).unsqueeze(1)  # (B, 1, N, N + P)
    return attention(c.q, k, v, mask, scale=c.scale)


def _reference(c: PromptCall) -> torch.Tensor:
    return naive_prompt_attention(c.q, c.k, c.v, c.pk, c.pv, c.prompt_mask, scale=c.scale)


DISPATCHER = Dispatcher("prompt_attention", [
    Backend("attention", _attention, note="ak.attention over [tokens; prompts], prompt visibility as a bool mask"),
    Backend("reference", _reference, auto=False, note="naive_prompt_attention"),
])
register_op("prompt_attention", make_call, DISPATCHER)


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                     prompt_mask: torch.Tensor | None = None, *, scale: float | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Attention of the tokens over themselves and a set of prompt keys/values, prompts visible per token.

    Args:
        q, k: ``(B, N, H, D)``; v: ``(B, N, H, Dv)`` (the tokens).
        pk: ``(P, H, D)``; pv: ``(P, H, Dv)``: the prompts' keys and values, shared by the batch.
        prompt_mask: bool broadcastable to ``(B, N, P)``, True = token may see prompt (see
            :func:`tcpa_prompt_mask`); None: every prompt visible (VPT-deep).
        scale: default ``D ** -0.5``. backend: None, ``"attention"`` or ``"reference"``.

    Returns:
        ``(B, N, H, Dv)``: the tokens' outputs (the prompts' own outputs are not computed: VPT-deep replaces the
        prompts at every layer).

    Example:
        >>> o = prompt_attention(q, k, v, pk, pv, tcpa_prompt_mask(x, image_prompts, num_cls_prompts=10))
    """
    return DISPATCHER.run(make_call(q, k, v, pk, pv, prompt_mask, scale=scale), backend)


def tcpa_prompt_mask(x: torch.Tensor, image_prompts: torch.Tensor, *, num_cls_prompts: int, top_k: int = 5,
                     num_cls_tokens: int = 1, coordination: str = "token") -> torch.Tensor:
    """TCPA's prompt visibility for ``Nc`` CLS prompts followed by ``Np`` image prompts.

    Args:
        x: ``(B, N, C)`` the layer's input tokens, the first ``num_cls_tokens`` of them [CLS].
        image_prompts: ``(Np, C)``; the matching keys (cosine similarity to each image token, computed in at least
            float32 so that a half-precision module picks the same prompts as its float32 twin).
        num_cls_prompts: ``Nc``. top_k: image prompts per image token (``"token"``; capped at ``Np``).
        coordination: ``"token"`` (role + per-token top-k), ``"role"`` ([CLS] -> CLS prompts, image tokens -> all
            image prompts) or ``"none"`` (every prompt to every token: VPT-deep).

    Returns:
        ``(B, N, Nc + Np)`` bool, True = visible. Computed without gradient (a selection).
    """
    if coordination not in COORDINATIONS:
        raise ValueError(f"tcpa_prompt_mask: coordination must be one of {COORDINATIONS}, got {coordination!r}")
    B, N, _ = x.shape
    Np = image_prompts.shape[0]
    Nc = num_cls_prompts
    if coordination == "none":
        return torch.ones(B, N, Nc + Np, dtype=torch.bool, device=x.device)
    is_cls = torch.arange(N, device=x.device) < num_cls_tokens  # (N,)
    cls_part = is_cls.view(1, N, 1).expand(B, N, Nc)
    if coordination == "role" or Np == 0:
        img = ~is_cls.view(1, N, 1).expand(B, N, Np)
        return torch.cat([cls_part, img], -1)
    with torch.no_grad():
        work = torch.promote_types(x.dtype, torch.float32)
        sim = F.normalize(x.to(work), dim=-1) @ F.normalize(image_prompts.to(work), dim=-1).T  # (B, N, Np)
        top = sim.topk(min(top_k, Np), dim=-1).indices
        img = torch.zeros(B, N, Np, dtype=torch.bool, device=x.device).scatter_(-1, top, True)
        img &= ~is_cls.view(1, N, 1)
    return torch.cat([cls_part, img], -1)


__all__ = ["COORDINATIONS", "prompt_attention", "tcpa_prompt_mask"]
