"""IP-Adapter's decoupled cross-attention.

"IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models", arXiv 2308.06721, §3.2.

The query attends to the text keys and, separately, to the image-prompt keys; the two softmaxes are
never joined: ``out = Attn(q, k, v) + ip_scale * Attn(q, k_ip, v_ip)``. A single softmax over
``[k; k_ip]`` is a different model (the image branch would compete with the text for weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, resolve_scale
from attnkit.masks.base import Mask
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_cross import naive_ip_adapter_attention


@dataclass(frozen=True, eq=False)
class IPAdapterCall:
    """A validated ``ip_adapter_attention`` call."""

    q: torch.Tensor
    k: torch.Tensor | None
    v: torch.Tensor | None
    k_ip: torch.Tensor | None
    v_ip: torch.Tensor | None
    ip_scale: float
    mask: Mask | torch.Tensor | None
    scale: float

    def describe(self) -> str:
        ip = "no image tokens" if self.k_ip is None else f"{self.k_ip.shape[1]} image tokens x {self.ip_scale:g}"
        text = "no text tokens" if self.k is None else f"text k {tuple(self.k.shape)}"
        return f"q {tuple(self.q.shape)} {self.q.dtype}, {text}, {ip}, text mask={self.mask!r}"


def make_call(q, k, v, k_ip=None, v_ip=None, *, ip_scale=1.0, mask=None, scale=None) -> IPAdapterCall:
    for a, b, what in (("k", "v", (k, v)), ("k_ip", "v_ip", (k_ip, v_ip))):
        if (what[0] is None) != (what[1] is None):
            raise ValueError(f"ip_adapter_attention: {a} and {b} go together: give both or neither")
    if k is None and k_ip is None:
        raise ValueError("ip_adapter_attention: give text k, v or image k_ip, v_ip (or both)")
    if k is not None:
        check_qkv(q, k, v)
    elif mask is not None:
        raise ValueError("ip_adapter_attention: mask applies to the text branch, but there are no text keys")
    if k_ip is not None:
        check_qkv(q, k_ip, v_ip)
        if k is not None and (k_ip.shape[2] != k.shape[2] or v_ip.shape[-1] != v.shape[-1]):
            raise ValueError(f"ip_adapter_attention: image k/v {tuple(k_ip.shape)} / {tuple(v_ip.shape)} must have the "
                             f"text k/v heads and widths {tuple(k.shape[2:])} / {tuple(v.shape[2:])}")
    if isinstance(ip_scale, bool) or not isinstance(ip_scale, (int, float)):
        raise TypeError(f"ip_adapter_attention: ip_scale must be a number, got {type(ip_scale).__name__}")
    return IPAdapterCall(q, k, v, k_ip, v_ip, float(ip_scale), mask, resolve_scale(scale, q.shape[-1]))


def _two_calls(c: IPAdapterCall) -> torch.Tensor:
    out = None if c.k is None else attention(c.q, c.k, c.v, mask=c.mask, scale=c.scale)
    if c.k_ip is None or (c.ip_scale == 0.0 and out is not None):  # scale 0: the base model exactly
        return out
    img = c.ip_scale * attention(c.q, c.k_ip, c.v_ip, scale=c.scale)
    return img if out is None else out + img


def _reference(c: IPAdapterCall) -> torch.Tensor:
    if c.k is None:
        return naive_ip_adapter_attention(c.q, c.k_ip, c.v_ip, None, None, scale=c.scale).mul(c.ip_scale).to(c.q.dtype)
    allowed = None
    if c.mask is not None:
        allowed = c.mask if isinstance(c.mask, torch.Tensor) else c.mask.to_dense(c.q.shape[1], c.k.shape[1])
    return naive_ip_adapter_attention(c.q, c.k, c.v, c.k_ip, c.v_ip, c.ip_scale, allowed, c.scale).to(c.q.dtype)


DISPATCHER = Dispatcher("ip_adapter_attention", [
    Backend("two_calls", _two_calls, suits=lambda c: (True, "two ak.attention calls"),
            note="ak.attention on the text keys and on the image keys, summed",
            detail=lambda c: "image branch only (no text tokens)" if c.k is None else (
                "text branch only (no image tokens or ip_scale 0)" if c.k_ip is None or c.ip_scale == 0.0
                else "text + ip_scale * image")),
    Backend("reference", _reference, auto=False, note="naive_ip_adapter_attention: both softmaxes materialised"),
])
register_op("ip_adapter_attention", make_call, DISPATCHER)


def ip_adapter_attention(q, k, v, k_ip=None, v_ip=None, *, ip_scale: float = 1.0, mask=None,
                         scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Decoupled cross-attention: ``Attn(q, k, v; mask) + ip_scale * Attn(q, k_ip, v_ip)``.

    Args:
        q: ``(B, Nq, Hq, D)`` latent queries.
        k, v: ``(B, Nt, Hkv, D)`` / ``(B, Nt, Hkv, Dv)`` text keys and values, or None (image tokens only).
        k_ip, v_ip: ``(B, Ni, Hkv, D)`` / ``(B, Ni, Hkv, Dv)`` image-prompt keys and values, or None.
        ip_scale: the image branch's weight (0: the text-only model exactly).
        mask: a mask for the text branch only (e.g. ``ak.masks.cross.key_padding``), as ``ak.attention``.
        scale: default ``D ** -0.5`` for both branches.
        backend: None, ``"two_calls"`` or ``"reference"``.

    Returns:
        ``(B, Nq, Hq, Dv)``.

    Example:
        >>> out = ip_adapter_attention(q, k_text, v_text, k_img, v_img, ip_scale=0.6)
    """
    call = make_call(q, k, v, k_ip, v_ip, ip_scale=ip_scale, mask=mask, scale=scale)
    return DISPATCHER.run(call, backend)
