"""Cases for ``ak.attention``: LongCA-bench's mask zoo x implementations x N x pass.

Implementations compared (``Case.impl``):

* ``sdpa``: ``F.scaled_dot_product_attention`` with no mask on heads-first tensors -- dense
  attention, the baseline every speedup is divided by (group ``full/N=...``);
* ``sdpa_causal``: the same with ``is_causal=True`` (plain causal masks only);
* ``sdpa_dense_mask``: SDPA with a dense ``(N, N)`` boolean mask -- what a user without
  attnkit would write; building the mask is timed apart (``mask_build_s``);
* ``blocked``: ``ak.attention(..., backend="blocked")``; its tile plan is built in setup and
  timed apart (``mask_build_s``);
* ``auto``: ``ak.attention(...)`` with no ``backend=``: what the dispatcher chooses (its first call
  carries the plan build);
* ``flex``: ``torch.compile(flex_attention)`` called as its documentation does: contiguous heads-first
  ``(B, H, N, D)`` tensors and a BlockMask built once; forward only on CPU; BlockMask build and compile
  timed apart (no layout copy is charged to it);
* ``flex_attnkit``: the same through ``ak.attention(..., backend="flex")`` on heads-last inputs (it copies
  them to the layout flex wants); its record holds ``flex_attnkit_over_direct``, the time ratio to the
  direct call measured alternately in setup.

Shapes: B=1, H=8, D=64, fp32, heads-last. Each case checks its output on 64 query rows (all heads)
against an fp64 reference. :func:`foundation` is the ``foundation`` suite: the comparisons masked
attention's performance claims rest on (block-sparse tiles vs flex and vs SDPA with a dense mask).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, merge_cases, pass_fn
from attnkit.bench.flops import attention_flops, mask_area

B, H, D = 1, 8, 64
MAX_N_GENERIC_MASK = 2048
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _masks() -> Any:
    import attnkit.masks as m

    return m


DATA_MASKS = ("qk_sparse", "hash_sparse")


def named_mask(name: str, n: int, h: int = H) -> Any:
    """The mask called ``name`` for ``n`` tokens: ``sliding_window_512``, ``causal``, a zoo name, or a
    data-dependent one (``qk_sparse``: 64-token blocks, top n/512 key blocks per query block, causal;
    ``hash_sparse``: 8 buckets of 64-token blocks) built from the case's own heads-last q and k."""
    m = _masks()
    if name in DATA_MASKS:
        from attnkit.masks.hash_sparse import hash_sparse
        from attnkit.masks.qk_sparse import qk_sparse

        q, k, _, _ = _qkv(n, h, torch.float32, False, False)
        if name == "qk_sparse":
            return qk_sparse(q, k, 64, max(1, n // 512), causal=True)
        return hash_sparse(q, k, 8, block=64)
    fixed: dict[str, Callable[[], Any]] = {"full": lambda: None, "causal": m.causal}
    if name in fixed:
        return fixed[name]()
    for prefix, make in (("sliding_window_causal_", lambda w: m.causal() & m.sliding_window(w)),
                         ("sliding_window_", m.sliding_window), ("block_causal_", m.block_causal),
                         ("chunked_", m.chunked)):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return make(int(name[len(prefix):]))
    return m.zoo(name, n)


def _qkv(n: int, h: int, dtype: torch.dtype, heads_first: bool, grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, h, n, D) if heads_first else (B, n, h, D)
    q, k, v, do = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(grad)
    return q, k, v, do


def _check(fn: Callable[[], torch.Tensor], q, k, v, mask, heads_first: bool) -> tuple[float, float]:
    """Output rows of ``fn`` vs an fp64 reference on 64 query rows (all heads)."""
    with torch.no_grad():
        out = fn().detach()
        if heads_first:
            out, q, k, v = (t.transpose(1, 2) for t in (out, q, k, v))  # (B, N, H, D)
        n = q.shape[1]
        rows = torch.linspace(0, n - 1, min(64, n)).long()
        qs = q[0, rows].double().transpose(0, 1)                               # (H, R, D)
        ks, vs = k[0].double().transpose(0, 1), v[0].double().transpose(0, 1)  # (H, N, D)
        s = qs @ ks.transpose(-1, -2) * D**-0.5                                 # (H, R, N)
        if mask is not None:
            heads = torch.arange(s.shape[0])[:, None, None]
            allowed = mask.mask_mod(0, heads, rows[None, :, None], torch.arange(n)[None, None, :])  # (H|1, R, N)
            s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)  # an empty row gives zeros
        ref = (p @ vs).transpose(0, 1)                                          # (R, H, D)
        got = out[0, rows].double()                                             # (R, H, D)
        err = (got - ref).abs().max().item()
        rel = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()
    return err, rel


def _alternate_ratio(a: Callable[[], Any], b: Callable[[], Any], rounds: int = 3) -> float:
    """Median time of ``a`` over median time of ``b``, calls alternated (both warmed up first)."""
    ta, tb = [], []
    with torch.no_grad():
        a(), b()
        for _ in range(rounds):
            for fn, ts in ((a, ta), (b, tb)):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
    return round(sorted(ta)[rounds // 2] / sorted(tb)[rounds // 2], 4)


def _runner(fn: Callable[[], torch.Tensor], q, k, v, do, pass_: str, check, **kw: Any) -> Runner:
    run = pass_fn(fn, pass_, (q, k, v), do)
    return Runner(run=run, check=check, **kw)


def _setup(impl: str, mask_name: str, n: int, h: int, dtype_name: str, pass_: str) -> Callable[[], Runner]:
    if impl == "blocked_float32":  # the float32 twin inside a half-precision group: timed alternately with it
        impl, dtype_name = "blocked", "float32"

    def setup() -> Runner:
        import attnkit as ak

        dtype = DTYPES[dtype_name]
        mask = named_mask(mask_name, n, h)
        heads_first = impl.startswith("sdpa") or impl == "flex"
        q, k, v, do = _qkv(n, h, dtype, heads_first, pass_ == "fwd+bwd")
        oneoff: dict[str, float] = {}
        params: dict[str, Any] = {}
        first_oneoff = False
        if impl == "sdpa":
            def fn() -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v)
        elif impl == "sdpa_causal":
            def fn() -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif impl == "sdpa_dense_mask":
            t0 = time.perf_counter()
            dense = mask.to_dense(n, n)                                    # (N, N) bool
            oneoff["mask_build_s"] = time.perf_counter() - t0

            def fn() -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        elif impl == "auto":
            def fn() -> torch.Tensor:
                return ak.attention(q, k, v, mask)
        elif impl == "blocked":
            from attnkit.kernels.flash import native_reason, tile_list
            from attnkit.ops.dense.blocked import kernel_tiles, plan_for

            t0 = time.perf_counter()
            if native_reason(q) is None:  # the compiled kernel's tile list (cached; the timed calls reuse it)
                tile_list(mask, n, n, *kernel_tiles(n, n, h, h))
            else:
                plan_for(mask, n, n, B, h, inference=pass_ == "fwd")
            oneoff["mask_build_s"] = time.perf_counter() - t0

            def fn() -> torch.Tensor:
                return ak.attention(q, k, v, mask, backend="blocked")
        elif impl in ("flex", "flex_attnkit"):
            from attnkit.ops.dense.flex import block_mask_for, compiled_flex

            t0 = time.perf_counter()
            bm = block_mask_for(mask, B, h, n, n, q.device)  # built once, cached: the timed calls reuse it
            oneoff["mask_build_s"] = time.perf_counter() - t0
            first_oneoff = True

            def direct(qf, kf, vf) -> torch.Tensor:
                return compiled_flex()(qf, kf, vf, block_mask=bm, scale=D ** -0.5)

            if impl == "flex":
                def fn() -> torch.Tensor:
                    return direct(q, k, v)
            else:
                def fn() -> torch.Tensor:
                    return ak.attention(q, k, v, mask, backend="flex")

                if pass_ == "fwd":
                    qf, kf, vf = (t.detach().transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, N, D)
                    params["flex_attnkit_over_direct"] = _alternate_ratio(fn, lambda: direct(qf, kf, vf))
                    first_oneoff = False  # compiled by the ratio's warm-up
        else:
            raise ValueError(f"unknown impl {impl!r}")
        return _runner(fn, q, k, v, do, pass_, lambda: _check(fn, q, k, v, mask, heads_first),
                       oneoff=oneoff, first_call_is_oneoff=first_oneoff, params=params)

    return setup


def _impls(mask_name: str) -> list[str]:
    if mask_name == "full":
        return ["sdpa", "blocked"]
    return (["sdpa_causal"] if mask_name == "causal" else []) + ["sdpa_dense_mask", "blocked"]


def grid(masks: list[str], ns: list[int], passes: tuple[str, ...], suites: set[str], *, h: int = H,
         dtype: str = "float32", impls: Callable[[str], list[str]] = _impls) -> list[Case]:
    """Cases for every (mask, N, pass, impl); each group's speedups refer to dense SDPA at its N."""
    out = []
    suffix = (f"/H={h}" if h != H else "") + (f"/{dtype}" if dtype != "float32" else "")
    from attnkit.masks.base import IntervalMask

    for n in ns:
        for mask_name in masks:
            mask = named_mask(mask_name, n, h)
            if (mask is not None and not isinstance(mask, IntervalMask) and mask_name not in DATA_MASKS
                    and n > MAX_N_GENERIC_MASK):
                continue  # exact area of a non-interval mask costs O(N^2) at discovery; keep it small
            fl = attention_flops(mask_area(mask, n, n), h, D, batch=B)
            params = (("mask", mask_name), ("mask_repr", repr(mask) if mask is not None else "full"),
                      ("N", n), ("B", B), ("H", h), ("D", D), ("dtype", dtype),
                      ("density", round(fl / attention_flops(n * n, h, D, batch=B), 6)),
                      ("baseline_group", f"full/N={n}{suffix}"))
            for pass_ in passes:
                for impl in impls(mask_name):
                    if impl.startswith("flex") and pass_ != "fwd":
                        continue  # FlexAttention has no CPU backward
                    ps = params if impl != "blocked_float32" else tuple(
                        (key, "float32" if key == "dtype" else val) for key, val in params)
                    out.append(Case(op="attention", impl=impl, group=f"{mask_name}/N={n}{suffix}", pass_=pass_,
                                    suites=frozenset(suites), params=ps, flops=fl,
                                    setup=_setup(impl, mask_name, n, h, dtype, pass_),
                                    baseline=impl == "sdpa" and mask_name == "full"))
    return out


FWD, BOTH = ("fwd",), ("fwd", "fwd+bwd")
DEFAULT_MASKS = ["full", "causal", "sliding_window_256", "causal_document", "block_causal_256", "global_sliding_window"]


def cases() -> list[Case]:
    """Every ak.attention case, suites attached (see module docstring)."""
    m = _masks()
    zoo = [z for z in m.ZOO]
    with_flex = lambda name: [*_impls(name), "flex", "flex_attnkit"]  # noqa: E731
    return merge_cases([
        grid(["full", "causal", "sliding_window_64"], [256], BOTH, {"quick"}),
        # default (< 5 min on 2 cores with the other families): every mask family at N=1024 and 2048
        # fwd, the first four at N=1024 fwd+bwd too; the window at N=4096 where its sparsity pays
        grid(DEFAULT_MASKS, [1024], FWD, {"default", "full"}),
        grid(DEFAULT_MASKS[:4], [1024], ("fwd+bwd",), {"default", "full"}),
        grid(DEFAULT_MASKS[4:], [1024], ("fwd+bwd",), {"full"}),
        grid(DEFAULT_MASKS, [2048], FWD, {"default", "full"}),
        grid(DEFAULT_MASKS, [2048], ("fwd+bwd",), {"full"}),
        grid(["full", "sliding_window_256"], [4096], FWD, {"default", "full"}),
        grid(zoo, [1024, 2048, 4096, 8192], BOTH, {"masks", "full"}),
        grid(list(DATA_MASKS), [1024, 2048, 4096, 8192], BOTH, {"masks", "full"}),
        grid(["full", "causal", "sliding_window_256"], [512 * 2**i for i in range(8)], BOTH, {"scaling"}),
        # the large masked-attention checks (the foundation suite's, with dense SDPA beside them)
        grid(["full", "sliding_window_512"], [16384], FWD, {"full"}, impls=with_flex),
        grid(["full", "sliding_window_512", "causal", "causal_document"], [8192], BOTH, {"full"}),
        grid(["full", "causal", "sliding_window_256"], [4096], FWD, {"full"}, impls=with_flex),
        grid(["sliding_window_causal_512"], [65536], ("fwd+bwd",), {"full"}, h=4,
             impls=lambda name: ["blocked", "sdpa_dense_mask"]),
        foundation(),
        # the foundation suite at full size only: flex through ak.attention (its ratio to the direct call is
        # in the record) and the same window on bfloat16 inputs (upcast tile by tile: no slower than fp32)
        grid(["sliding_window_512"], [16384], FWD, {"foundation", "full"}, impls=lambda name: ["flex_attnkit"]),
        grid(["sliding_window_512"], [16384], FWD, {"foundation", "full"}, dtype="bfloat16",
             impls=lambda name: ["blocked", "blocked_float32"]),  # fp32 beside it: timed alternately
    ])


def foundation(n_flex: int = 16384, n_masks: int = 8192, n_memory: int = 65536, h_memory: int = 4,
               suites: tuple[str, ...] = ("foundation",)) -> list[Case]:
    """The ``foundation`` suite (sizes are arguments so a test can run it small).

    * ``sliding_window_512`` at ``n_flex``, fwd: ``blocked`` vs ``flex`` (flex's BlockMask build and
      compile are one-offs); :func:`cases` adds flex through attnkit and ``blocked`` on bfloat16 inputs
      at full size;
    * ``sliding_window_512``, ``full_document``, ``causal_document`` and ``causal`` at ``n_masks``, fwd
      and fwd+bwd: ``auto`` and ``blocked`` vs ``sdpa_dense_mask`` (and ``sdpa_causal`` for causal):
      the report's peer ratios give each speedup and its fraction of the ideal ``1 / density``;
    * ``causal & sliding_window(512)`` at ``n_memory`` with ``h_memory`` heads, fwd+bwd, ``auto``:
      its peak memory (fresh process) and time.
    """
    s = set(suites)
    dense_peers = ["auto", "blocked", "sdpa_dense_mask"]
    return merge_cases([
        grid(["sliding_window_512"], [n_flex], FWD, s, impls=lambda name: ["blocked", "flex"]),
        grid(["sliding_window_512", "full_document", "causal_document"], [n_masks], BOTH, s,
             impls=lambda name: dense_peers),
        grid(["causal"], [n_masks], BOTH, s, impls=lambda name: [*dense_peers, "sdpa_causal"]),
        grid(["sliding_window_causal_512"], [n_memory], ("fwd+bwd",), s, h=h_memory, impls=lambda name: ["auto"]),
    ])
