"""Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers (arXiv 2303.13755).

A low-rank predictor gives every (query, key) pair a connectivity score ``M~ = C U`` (section 3.2: ``C``
the softmax basis coefficients of a reduced-channel, reduced-token attention, ``U`` a thresholded non-negative
basis); each query row keeps its ``top_k`` best keys and attention runs on the kept pairs only. The mask
carries no gradient (it is detached in the paper's code).

Two granularities:

* ``"token"`` (the paper): unstructured per-row top-k. The kept pairs are scattered, so nearly every
  64 x 64 kernel tile holds some; the ``tiles`` backend walks, per (batch, head), the tiles holding a kept
  pair with a per-tile bitmask: exact, but at keep rate 0.25 it computes about every tile.
* ``"block"`` (an option, not the paper): the scores are averaged over ``block x block`` tiles (by the
  bilinearity of ``C U`` this is ``mean_rows(C) @ mean_cols(U)``, never forming ``M~``) and each query
  block keeps its ``ceil(top_k / block)`` best key blocks: the block-gather engine on the tile kernel
  visits exactly the kept blocks, so the work is the kept pairs.

Backends (``ak.explain("sparsifiner_attention", q, k, v, coef=.., basis=.., top_k=..)``):

* ``tiles`` -- token granularity on the compiled tile kernel (per-(batch, head) tile lists with bitmasks);
* ``gather`` -- block granularity on the block-gather engine (the tile kernel where it takes the blocks);
* ``masked`` -- either granularity: the connectivity materialised ``(B, H, N, Nk)``, run by ``ak.attention``
  (float64, other devices);
* ``reference`` -- the naive twin of ``attnkit.reference.naive_sparse2`` (never automatic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, check_tensor, int_arg, resolve_scale
from attnkit.kernels.flash import TileList, flash_attention, native_reason, pack_bits, tile_entries, tile_sizes
from attnkit.kernels.gather import block_gather_attention, needs_grad
from attnkit.masks.base import EMPTY, FULL, PARTIAL
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.ops.routed._common import cpu_only, gather_detail, grad_words, reference_dtype, upcast_words
from attnkit.reference.naive_sparse2 import naive_sparsifiner

_ROWS = 256  # query rows scored and sorted at once (bounds the (B, H, rows, Nk) score buffer)


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _top_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool with True at each row's ``k`` largest entries; ties at the k-th value go to the lower index (the
    stable-sort rule of the naive twin, without sorting: ``topk`` finds the k-th value, a cumsum breaks ties).
    A row whose k-th value is NaN keeps its first ``k`` keys, so the NaN reaches its output."""
    thr = torch.topk(scores, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # (..., 1) k-th largest
    gt = scores > thr
    eq = scores == thr
    keep = gt | (eq & (eq.cumsum(-1) <= k - gt.sum(-1, keepdim=True)))
    return keep | (thr.isnan() & (torch.arange(scores.shape[-1], device=scores.device) < k))


def token_connectivity(coef: torch.Tensor, basis: torch.Tensor, top_k: int, cls_tokens: int = 0) -> torch.Tensor:
    """Per-row top-k of ``M~ = C U``: bool ``(B, H, N, Nk)``; rows ``< cls_tokens`` keep every key.

    ``coef (B, N, H, R)``, ``basis (R, Nk)``; scored in float32 (float64 stays float64), ``_ROWS`` rows at once.
    """
    dt = _score_dtype(coef.dtype)
    c, u = coef.detach().to(dt), basis.detach().to(dt)
    b, n, h, _ = c.shape
    out = torch.empty(b, h, n, u.shape[1], dtype=torch.bool, device=c.device)
    for r0 in range(0, n, _ROWS):
        s = torch.einsum("bnhr,rm->bhnm", c[:, r0:r0 + _ROWS], u)  # (B, H, rows, Nk)
        out[:, :, r0:r0 + _ROWS] = _top_rows(s, min(top_k, u.shape[1]))
    out[:, :, :cls_tokens] = True
    return out


def block_connectivity(coef: torch.Tensor, basis: torch.Tensor, top_k: int, block: int) -> torch.Tensor:
    """Block top-k layout ``(B, H, nqb, nkb)``: each query block keeps its ``ceil(top_k / block)`` key blocks of
    highest mean predicted score, ``mean_rows(C) @ mean_cols(U)`` (the tile mean of ``C U``, exactly)."""
    dt = _score_dtype(coef.dtype)
    c, u = coef.detach().to(dt), basis.detach().to(dt)
    b, n, h, r = c.shape
    nk = u.shape[1]
    nqb, nkb = math.ceil(n / block), math.ceil(nk / block)
    cpad = torch.nn.functional.pad(c, (0, 0, 0, 0, 0, nqb * block - n))              # (B, nqb*blk, H, R)
    rows = torch.clamp(torch.arange(nqb) * block + block, max=n) - torch.arange(nqb) * block
    cbar = cpad.view(b, nqb, block, h, r).sum(2) / rows.to(dt).view(1, nqb, 1, 1)   # (B, nqb, H, R)
    upad = torch.nn.functional.pad(u, (0, nkb * block - nk))                        # (R, nkb*blk)
    cols = torch.clamp(torch.arange(nkb) * block + block, max=nk) - torch.arange(nkb) * block
    ubar = upad.view(r, nkb, block).sum(2) / cols.to(dt)                            # (R, nkb)
    pooled = torch.einsum("bihr,rj->bhij", cbar, ubar)                              # (B, H, nqb, nkb)
    return _top_rows(pooled, min(math.ceil(top_k / block), nkb))


@dataclass(frozen=True)
class SparsifinerCall:
    """A validated ``sparsifiner_attention`` call (what backends and ``explain`` see)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    coef: torch.Tensor
    basis: torch.Tensor
    top_k: int
    granularity: str
    block_size: int
    cls_tokens: int
    scale: float
    needs_grad: bool

    def describe(self) -> str:
        n = self.q.shape[1]
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.q.dtype}, "
                f"coef {tuple(self.coef.shape)} basis {tuple(self.basis.shape)}, top_k={self.top_k} "
                f"(keep {self.top_k / self.k.shape[1]:.3f}), granularity={self.granularity}"
                f"{f' (block {self.block_size})' if self.granularity == 'block' else ''}, "
                f"cls_tokens={self.cls_tokens} of {n}, scale={self.scale:.4g}, {grad_words(self.needs_grad)}")


def make_call(q, k, v, coef, basis, *, top_k, granularity="token", block_size=64, cls_tokens=0,
              scale=None) -> SparsifinerCall:
    """Validate a ``sparsifiner_attention`` call; errors name the argument."""
    hq, hkv = check_qkv(q, k, v, same_extent=True)
    if hq != hkv:
        raise ValueError(f"sparsifiner_attention: q and k must have the same heads, got {hq} and {hkv}")
    b, n, h, _ = q.shape
    coef = check_tensor("sparsifiner_attention: coef", coef)
    basis = check_tensor("sparsifiner_attention: basis", basis)
    if coef.dim() != 4 or tuple(coef.shape[:3]) != (b, n, h) or coef.shape[3] < 1:
        raise ValueError(f"sparsifiner_attention: coef must be (B, N, H, R) = ({b}, {n}, {h}, R), "
                         f"got {tuple(coef.shape)}")
    if basis.dim() != 2 or tuple(basis.shape) != (coef.shape[3], n):
        raise ValueError(f"sparsifiner_attention: basis must be (R, N) = ({coef.shape[3]}, {n}), "
                         f"got {tuple(basis.shape)}")
    if int_arg("sparsifiner_attention: top_k", top_k, 1) > n:
        raise ValueError(f"sparsifiner_attention: top_k must be in [1, N={n}], got {top_k}")
    if granularity not in ("token", "block"):
        raise ValueError(f"sparsifiner_attention: granularity must be 'token' or 'block', got {granularity!r}")
    int_arg("sparsifiner_attention: block_size", block_size, 1)
    if int_arg("sparsifiner_attention: cls_tokens", cls_tokens, 0) > n:
        raise ValueError(f"sparsifiner_attention: cls_tokens must be in [0, N={n}], got {cls_tokens}")
    return SparsifinerCall(q, k, v, coef, basis, top_k, granularity, block_size, cls_tokens,
                           resolve_scale(scale, q.shape[-1]), needs_grad(q, k, v))


# ------------------------------------------------------------------------------------------- backends


def _tiles_supports(call: SparsifinerCall) -> tuple[bool, str]:
    if call.granularity != "token":
        return False, "block granularity runs on the block-gather engine"
    why = native_reason(call.q, build=False)
    return (False, why) if why is not None else (True, "")


def token_tile_list(coef: torch.Tensor, basis: torch.Tensor, top_k: int, cls_tokens: int, bq: int) -> TileList:
    """The tile list of the token top-k connectivity, built ``_ROWS`` query rows at a time (the connectivity is
    never materialised whole): per (batch, head), every 64-key tile holding a kept pair, FULL or with its
    bitmask; one entry list per (batch, head)."""
    dt = _score_dtype(coef.dtype)
    c, u = coef.detach().to(dt), basis.detach().to(dt)
    b, n, h, _ = c.shape
    nk, bk = u.shape[1], 64
    nqt, nkt = -(-n // bq), -(-nk // bk)
    step = bq * max(1, _ROWS // bq)
    classes = torch.empty(b, h, nqt, nkt, dtype=torch.int8)
    slot_of = torch.full((b, h, nqt, nkt), -1, dtype=torch.long)  # each partial tile's bitmask slot
    bits, used = [], 0
    for r0 in range(0, n, step):
        a = _top_rows(torch.einsum("bnhr,rm->bhnm", c[:, r0:r0 + step], u), min(top_k, nk))  # (B, H, rows, Nk)
        a[:, :, :max(0, cls_tokens - r0)] = True
        t = -(-a.shape[2] // bq)
        a = torch.nn.functional.pad(a, (0, nkt * bk - nk, 0, t * bq - a.shape[2]))
        a6 = a.view(b, h, t, bq, nkt, bk)                                     # (B, H, t, bq, nkt, bk)
        # padded rows / keys are False, so an edge tile is at most PARTIAL (its bitmask is exact)
        cls = torch.where(a6.all(3).all(-1), FULL, torch.where(a6.any(3).any(-1), PARTIAL, EMPTY)).to(torch.int8)
        t0 = r0 // bq
        classes[:, :, t0:t0 + t] = cls
        part = cls == PARTIAL
        p = int(part.sum())
        slot_of[:, :, t0:t0 + t][part] = torch.arange(used, used + p)
        bits.append(pack_bits(a6.transpose(3, 4)[part], bk))                     # (p, bq, 1), same order
        used += p
    row_ptr, lead, ti, tj = tile_entries(classes)  # (B, H, nqt + 1) and the non-EMPTY tiles
    slots = slot_of.view(b * h, nqt, nkt)[lead, ti, tj]
    packed = torch.cat(bits)[None, None] if used else torch.zeros(1, 1, 1, bq, 1, dtype=torch.long)
    rows = (torch.clamp(torch.arange(nqt) * bq + bq, max=n) - torch.arange(nqt) * bq)[ti]
    cols = (torch.clamp(torch.arange(nkt) * bk + bk, max=nk) - torch.arange(nkt) * bk)[tj]
    computed = int((rows * cols).sum()) // (b * h)
    return TileList(bq, bk, row_ptr.contiguous(), tj.contiguous(), slots, packed.contiguous(), computed)


def _run_tiles(call: SparsifinerCall) -> torch.Tensor:
    bq, _ = tile_sizes(call.q.shape[1], call.k.shape[1])
    tl = token_tile_list(call.coef, call.basis, call.top_k, call.cls_tokens, bq)
    return flash_attention(call.q, call.k, call.v, tl, call.scale)[0]


def _tiles_detail(call: SparsifinerCall) -> str:
    return ("per-row top-k of C U and its tile list built 256 rows at a time, then the compiled tile kernel on "
            "every tile holding a kept pair (per-(batch, head) lists, bitmasks in partial tiles; kernel backward)"
            + upcast_words(call.q.dtype))


def _with_cls_rows(call: SparsifinerCall, out: torch.Tensor) -> torch.Tensor:
    """Rows ``< cls_tokens`` replaced by dense attention over every key (the CLS row keeps all keys)."""
    c = call.cls_tokens
    if c == 0:
        return out
    dense = attention(call.q[:, :c], call.k, call.v, scale=call.scale)  # (B, c, H, Dv)
    return torch.cat([dense, out[:, c:]], dim=1)                          # (B, N, H, Dv)


def _gather_supports(call: SparsifinerCall) -> tuple[bool, str]:
    if call.granularity != "block":
        return False, "token granularity: the kept pairs are not whole blocks"
    return True, ""


def _run_gather(call: SparsifinerCall) -> torch.Tensor:
    lay = block_connectivity(call.coef, call.basis, call.top_k, call.block_size)  # (B, H, nqb, nkb)
    out = block_gather_attention(call.q, call.k, call.v, lay, call.block_size, scale=call.scale,
                                 reuse_buffers=not call.needs_grad)              # (B, N, H, Dv)
    return _with_cls_rows(call, out)


def _masked_connectivity(call: SparsifinerCall) -> torch.Tensor:
    if call.granularity == "token":
        return token_connectivity(call.coef, call.basis, call.top_k, call.cls_tokens)
    n, nk, blk = call.q.shape[1], call.k.shape[1], call.block_size
    lay = block_connectivity(call.coef, call.basis, call.top_k, blk)               # (B, H, nqb, nkb)
    allowed = lay.repeat_interleave(blk, 2).repeat_interleave(blk, 3)[:, :, :n, :nk]  # (B, H, N, Nk)
    allowed[:, :, :call.cls_tokens] = True
    return allowed


def _run_masked(call: SparsifinerCall) -> torch.Tensor:
    return attention(call.q, call.k, call.v, mask=_masked_connectivity(call), scale=call.scale)


def _run_reference(call: SparsifinerCall) -> torch.Tensor:
    dt = reference_dtype(call.q.dtype)
    q, k, v = (t.to(dt) for t in (call.q, call.k, call.v))
    return naive_sparsifiner(q, k, v, call.coef, call.basis, top_k=call.top_k, granularity=call.granularity,
                             block=call.block_size, cls_tokens=call.cls_tokens, scale=call.scale).to(call.q.dtype)


DISPATCHER = Dispatcher("sparsifiner_attention", [
    Backend("tiles", _run_tiles, _tiles_supports, detail=_tiles_detail,
            note="token top-k on the compiled tile kernel"),
    Backend("gather", _run_gather, _gather_supports, detail=lambda c: gather_detail(c, c.block_size),
            note="block top-k on the block-gather engine"),
    Backend("masked", _run_masked, suits=lambda c: (True, "materialises the (B, H, N, Nk) connectivity"),
            note="ak.attention with the materialised connectivity"),
    Backend("reference", _run_reference, cpu_only, auto=False, note="naive dense-mask twin (the oracle)"),
])

register_op("sparsifiner_attention", make_call, DISPATCHER)


def sparsifiner_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coef: torch.Tensor,
                          basis: torch.Tensor, *, top_k: int, granularity: str = "token", block_size: int = 64,
                          cls_tokens: int = 0, scale: float | None = None,
                          backend: str | None = None) -> torch.Tensor:
    """Attention on the top-k pairs of a low-rank predicted connectivity ``M~ = C U``.

    Args:
        q, k: ``(B, N, H, D)``; v: ``(B, N, H, Dv)``.
        coef: ``C``, ``(B, N, H, R)``: each query's coefficients over the ``R`` basis rows (the predictor's
            softmax); basis: ``U``, ``(R, N)``. Neither gets a gradient from the output (the mask is detached).
        top_k: keys kept per query row (the paper's ``ceil(rho N)``); granularity: ``"token"`` (paper) or
            ``"block"`` (``ceil(top_k / block_size)`` key blocks per query block, by tile-mean score).
        block_size: the block of ``"block"``; cls_tokens: leading query rows that keep every key (the CLS row).
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"tiles"``, ``"gather"``, ``"masked"``, ``"reference"`` or None (auto).

    Returns:
        ``(B, N, H, Dv)``.

    Example:
        >>> q = k = v = torch.randn(1, 256, 4, 32)
        >>> coef = torch.softmax(torch.randn(1, 256, 4, 32), -1); basis = torch.rand(32, 256)
        >>> out = sparsifiner_attention(q, k, v, coef, basis, top_k=64)
    """
    call = make_call(q, k, v, coef, basis, top_k=top_k, granularity=granularity, block_size=block_size,
                     cls_tokens=cls_tokens, scale=scale)
    return DISPATCHER.run(call, backend)
