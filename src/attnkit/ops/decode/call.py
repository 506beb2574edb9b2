"""Decode-time attention over a KV cache: ``decode_attention``. Validate -> choose backend -> run.

Split-KV decoding after Lean Attention (arXiv 2405.10480) and flash-decoding; the mask is the one
decoding needs (queries at the end of the cache, a recent window, StreamingLLM sinks, arXiv
2309.17453). Every call can be explained with ``ak.explain("decode_attention", q, k, v, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import assert_finite, check_qkv, int_arg, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.decode import split_kv
from attnkit.ops.decode.window import DecodeWindow, decode_window
from attnkit.reference.naive_decode import naive_decode_attention


@dataclass(frozen=True, eq=False)
class DecodeCall:
    """A validated ``decode_attention`` call: ``q (B, Nq, Hq, D)`` against a cache ``k, v (B, Nk, Hkv, D|Dv)``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: DecodeWindow
    scale: float
    split: int | None
    return_lse: bool

    nq = property(lambda self: self.q.shape[1])
    nk = property(lambda self: self.k.shape[1])
    hq = property(lambda self: self.q.shape[2])
    hkv = property(lambda self: self.k.shape[2])

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))

    def describe(self) -> str:
        gqa = f" GQA {self.hq}:{self.hkv}" if self.hq != self.hkv else ""
        return (f"q {tuple(self.q.shape)} cache {tuple(self.k.shape)} {self.q.dtype}{gqa} mask={self.mask!r}"
                f"{' grad' if self.needs_grad else ''}")


def make_call(q, k, v, *, offset=None, window=None, sinks=0, scale=None, split=None,
              return_lse=False) -> DecodeCall:
    check_qkv(q, k, v)
    assert_finite("decode_attention", q=q, k=k, v=v)  # off unless attnkit.check_finite(True)
    nq, nk = q.shape[1], k.shape[1]
    if offset is None:
        offset = nk - nq
    offset = int_arg("offset", offset, -(1 << 62))
    if offset + nq > nk:
        raise ValueError(f"decode_attention: offset + Nq = {offset + nq} queries past the cache length Nk = {nk}; "
                         f"the cache must already hold the queries' own keys")
    if split is not None:
        split = int_arg("split", split, 1)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return DecodeCall(q, k, v, decode_window(offset, window, sinks), resolve_scale(scale, q.shape[-1]), split,
                      return_lse)


def _run_split(call: DecodeCall):
    out, lse = split_kv.split_kv_attention(call.q, call.k, call.v, call.mask, scale=call.scale, split=call.split)
    return (out, lse) if call.return_lse else out


def _split_supports(call: DecodeCall):
    if call.nq > split_kv.MAX_DECODE_QUERIES:
        return False, f"decode shapes only: Nq = {call.nq} > {split_kv.MAX_DECODE_QUERIES}"
    return True, ""


def _split_detail(call: DecodeCall) -> str:
    live = split_kv.live_keys(call.mask, call.nq, call.nk)
    return f"{split_kv.path(call.q, call.k, call.v, call.mask, call.split)}; {live} of {call.nk} keys attended"


def _sdpa_supports(call: DecodeCall):
    if call.return_lse:
        return False, "SDPA does not return the log-sum-exp"
    return True, ""


def _run_sdpa(call: DecodeCall):
    allowed = call.mask.to_dense(call.nq, call.nk, device=call.q.device)           # (Nq, Nk)
    empty = ~allowed.any(-1, keepdim=True)
    q, k, v = (t.transpose(1, 2) for t in (call.q, call.k, call.v))                 # (B, H, N, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty, scale=call.scale,
                                         enable_gqa=call.hq != call.hkv)
    return out.masked_fill(empty, 0.0).transpose(1, 2)                              # (B, Nq, Hq, Dv)


def _sdpa_suits(call: DecodeCall):
    if call.nq > split_kv.MAX_DECODE_QUERIES:
        return True, "more queries than a decode step: prefill-like"
    return False, "split-KV reads each K/V head once for its whole query group"


def _run_reference(call: DecodeCall):
    m = call.mask
    return naive_decode_attention(call.q, call.k, call.v, offset=m.offset, window=m.window, sinks=m.sinks,
                                  scale=call.scale, return_lse=call.return_lse)


def _reference_suits(call: DecodeCall):
    if call.nq * call.nk <= 64 * 64:
        return True, "tiny input"
    return False, "materialises every score; the oracle"


BACKENDS = [
    Backend("split_kv", _run_split, _split_supports, detail=_split_detail,
            note="Lean Attention / flash-decoding: splits merged by LSE"),
    Backend("sdpa", _run_sdpa, _sdpa_supports, _sdpa_suits, note="SDPA with a dense (Nq, Nk) mask"),
    Backend("reference", _run_reference, suits=_reference_suits, note="materialises scores"),
]
DISPATCHER = Dispatcher("decode_attention", BACKENDS)
register_op("decode_attention", make_call, DISPATCHER)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    offset: int | None = None,
    window: int | None = None,
    sinks: int = 0,
    scale: float | None = None,
    split: int | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of a decode step's queries over a KV cache.

    Args:
        q: ``(B, Nq, Hq, D)``, the new tokens' queries (``Nq`` = 1..16 for split-KV).
        k: ``(B, Nk, Hkv, D)`` cached keys, the new tokens' own keys included; ``Hq % Hkv == 0``.
        v: ``(B, Nk, Hkv, Dv)``.
        offset: position of query 0 in the cache (default ``Nk - Nq``: the queries are the last tokens);
            query ``i`` sees keys ``j <= offset + i``.
        window: if set, only the ``window`` most recent keys (the query's own included) ...
        sinks: ... plus the first ``sinks`` keys (StreamingLLM attention sinks).
        scale: default ``D ** -0.5``.
        split: keys per split of the torch-ops path of ``split_kv`` (default 8192; the kernel: a part per thread).
        return_lse: also return ``lse (B, Nq, Hq)`` (float32, float64 for float64 inputs).
        backend: None (automatic), ``"split_kv"``, ``"sdpa"`` or ``"reference"``.

    Returns:
        ``out (B, Nq, Hq, Dv)``, and ``lse`` with ``return_lse``.

    Example:
        >>> out = decode_attention(q, cache.keys(0), cache.values(0), window=4096, sinks=4)
    """
    call = make_call(q, k, v, offset=offset, window=window, sinks=sinks, scale=scale, split=split,
                     return_lse=return_lse)
    return DISPATCHER.run(call, backend)


def explain(q, k, v, **kwargs) -> str:
    """``ak.explain("decode_attention", ...)``: every backend, whether it can run this call, and the choice."""
    backend = kwargs.pop("backend", None)
    return DISPATCHER.explain(make_call(q, k, v, **kwargs), backend)
