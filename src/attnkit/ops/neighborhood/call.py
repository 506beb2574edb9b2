"""``ak.neighborhood_attention``: 1-D/2-D/3-D neighborhood attention with NATTEN semantics.

Papers: "Neighborhood Attention Transformer" (arXiv 2204.07143), "Dilated Neighborhood
Attention Transformer" (arXiv 2209.15001), "Faster Neighborhood Attention" (arXiv 2403.04690),
"Generalized Neighborhood Attention" (arXiv 2504.16922). Exact index rules: NATTEN's, as stated in
``docs/design.md`` §3 (arXiv 2204.07143 §3, 2209.15001 §3).

Backends: ``tiled`` (CPU, forward and backward; default: the compiled tile kernel over query/key boxes in
tile order, or, for float64, ``ATTNKIT_NATIVE=0`` and failed builds, tiles x halos on torch's fused op),
``window`` (each query gathers its own window: plain tensor ops, chosen under ``torch.compile`` and for k/v
holding NaN or infinity), ``reference`` (materialised mask, the oracle), ``flex`` (torch.compile(flex_attention)
with an NA BlockMask, forward only, opt-in) and ``natten`` (when installed, opt-in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnkit._validate import assert_finite, check_qkv, resolve_scale
from attnkit.kernels.flash import native_reason, tile_sizes
from attnkit.kernels.fused import fused_check
from attnkit.masks.neighborhood import NeighborhoodMask, check_na_params
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.neighborhood.flex import flex_supports, run_flex
from attnkit.ops.neighborhood.kernel import KernelPlan, kernel_plan, neighborhood_kernel
from attnkit.ops.neighborhood.natten import natten_detail, natten_supports, run_natten
from attnkit.ops.neighborhood.tiled import neighborhood_tiled
from attnkit.ops.neighborhood.tiles import choose_tile, make_plan
from attnkit.ops.neighborhood.window import neighborhood_window
from attnkit.reference.naive_neighborhood import naive_neighborhood_attention

_LAYOUTS = {1: "(B, X, H, D)", 2: "(B, X, Y, H, D)", 3: "(B, X, Y, Z, H, D)"}
_REFERENCE_MAX_N = 4096  # the oracle materialises N x N scores; keep automatic use small


@dataclass(frozen=True)
class NACall:
    """A validated neighborhood-attention call (what backends receive)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    is_causal: tuple[bool, ...]
    scale: float
    return_lse: bool

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.q.shape[1:-2])

    @property
    def n(self) -> int:
        return math.prod(self.spatial)

    @property
    def mask(self) -> NeighborhoodMask:
        return NeighborhoodMask(self.spatial, self.kernel_size, self.dilation, self.stride, self.is_causal)

    @property
    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))

    def describe(self) -> str:
        B, H, D = self.q.shape[0], self.q.shape[-2], self.q.shape[-1]
        return (f"B={B} spatial={self.spatial} H={H} Hkv={self.k.shape[-2]} D={D} Dv={self.v.shape[-1]} "
                f"{str(self.q.dtype).replace('torch.', '')} kernel={self.kernel_size} dilation={self.dilation} "
                f"stride={self.stride} causal={self.is_causal}")


def make_call(q, k, v, kernel_size, *, dilation=1, stride=1, is_causal=False, scale=None,
              return_lse=False) -> NACall:
    """Validate the arguments of :func:`neighborhood_attention` and build its call."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() not in (4, 5, 6):
        raise ValueError(f"q must be heads-last with 1 to 3 spatial dims: {', '.join(_LAYOUTS.values())}; "
                         f"got shape {tuple(q.shape)}")
    rank = q.dim() - 3
    check_qkv(q, k, v, spatial_rank=rank, same_extent=True)
    try:
        ks, ds, ss, cs = check_na_params(tuple(q.shape[1:-2]), kernel_size, dilation, stride, is_causal)
    except ValueError as e:  # the usual cause is a heads-first tensor: say which layout was assumed
        raise ValueError(f"{e} (q read as heads-last {_LAYOUTS[rank]} = {tuple(q.shape)})") from None
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    assert_finite("neighborhood_attention", q=q, k=k, v=v)  # only under the debug switch
    return NACall(q, k, v, ks, ds, ss, cs, resolve_scale(scale, q.shape[-1]), return_lse)


# ----- backends -----

def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, t.shape[-2], t.shape[-1])  # (B, N, H, D)


def _finite(*ts: torch.Tensor) -> bool:
    # one aminmax pass each (NaN propagates through min/max, infinities show at the ends); the
    # tiled backend is CPU-only, where this sync costs nothing but the pass (~1% of a 7x7 NA)
    for t in ts:
        lo, hi = torch.aminmax(t.detach())
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return False
    return True


def _run_tiled(call: NACall):
    if not _finite(call.k, call.v):
        # a tile's halo holds keys outside some of its queries' windows: masked scores are -inf and
        # masked probabilities 0, but NaN + -inf and 0 * NaN are NaN, so one NaN key or value would
        # reach the whole tile. Per-query windows never touch a key outside the window.
        return neighborhood_window(call)
    if native_reason(call.q) is None:
        out, lse = neighborhood_kernel(_flat(call.q), _flat(call.k), _flat(call.v), _kernel_plan(call), call.scale)
    else:
        tile = choose_tile(call.spatial, call.kernel_size, call.dilation, call.stride, call.is_causal)
        plan = make_plan(call.spatial, call.kernel_size, call.dilation, call.stride, call.is_causal, tile)
        out, lse = neighborhood_tiled(_flat(call.q), _flat(call.k), _flat(call.v), plan, call.scale)
    B, H = call.q.shape[0], call.q.shape[-2]
    out = out.view(B, *call.spatial, H, call.v.shape[-1])  # (B, *S, H, Dv)
    if call.return_lse:
        return out, lse.view(B, *call.spatial, H)  # (B, *S, H), float32 (float64 for float64 inputs)
    return out


def _kernel_plan(call: NACall) -> KernelPlan:
    groups = call.q.shape[-2] // call.k.shape[-2]
    return kernel_plan(call.spatial, call.kernel_size, call.dilation, call.stride, call.is_causal,
                       tile_sizes(64, 64, groups)[0])


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The lse contract: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _run_reference(call: NACall):
    return naive_neighborhood_attention(call.q, call.k, call.v, call.kernel_size, call.dilation, call.stride,
                                        call.is_causal, call.scale, call.return_lse)


def _reference_suits(call: NACall) -> tuple[bool, str]:
    if call.n > _REFERENCE_MAX_N:
        return False, f"materialises N x N = {call.n} x {call.n} scores"
    return True, ""


def _run_window(call: NACall):
    return neighborhood_window(call, chunked=not torch.compiler.is_compiling())


def _window_suits(call: NACall) -> tuple[bool, str]:
    if torch.compiler.is_compiling():
        return True, "inside torch.compile: plain tensor ops, no tile plan"
    if call.q.device.type != "cpu":
        return True, f"{call.q.device.type} tensors: tiled is CPU-only"
    return False, "gathers prod(kernel_size) keys per query; tiled is faster outside torch.compile"


def _tiled_suits(call: NACall) -> tuple[bool, str]:
    if torch.compiler.is_compiling():
        return False, "its tile plan is built with data-dependent Python (graph breaks under torch.compile)"
    return True, ""


def _tiled_supports(call: NACall) -> tuple[bool, str]:
    # the tile plan (gather indices, tile masks) is built on the CPU
    if call.q.device.type != "cpu":
        return False, f"needs CPU tensors, got {call.q.device.type}"
    return True, ""


def _tiled_detail(call: NACall) -> str:
    why_not = native_reason(call.q, build=False)
    if why_not is None:
        plan = _kernel_plan(call)
        grad = "the kernel's backward from the saved lse" if call.requires_grad else "no input needs a gradient"
        return (f"compiled tile kernel: query boxes {plan.tq} x key boxes {plan.tk} in tile order, "
                f"{plan.tl.cols.numel()} tile pairs ({grad})")
    ok, why = fused_check(call.q, call.v)
    kernel = "fused CPU flash op per chunk" if ok else f"matmul softmax per chunk ({why})"
    kernel = f"{kernel}; tile kernel not used: {why_not}"
    if call.requires_grad:
        return (f"training ({kernel}; halos kept for the chunked backward, which falls back to matmul "
                "when the lse gets a gradient): an input needs a gradient")
    return f"inference ({kernel}): no input needs a gradient"


def _window_detail(call: NACall) -> str:
    return f"gather {math.prod(call.kernel_size)} keys per query, softmax over the window; autograd backward"


def _forward_only_detail(call: NACall) -> str:
    return "forward only: no input needs a gradient"


DISPATCHER = Dispatcher("neighborhood_attention", [
    Backend("tiled", _run_tiled, _tiled_supports, _tiled_suits, detail=_tiled_detail,
            note="compiled tile kernel over spatial query/key boxes (fallback: query tiles x key halos, fused CPU "
                 "attention per chunk, hand-written chunked backward); k or v holding NaN/inf runs the window path"),
    Backend("window", _run_window, suits=_window_suits, detail=_window_detail,
            note="per-query gathered windows, plain tensor ops (chosen under torch.compile)"),
    Backend("reference", _run_reference, suits=_reference_suits, note="materialised mask; the oracle"),
    Backend("flex", run_flex, flex_supports, auto=False, detail=_forward_only_detail,
            note="torch.compile(flex_attention) + NA BlockMask; forward only, compiles per shape"),
    Backend("natten", run_natten, natten_supports, auto=False, detail=natten_detail,
            note="the NATTEN library (peer)"),
])

register_op("neighborhood_attention", make_call, DISPATCHER)


def neighborhood_attention(q, k, v, kernel_size, *, dilation=1, stride=1, is_causal=False, scale=None,
                           backend=None, return_lse=False):
    """Neighborhood attention (NA / DiNA / causal NA / GNA) over 1-D, 2-D or 3-D token grids.

    Each query attends to a window of ``kernel_size`` keys per spatial dim around itself
    (NATTEN semantics, ``docs/design.md`` §3): non-causal windows are shifted, not clipped, at
    the borders; causal windows end at the query; ``dilation`` splits a dim into interleaved
    groups; ``stride`` lets groups of queries share one window (``stride == kernel_size``
    gives blocked attention). Dims combine as a product.

    Args:
        q: ``(B, X, H, D)``, ``(B, X, Y, H, D)`` or ``(B, X, Y, Z, H, D)`` (heads-last).
        k: ``(B, *S, Hkv, D)`` with the same spatial extent ``S``; ``H % Hkv == 0`` (GQA).
        v: ``(B, *S, Hkv, Dv)``.
        kernel_size: int or one int per spatial dim; ``dilation * kernel_size <= extent``.
        dilation: int or per-dim tuple, default 1.
        stride: int or per-dim tuple, ``1 <= stride <= kernel_size``, default 1.
        is_causal: bool or per-dim tuple, default False.
        scale: logit scale, default ``D ** -0.5``.
        backend: None (automatic: ``"tiled"``, or ``"window"`` inside ``torch.compile``), ``"tiled"``,
            ``"window"``, ``"reference"``, ``"flex"`` or ``"natten"``.
        return_lse: also return the natural-log sum-exp of each query's scaled logits.

    Returns:
        ``out (B, *S, H, Dv)`` in q's dtype, and ``lse (B, *S, H)`` when ``return_lse`` (float32,
        float64 for float64 inputs).

    Non-finite inputs: NaN or infinity propagates to exactly the queries whose window holds it (a NaN
    in ``q`` only to its own row) and no further. ``ak.check_finite(True)`` or
    ``ATTNKIT_CHECK_FINITE=1`` raises ``ValueError`` instead, naming the argument.

    Example:
        >>> q = k = v = torch.randn(1, 32, 32, 4, 16)
        >>> out = ak.neighborhood_attention(q, k, v, kernel_size=7, dilation=(1, 2))
    """
    call = make_call(q, k, v, kernel_size, dilation=dilation, stride=stride, is_causal=is_causal, scale=scale,
                     return_lse=return_lse)
    return DISPATCHER.run(call, backend)
