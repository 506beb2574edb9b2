"""IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models (arXiv 2308.06721).

A cross-attention layer of a diffusion UNet with a second, decoupled attention over image-prompt
tokens: the query is shared, the image tokens get their own key/value projections (no bias), and
the two softmax outputs are summed with the image branch scaled (§3.2). The module is projections
around :func:`~attnkit.ops.cross.ip_adapter.ip_adapter_attention`; :meth:`IPAdapterAttention.from_diffusers`
copies a diffusers ``Attention`` running ``IPAdapterAttnProcessor2_0``.
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.cross.ip_adapter import ip_adapter_attention
from attnkit.reference.naive_cross import naive_ip_adapter_module
from attnkit.registry import Family, Paper, check_input, divisible, float_option, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, m = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg.get("context_len") or cfg["seq_len"]
    # q and out projections, text and image k/v projections (every context token once), both softmaxes
    return 2 * b * n * c * c * 2 + 2 * b * m * c * c * 2 + 4 * b * n * m * c


def _options(cfg: dict) -> dict:
    return {"dim": cfg["dim"], "num_heads": cfg["num_heads"], "num_image_tokens": cfg["num_image_tokens"],
            "ip_scale": cfg["ip_scale"]}


@register(
    name="ip_adapter", family=Family.CROSS,
    paper=Paper("IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models", "2308.06721",
                2023),
    patterns=("noncausal-cross",), complexity="O(Nq (Nt + Ni) d)", flops=_flops, options=_options,
    reference=naive_ip_adapter_module, functional=ip_adapter_attention,
    default_config={"dim": 64, "num_heads": 4, "num_image_tokens": 4, "ip_scale": 1.0},
    tiny_config={"dim": 8, "num_heads": 2, "num_image_tokens": 2, "ip_scale": 0.7},
    default_input={"batch": 2, "seq_len": 64}, tiny_input={"batch": 1, "seq_len": 6},
    notes="The context is diffusers' concatenated form [text tokens; image tokens] with the last num_image_tokens "
          "tokens the image prompt (explicit image_context= also accepted); without a context the input is its own "
          "context (split the same way). Two separate softmaxes, never one over [K; K']. One image adapter per "
          "layer (diffusers allows a list); ip_adapter_masks (regional prompts) are not modelled. The image "
          "tokens' producer (Linear + LayerNorm on a CLIP embedding, or the Plus resampler) is outside the layer.",
)
class IPAdapterAttention(nn.Module):
    """A cross-attention layer with IP-Adapter's decoupled image-prompt branch.

    Args:
        dim: ``C`` of the latent tokens; num_heads: ``H``; head_dim: default ``C // H``.
        context_dim: width of the text / image tokens (default ``C``).
        num_image_tokens: how many trailing context tokens are the image prompt (4; 16 for "plus").
        ip_scale: the image branch's weight ``lambda`` (0: the text-only layer exactly).
        qkv_bias: bias on the query / text key / text value projections (SD's UNet: none).

    Shapes:
        ``x (B, N, C)``, ``context (B, Nt + Ni, Cctx)`` (or ``image_context (B, Ni, Cctx)`` beside a
        text-only ``context``) -> ``(B, N, C)``.

    Example:
        >>> m = IPAdapterAttention(320, 8, context_dim=768, num_image_tokens=4, ip_scale=0.6)
        >>> y = m(latents, torch.cat([text_tokens, image_tokens], 1))
    """

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, context_dim: int | None = None,
                 num_image_tokens: int = 4, ip_scale: float = 1.0, qkv_bias: bool = False):
        super().__init__()
        int_option(self, "num_heads", num_heads, 1)
        head_dim = divisible(self, dim, num_heads) if head_dim is None else int_option(self, "head_dim", head_dim, 1)
        context_dim = dim if context_dim is None else int_option(self, "context_dim", context_dim, 1)
        self.dim, self.num_heads, self.head_dim, self.context_dim = dim, num_heads, head_dim, context_dim
        self.num_image_tokens = int_option(self, "num_image_tokens", num_image_tokens, 0)
        self.ip_scale = float_option(self, "ip_scale", ip_scale)
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        with torch.no_grad():  # the paper initialises the image projections from the text ones
            self.to_k_ip.weight.copy_(self.to_k.weight)
            self.to_v_ip.weight.copy_(self.to_v.weight)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, image_context: torch.Tensor | None = None,
                mask=None) -> torch.Tensor:
        """``mask``: a mask for the text branch (e.g. ``key_padding``), as ``ak.attention`` takes."""
        check_input(self, x, "(B, N, C)", channels=self.dim)
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        if context is None:
            if self.context_dim != self.dim:
                raise ValueError(f"{type(self).__name__}: context is required when context_dim ({self.context_dim}) "
                                 f"differs from dim ({self.dim})")
            context = x
        check_input(self, context, "(B, M, C)", channels=self.context_dim, name="context")
        if image_context is None:
            nt = context.shape[1] - self.num_image_tokens
            if nt < 0:
                raise ValueError(f"{type(self).__name__}: context has {context.shape[1]} tokens, fewer than "
                                 f"num_image_tokens={self.num_image_tokens}")
            text, img = context[:, :nt], context[:, nt:]
        else:
            text = context
            img = check_input(self, image_context, "(B, Ni, C)", channels=self.context_dim, name="image_context")
        q = self.to_q(x).reshape(b, n, h, d)                                          # (B, N, H, D)
        k = v = ki = vi = None
        if text.shape[1]:
            k = self.to_k(text).reshape(b, text.shape[1], h, d)                       # (B, Nt, H, D)
            v = self.to_v(text).reshape(b, text.shape[1], h, d)
        if img.shape[1]:
            ki = self.to_k_ip(img).reshape(b, img.shape[1], h, d)                     # (B, Ni, H, D)
            vi = self.to_v_ip(img).reshape(b, img.shape[1], h, d)
        o = ip_adapter_attention(q, k, v, ki, vi, ip_scale=self.ip_scale, mask=mask)  # (B, N, H, D)
        return self.to_out(o.reshape(b, n, h * d))

    @classmethod
    def from_diffusers(cls, attention_module) -> IPAdapterAttention:
        """The same layer from a diffusers ``Attention`` whose processor is ``IPAdapterAttnProcessor2_0``.

        Copies ``to_q``, ``to_k``, ``to_v``, ``to_out[0]``, the processor's ``to_k_ip[0]`` /
        ``to_v_ip[0]``, its ``num_tokens[0]`` and ``scale[0]``. Call the result with
        ``context = cat([text, image], 1)`` (diffusers' deprecated tensor form) or
        ``context=text, image_context=image`` (its tuple form). Refuses what the layer does not model:
        several image adapters, group / spatial / cross norms, a residual connection or an output rescale.
        """
        a = attention_module
        p = getattr(a, "processor", None)
        who = f"{cls.__name__}.from_diffusers"
        if type(p).__name__ != "IPAdapterAttnProcessor2_0":
            raise TypeError(f"{who}: attention_module.processor must be IPAdapterAttnProcessor2_0, got "
                            f"{type(p).__name__}")
        if len(p.num_tokens) != 1:
            raise ValueError(f"{who}: the processor holds {len(p.num_tokens)} image adapters; one is supported")
        if isinstance(p.scale[0], list):
            raise ValueError(f"{who}: per-image scales (a list) are not supported; got {p.scale[0]}")
        for attr in ("group_norm", "spatial_norm"):
            if getattr(a, attr, None) is not None:
                raise ValueError(f"{who}: attention_module.{attr} is set; the layer has none")
        if getattr(a, "norm_cross", None):
            raise ValueError(f"{who}: attention_module.norm_cross is set; the layer has none")
        if getattr(a, "residual_connection", False) or getattr(a, "rescale_output_factor", 1.0) != 1.0:
            raise ValueError(f"{who}: residual_connection / rescale_output_factor != 1 are not modelled")
        inner = a.to_q.out_features
        heads = a.heads
        m = cls(a.to_q.in_features, heads, head_dim=inner // heads, context_dim=a.to_k.in_features,
                num_image_tokens=int(p.num_tokens[0]), ip_scale=float(p.scale[0]), qkv_bias=a.to_q.bias is not None)
        m.to_out = nn.Linear(inner, a.to_out[0].out_features, bias=a.to_out[0].bias is not None)
        dev, dt = a.to_q.weight.device, a.to_q.weight.dtype
        m = m.to(dev, dt)
        with torch.no_grad():
            for mine, theirs in ((m.to_q, a.to_q), (m.to_k, a.to_k), (m.to_v, a.to_v), (m.to_out, a.to_out[0]),
                                 (m.to_k_ip, p.to_k_ip[0]), (m.to_v_ip, p.to_v_ip[0])):
                mine.weight.copy_(theirs.weight)
                if mine.bias is not None:
                    mine.bias.copy_(theirs.bias)
        return m

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, context_dim={self.context_dim}, "
                f"num_image_tokens={self.num_image_tokens}, ip_scale={self.ip_scale}")
