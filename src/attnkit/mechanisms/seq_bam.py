"""BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts (arXiv 2408.08274).

The soft mixture-of-attention layer of BAM (section 3): ``E`` full attention experts, all active, mixed per token by
a softmax router; optionally keys and values shared across experts. :meth:`BAMAttention.upcycle` builds one from
attnkit ``mha`` modules (one dense model copied into every expert, or one specialised dense model per expert).
The op is :func:`~attnkit.ops.sequence.bam.bam_attention`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from attnkit.ops.sequence.bam import bam_attention, bam_gates
from attnkit.reference.naive_sequence4 import naive_bam_module
from attnkit.registry import Family, Paper, check_input, info, int_option, register


def _flops(cfg: dict) -> float:
    b, n, c, e, h = cfg["batch"], cfg["seq_len"], cfg["dim"], cfg["num_experts"], cfg["num_heads"]
    hkv = cfg.get("num_kv_heads") or h
    d = c // h
    ekv = 1 if cfg["kv_shared"] else e
    proj = 2 * b * n * c * (e * h * d + 2 * ekv * hkv * d + e * h * d) + 2 * b * n * c * e
    return proj + 4 * b * e * h * n * n * d


_DEFAULT = {"dim": 64, "num_experts": 4, "num_heads": 4, "num_kv_heads": None, "kv_shared": False, "causal": False}


def _options(c: dict) -> dict:
    return {k: c[k] for k in _DEFAULT}


@register(
    name="bam_upcycle", family=Family.HEAD,
    paper=Paper("BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts", "2408.08274",
                2024),
    patterns=("noncausal-self", "causal-self"), complexity="O(E N^2 d)", flops=_flops, options=_options,
    reference=naive_bam_module, functional=(bam_attention, bam_gates), default_config=_DEFAULT,
    tiny_config={"dim": 8, "num_experts": 3, "num_heads": 2, "num_kv_heads": 1},
    default_input={"batch": 2, "seq_len": 64}, tiny_input={"batch": 1, "seq_len": 6},
    notes="Soft routing (every expert active, g = softmax(x W_r + b_r) per token), as the paper's attention "
          "experts; its top-k FFN experts and the parallel attention+FFN block are not part of this layer. "
          "kv_shared=True is the paper's KV-sharing variant (one Wk, Wv for all experts; the KV cache equals the "
          "dense model's). upcycle(dense, n_experts) copies an attnkit mha into every expert (output then equals "
          "the dense module's for any router); upcycle([mha_1, ..., mha_E]) takes one specialised model per expert "
          "and, with kv_shared, averages their Wk, Wv (the paper merges non-expert parameters by averaging). The "
          "router is initialised randomly (N(0, 1/C)); the paper's router init scale is not reproduced.",
)
class BAMAttention(nn.Module):
    """Soft mixture of attention experts.

    Args:
        dim: ``C``; num_experts: ``E``; num_heads: ``H`` per expert; num_kv_heads: ``Hkv`` per expert (GQA,
        default ``H``); head_dim: default ``C // H``; kv_shared: one key/value projection for all experts;
        bias: projection and router biases; causal: causal self-attention (default False).

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> dense = ak.get("mha", dim=64, num_heads=4)
        >>> moa = BAMAttention.upcycle(dense, 4)              # equals dense(x) until trained
        >>> y = moa(torch.randn(2, 32, 64))
    """

    def __init__(self, dim: int, num_experts: int = 4, num_heads: int = 4, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, kv_shared: bool = False, bias: bool = False, causal: bool = False):
        super().__init__()
        who = type(self).__name__
        self.dim = int_option(self, "dim", dim, 1)
        self.num_experts = int_option(self, "num_experts", num_experts, 1)
        self.num_heads = int_option(self, "num_heads", num_heads, 1)
        self.num_kv_heads = num_heads if num_kv_heads is None else int_option(self, "num_kv_heads", num_kv_heads, 1)
        if num_heads % self.num_kv_heads:
            raise ValueError(f"{who}: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if head_dim is None and dim % num_heads:
            raise ValueError(f"{who}: dim ({dim}) must be divisible by num_heads ({num_heads}) or head_dim given")
        self.head_dim = int_option(self, "head_dim", dim // num_heads if head_dim is None else head_dim, 1)
        self.kv_shared, self.causal = bool(kv_shared), bool(causal)
        E, HD, KD = num_experts, num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        ekv = 1 if kv_shared else E
        s = dim ** -0.5
        self.router_weight = nn.Parameter(torch.randn(dim, E) * s)
        self.wq = nn.Parameter(torch.randn(E, dim, HD) * s)
        self.wk = nn.Parameter(torch.randn(ekv, dim, KD) * s)
        self.wv = nn.Parameter(torch.randn(ekv, dim, KD) * s)
        self.wo = nn.Parameter(torch.randn(E, HD, dim) * HD ** -0.5)
        zeros = (lambda *shape: nn.Parameter(torch.zeros(shape))) if bias else (lambda *shape: None)
        self.router_bias, self.bq, self.bk, self.bv, self.bo = (zeros(E), zeros(E, HD), zeros(ekv, KD),
                                                                zeros(ekv, KD), zeros(E, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim)
        return bam_attention(x, self.router_weight, self.wq, self.wk, self.wv, self.wo, router_bias=self.router_bias,
                             bq=self.bq, bk=self.bk, bv=self.bv, bo=self.bo, num_heads=self.num_heads,
                             num_kv_heads=self.num_kv_heads, causal=self.causal)

    @classmethod
    def upcycle(cls, dense: nn.Module | Sequence[nn.Module], n_experts: int | None = None, *,
                kv_shared: bool = False) -> BAMAttention:
        """A BAM layer whose experts are copies of dense attnkit ``mha`` modules (arXiv 2408.08274, section 3).

        Args:
            dense: one :class:`~attnkit.mechanisms.mha.MultiHeadAttention` (copied into every expert) or a sequence
                of them, one per expert (the specialised dense models of BAM's branch phase); all with the same
                sizes, bias and causality, and no default mask.
            n_experts: ``E`` (required for one module; for a sequence it must be None or its length).
            kv_shared: one key/value projection for all experts: the mean of the dense models' ``Wk``, ``Wv``.

        Returns:
            A :class:`BAMAttention` on the dense modules' device and dtype. The router is random; with identical
            experts the output equals the dense module's whatever the router says.
        """
        mha_cls = info("mha").module  # through the registry: a mechanism never imports another one
        who = f"{cls.__name__}.upcycle"
        models = list(dense) if isinstance(dense, (list, tuple)) else [dense]
        if not models or not all(isinstance(m, mha_cls) for m in models):
            raise TypeError(f"{who}: dense must be an attnkit mha module (MultiHeadAttention) or a non-empty "
                            f"sequence of them, got {type(dense).__name__}")
        if len(models) == 1:
            if n_experts is None:
                raise ValueError(f"{who}: n_experts is required when upcycling one dense module")
            n = int_option(who, "n_experts", n_experts, 1)
            models = models * n
        elif n_experts is not None and n_experts != len(models):
            raise ValueError(f"{who}: n_experts ({n_experts}) must equal the number of dense modules "
                             f"({len(models)})")
        m0 = models[0]
        bias = m0.q_proj.bias is not None
        key = (m0.dim, m0.num_heads, m0.num_kv_heads, m0.head_dim, bias, bool(m0.causal))
        for m in models:
            if (m.dim, m.num_heads, m.num_kv_heads, m.head_dim, m.q_proj.bias is not None, bool(m.causal)) != key:
                raise ValueError(f"{who}: every dense module must have the same dim, heads, head_dim, bias and causal")
            if m.mask is not None:
                raise ValueError(f"{who}: dense modules with a default mask are not supported (got {m.mask!r})")
        p = next(m0.parameters())
        out = cls(m0.dim, len(models), m0.num_heads, num_kv_heads=m0.num_kv_heads, head_dim=m0.head_dim,
                  kv_shared=kv_shared, bias=bias, causal=bool(m0.causal)).to(device=p.device, dtype=p.dtype)
        KD = m0.num_kv_heads * m0.head_dim
        with torch.no_grad():
            wk = torch.stack([m.kv_proj.weight[:KD].T for m in models])  # (E, C, Hkv D): kv_proj rows are [k; v]
            wv = torch.stack([m.kv_proj.weight[KD:].T for m in models])
            out.wq.copy_(torch.stack([m.q_proj.weight.T for m in models]))
            out.wo.copy_(torch.stack([m.out_proj.weight.T for m in models]))
            out.wk.copy_(wk.mean(0, keepdim=True) if kv_shared else wk)
            out.wv.copy_(wv.mean(0, keepdim=True) if kv_shared else wv)
            if bias:
                bk = torch.stack([m.kv_proj.bias[:KD] for m in models])
                bv = torch.stack([m.kv_proj.bias[KD:] for m in models])
                out.bq.copy_(torch.stack([m.q_proj.bias for m in models]))
                out.bo.copy_(torch.stack([m.out_proj.bias for m in models]))
                out.bk.copy_(bk.mean(0, keepdim=True) if kv_shared else bk)
                out.bv.copy_(bv.mean(0, keepdim=True) if kv_shared else bv)
        return out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, experts={self.num_experts}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"kv_shared={self.kv_shared}, causal={self.causal}")
