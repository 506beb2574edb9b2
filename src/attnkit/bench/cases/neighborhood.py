"""Cases for ``ak.neighborhood_attention`` (1-D / 2-D / 3-D NA) against dense and flex baselines.

Implementations (``Case.impl``):

* ``tiled``: ``ak.neighborhood_attention(..., backend="tiled")``; the tile plan is built in
  setup and timed apart (``mask_build_s``);
* ``sdpa``: dense SDPA with no mask (the group's baseline: the speed of light is ``1/density``
  times faster);
* ``sdpa_dense_mask``: SDPA with the NA pattern as a dense ``(N, N)`` bool mask (built apart);
* ``flex``: ``torch.compile(flex_attention)`` with an exact NA BlockMask, forward only (BlockMask
  build timed apart, compilation is the first call's one-off).

Shapes: B=1, H=8, D=64, fp32, heads-last ``(B, *S, H, D)``. Each case checks 64 query rows
against an fp64 reference built from the pattern's ``mask_mod``. :func:`acceptance` is the
``neighborhood`` suite.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, merge_cases, pass_fn
from attnkit.bench.flops import attention_flops

B, H, D = 1, 8, 64


def _tensors(shape: tuple[int, ...], heads_first: bool, grad: bool):
    g = torch.Generator().manual_seed(0)
    n = math.prod(shape)
    q, k, v, do = (torch.randn(B, *shape, H, D, generator=g) for _ in range(4))
    if heads_first:
        q, k, v, do = (t.reshape(B, n, H, D).transpose(1, 2).contiguous() for t in (q, k, v, do))  # (B, H, N, D)
    for t in (q, k, v):
        t.requires_grad_(grad)
    return q, k, v, do


def _check(fn, q, k, v, mask, heads_first: bool) -> tuple[float, float]:
    with torch.no_grad():
        n = mask.n
        out = fn().detach()
        if heads_first:
            out, q, k, v = (t.transpose(1, 2) for t in (out, q, k, v))  # (B, N, H, D)
        out, q, k, v = (t.reshape(B, n, H, D) for t in (out, q, k, v))
        rows = torch.linspace(0, n - 1, min(64, n)).long()
        s = q[0, rows].double().transpose(0, 1) @ k[0].double().permute(1, 2, 0) * D ** -0.5  # (H, R, N)
        s = s.masked_fill(~mask.mask_mod(0, 0, rows[:, None], torch.arange(n)[None, :]), float("-inf"))
        ref = (torch.softmax(s, -1) @ v[0].double().transpose(0, 1)).transpose(0, 1)  # (R, H, D)
        got = out[0, rows].double()
        err = (got - ref).abs().max().item()
        rel = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    return err, rel


def _setup(impl: str, shape: tuple[int, ...], kernel: int, pass_: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        import attnkit as ak
        from attnkit.masks.neighborhood import neighborhood_mask

        mask = neighborhood_mask(shape, kernel)
        n = mask.n
        heads_first = impl.startswith("sdpa") or impl == "flex"
        q, k, v, do = _tensors(shape, heads_first, pass_ == "fwd+bwd")
        oneoff: dict[str, float] = {}
        first_oneoff = False
        t0 = time.perf_counter()
        if impl == "tiled":
            from attnkit.ops.neighborhood.tiles import choose_tile, make_plan

            r = len(shape)
            args = (mask.shape, mask.kernel_size, (1,) * r, (1,) * r, (False,) * r)
            make_plan(*args, choose_tile(*args))  # cached; the timed calls reuse it (torch-ops fallback)
            from attnkit.ops.neighborhood.kernel import kernel_plan

            kernel_plan(*args, 64)  # the tile kernel's plan (H == Hkv here), cached likewise

            def fn() -> torch.Tensor:
                return ak.neighborhood_attention(q, k, v, kernel, backend="tiled")
        elif impl == "sdpa":
            def fn() -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v)
        elif impl == "sdpa_dense_mask":
            dense = mask.to_dense(n, n)  # (N, N) bool

            def fn() -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        elif impl == "flex":
            from attnkit.ops.neighborhood.flex import compiled_flex, na_block_mask

            bm = na_block_mask(mask)
            first_oneoff = True

            def fn() -> torch.Tensor:
                return compiled_flex()(q, k, v, block_mask=bm)
        else:
            raise ValueError(f"unknown impl {impl!r}")
        oneoff["mask_build_s"] = time.perf_counter() - t0
        run = pass_fn(fn, pass_, (q, k, v), do)
        return Runner(run=run, check=lambda: _check(fn, q, k, v, mask, heads_first), oneoff=oneoff,
                      first_call_is_oneoff=first_oneoff)

    return setup


def _group(shape: tuple[int, ...], kernel: int, passes: tuple[str, ...], impls: list[str],
           suites: set[str]) -> list[Case]:
    from attnkit.masks.neighborhood import neighborhood_mask

    mask = neighborhood_mask(shape, kernel)
    n = mask.n
    area = mask.count()
    dims = "x".join(map(str, shape))
    group = f"na{len(shape)}d_{dims}_k{kernel}"
    params = (("mask", mask.name), ("mask_repr", repr(mask)), ("N", n), ("spatial", dims), ("kernel", kernel),
              ("B", B), ("H", H), ("D", D), ("dtype", "float32"), ("density", round(area / n**2, 6)),
              ("baseline_group", group))
    out = []
    for pass_ in passes:
        for impl in impls:
            if impl == "flex" and pass_ != "fwd":
                continue  # flex has no CPU backward
            out.append(Case(op="neighborhood_attention", impl=impl, group=group, pass_=pass_,
                            suites=frozenset(suites), params=params, flops=attention_flops(area, H, D, batch=B),
                            setup=_setup(impl, shape, kernel, pass_), baseline=impl == "sdpa"))
    return out


FWD, BOTH = ("fwd",), ("fwd", "fwd+bwd")


def cases() -> list[Case]:
    """Neighborhood cases: cheap ones in quick/default, the acceptance shapes (with flex) in full."""
    return merge_cases([
        _group((1024,), 65, FWD, ["tiled", "sdpa_dense_mask"], {"quick"}),
        # default: one 2-D and one 1-D pattern, fwd and fwd+bwd, no compile
        _group((32, 32), 7, BOTH, ["tiled", "sdpa", "sdpa_dense_mask"], {"default", "full"}),
        _group((2048,), 129, FWD, ["tiled", "sdpa"], {"default", "full"}),
        _group((8, 16, 16), 5, FWD, ["tiled", "sdpa_dense_mask"], {"default", "full"}),
        # the shapes of the neighborhood suite, with dense SDPA beside them
        _group((64, 64), 13, BOTH, ["tiled", "sdpa", "sdpa_dense_mask", "flex"], {"full"}),
        _group((16384,), 1025, FWD, ["tiled", "sdpa", "flex"], {"full"}),
        _group((16, 32, 32), 7, ("fwd+bwd",), ["tiled"], {"full"}),
        acceptance(),
    ])


def acceptance(shape_2d: tuple[int, ...] = (64, 64), kernel_2d: int = 13, shape_1d: tuple[int, ...] = (16384,),
               kernel_1d: int = 1025, shape_3d: tuple[int, ...] = (16, 32, 32), kernel_3d: int = 7,
               suites: tuple[str, ...] = ("neighborhood",)) -> list[Case]:
    """The ``neighborhood`` suite (sizes are arguments so a test can run it small).

    * 2-D, fwd: ``tiled`` vs ``flex`` (compile and BlockMask one-off); fwd+bwd: ``tiled`` vs
      ``sdpa_dense_mask`` (the report's peer ratios: speedup and its fraction of ``1 / density``);
    * 1-D long window, fwd: ``tiled`` vs ``flex``;
    * 3-D, fwd+bwd: ``tiled`` vs ``sdpa_dense_mask`` (FLOP-ratio ideal fraction), time and peak memory.
    """
    s = set(suites)
    return merge_cases([
        _group(shape_2d, kernel_2d, FWD, ["tiled", "flex"], s),
        _group(shape_2d, kernel_2d, ("fwd+bwd",), ["tiled", "sdpa_dense_mask"], s),
        _group(shape_1d, kernel_1d, FWD, ["tiled", "flex"], s),
        _group(shape_3d, kernel_3d, ("fwd+bwd",), ["tiled", "sdpa_dense_mask"], s),
    ])
