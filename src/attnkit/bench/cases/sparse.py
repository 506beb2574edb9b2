"""Cases for the routed / static sparse mechanisms: MoBA, BiFormer, S2, MoA.

Each group times one mechanism's attention core (routing included, projections excluded)
against dense SDPA on the same q, k, v (``baseline``), interleaved. ``flops`` counts the
pairs the mechanism really attends (so effective FLOP/s are comparable), ``density`` is
that area over ``N^2`` and ``ideal_speedup = 1 / density``: the report's speedup vs dense
divided by it is the achieved fraction of the ideal (the report's peer-ratio table). Shapes:
B=1, H=8, D=64, fp32, fwd. The N=16384 cases form the ``sparse`` suite with those of
``cases/sparse_more.py`` and ``cases/vmoba.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, pass_fn

B, H, D = 1, 8, 64


def _qkv(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, n, H, D, generator=g) for _ in range(3))  # (B, N, H, D)


def _check(out: torch.Tensor, q, k, v, allowed_rows: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    """``out (B, N, H, D)`` vs fp64 attention on 32 query rows with the mechanism's own mask."""
    n = q.shape[1]
    rows = torch.linspace(0, n - 1, 32).long()
    s = torch.einsum("rhd,khd->hrk", q[0, rows].double(), k[0].double()) * D ** -0.5  # (H, R, N)
    s = s.masked_fill(~allowed_rows(rows), float("-inf"))
    ref = torch.einsum("hrk,khd->rhd", torch.softmax(s, -1).nan_to_num(0.0), v[0].double())
    got = out[0, rows].double()
    err = (got - ref).abs().max().item()
    return err, ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def _moba(n: int, bs: int, topk: int, routing: str):
    from attnkit.ops.routed.moba import moba_attention

    q, k, v = _qkv(n)

    def fn():
        return moba_attention(q, k, v, bs, topk, routing=routing)

    def allowed(rows):
        _, sel = moba_attention(q, k, v, bs, topk, routing=routing, return_layout=True)  # (B, H, rows', n)
        r = rows // bs if routing == "block" else rows
        keys = torch.arange(n)
        return sel[0][:, r][:, :, keys // bs] & (keys[None, None] <= rows[None, :, None])

    area = sum(min(topk - 1, t // bs) * bs + t % bs + 1 for t in range(n))
    return fn, (q, k, v), allowed, area


def _biformer(n: int, n_win: int, topk: int):
    from attnkit.ops.routed.biformer import bi_level_routing_attention

    side = math.isqrt(n)
    q, k, v = (t.view(B, side, side, H, D) for t in _qkv(n))

    def fn():
        return bi_level_routing_attention(q, k, v, n_win, topk, scale=D ** -0.5).view(B, n, H, D)

    def allowed(rows):
        _, lay = bi_level_routing_attention(q, k, v, n_win, topk, scale=D ** -0.5, return_layout=True)
        pos = torch.arange(n)
        reg = (pos // side) // (side // n_win) * n_win + (pos % side) // (side // n_win)  # raster -> region
        return lay[0, 0][reg[rows]][:, reg].unsqueeze(0).expand(H, -1, -1)

    return fn, tuple(t.view(B, n, H, D) for t in (q, k, v)), allowed, n * topk * (n // n_win ** 2)


def _s2(n: int, bs: int, local: int, vert: int):
    from attnkit.ops.per_head.s2 import s2_attention, s2_layout

    q, k, v = _qkv(n)
    lay = s2_layout(H, -(-n // bs), local, vert)  # (H, nb, nb)

    def allowed(rows):
        keys = torch.arange(n)
        return lay[:, rows // bs][:, :, keys // bs] & (keys[None, None] <= rows[None, :, None])

    full = lay.sum().item() * bs * bs  # causal diagonal tiles are half full
    area = (full - lay.diagonal(dim1=1, dim2=2).sum().item() * bs * (bs - 1) / 2) / H
    return lambda: s2_attention(q, k, v, bs, local, vert), (q, k, v), allowed, int(area)


_MOA_ALPHAS = [256.0, 512.0, 1024.0, 2048.0, 0.0, 0.0, 128.0, 512.0]
_MOA_BETAS = [0.0, 0.0, 0.0, 0.0, 0.0625, 0.125, 0.03125, 0.0625]


def _moa(n: int, sink: int = 64):
    from attnkit.ops.per_head.moa import moa_attention, moa_spans

    q, k, v = _qkv(n)
    al, be = torch.tensor(_MOA_ALPHAS), torch.tensor(_MOA_BETAS)
    spans = moa_spans(al, be, n)

    def allowed(rows):
        t, u = rows[None, :, None], torch.arange(n)[None, None]
        return (u <= t) & ((t - u < spans.view(-1, 1, 1)) | (u < sink))

    t = torch.arange(n)
    area = sum(int((torch.minimum(t + 1, s) + (t - s + 1).clamp(0, sink).clamp_max(sink)).sum()) for s in spans) / H
    return lambda: moa_attention(q, k, v, al, be, sink=sink), (q, k, v), allowed, int(area)


_MAKERS = {"moba": _moba, "biformer": _biformer, "s2_attention": _s2, "moa": _moa}
# the path each mechanism's forward takes without autograd (the label shown in reports)
_IMPL = {"biformer": "block_gather", "s2_attention": "blocked", "moa": "blocked"}


def _setup(name: str, impl: str, args: tuple) -> Callable[[], Runner]:
    def setup() -> Runner:
        fn, (q, k, v), allowed, _ = _MAKERS[name](*args)
        if impl == "sdpa":
            qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, N, D)

            run = pass_fn(lambda: F.scaled_dot_product_attention(qh, kh, vh), "fwd")

            return Runner(run=run)

        run = pass_fn(fn, "fwd")

        return Runner(run=run, check=lambda: _check(run(), q, k, v, allowed))

    return setup


def _group(name: str, label: str, n: int, args: tuple, area: int, suites: set[str]) -> list[Case]:
    density = area / n / n
    params = (("N", n), ("B", B), ("H", H), ("D", D), ("dtype", "float32"), ("config", label),
              ("density", round(density, 6)), ("ideal_speedup", round(1 / density, 3)),
              ("baseline_group", f"full/N={n}"))
    group = f"{label}/N={n}"
    impl = _IMPL[name] if name != "moba" else ("dispatch" if args[-1] == "token" else "fused")
    return [
        Case(op=name, impl=impl, group=group, pass_="fwd", suites=frozenset(suites), params=params,
             flops=4.0 * B * H * D * area, setup=_setup(name, impl, args)),
        Case(op=name, impl="sdpa", group=group, pass_="fwd", suites=frozenset(suites), params=params,
             flops=4.0 * B * H * D * n * n, setup=_setup(name, "sdpa", args), baseline=True),
    ]


def _area(name: str, args: tuple) -> int:
    """The attended area without building inputs at discovery (closed forms of the makers)."""
    if name == "moba":
        n, bs, topk, _ = args
        return sum(min(topk - 1, t // bs) * bs + t % bs + 1 for t in range(n))
    if name == "biformer":
        n, n_win, topk = args
        return n * topk * (n // n_win ** 2)
    if name == "s2_attention":
        n, bs, local, vert = args
        from attnkit.ops.per_head.s2 import s2_layout

        lay = s2_layout(H, -(-n // bs), local, vert)
        return int((lay.sum().item() * bs * bs - lay.diagonal(dim1=1, dim2=2).sum().item() * bs * (bs - 1) / 2) / H)
    from attnkit.ops.per_head.moa import moa_spans

    n, sink = args[0], 64
    t = torch.arange(n)
    spans = moa_spans(torch.tensor(_MOA_ALPHAS), torch.tensor(_MOA_BETAS), n)
    return int(sum(int((torch.minimum(t + 1, s) + (t + 1 - s).clamp(0, sink)).sum()) for s in spans) / H)


def comparison(name: str, label: str, args: tuple, suites: set[str] | frozenset[str]) -> list[Case]:
    """Mechanism ``name`` (``"moba"``, ``"biformer"``, ``"s2_attention"``, ``"moa"``) with its
    maker's ``args`` (N first) vs dense SDPA: two cases of group ``label/N=...``."""
    return _group(name, label, args[0], args, _area(name, args), set(suites))


def cases() -> list[Case]:
    """Default: two cheap N=4096 cases; full and sparse: every mechanism at N=16384."""
    big = {"full", "sparse"}
    grid = [
        ("moba", "moba_block_b256_k3", (4096, 256, 3, "block"), {"default", "full"}),
        ("s2_attention", "s2_b64_l8_v8", (4096, 64, 8, 8), {"default", "full"}),
        ("moba", "moba_block_b512_k3", (16384, 512, 3, "block"), big),
        # token routing (the paper's rule) runs the key-major dispatch engine
        ("moba", "moba_token_b64_k3", (4096, 64, 3, "token"), {"full"}),
        ("moba", "moba_token_b512_k3", (16384, 512, 3, "token"), big),
        ("moba", "moba_block_b128_k12", (16384, 128, 12, "block"), big),
        ("biformer", "biformer_S8_k8", (16384, 8, 8), big),
        ("s2_attention", "s2_b64_l16_v8", (16384, 64, 16, 8), big),
        ("moa", "moa_8head_plan", (16384,), big),
    ]
    out = []
    for name, label, args, suites in grid:
        out.extend(comparison(name, label, args, suites))
    return out
