"""Cases of the ``vision`` suite for the CNN attention blocks and deformable attention, at two resolutions.

Groups ``<name>/<Y>x<X>x<C>/B=<B>`` at 56x56x96 and 14x14x384 (batch 8, float32, fwd and fwd+bwd; fwd+bwd takes the
gradient of the input and every parameter):

* ``eca``: ``attnkit`` (:class:`EfficientChannelAttention` built ``from_timm``) vs ``timm`` (``timm.layers.EcaModule``,
  the baseline);
* ``ela``: ``attnkit`` (``from_timm``: timm's configuration and weights) vs ``timm``
  (``timm.layers.coord_attn.EfficientLocalAttn``, the baseline), and ``attnkit_paper`` (ELA-B as the paper: shared
  conv and norm, no SiLU) for reference;
* ``lka``: ``attnkit`` alone (no peer has VAN's LKA);
* ``deformable_2d`` (op, 8 heads, 4 points, one level): ``fused`` and ``sparse`` vs ``grid_sample`` (the Deformable
  DETR PyTorch formulation, baseline); ``deformable_3d`` (16 depth bins): ``sparse`` vs ``grid_sample`` on the
  materialised volume (baseline).

The issue's figures: ``t(attnkit) / t(timm)`` per group and pass (<= 1.1) and ``t(fused) / t(grid_sample)`` on
fwd+bwd (<= 1).
"""

from __future__ import annotations

import importlib

import torch

from attnkit.bench.case import Case, Runner, pass_fn
from attnkit.bench.peers import import_timm
from attnkit.bench.suites import Suite, register_suite

try:
    VISION = register_suite(Suite(
        "vision", "vision token mixers and CNN attention blocks at two resolutions (56x56x96 and 14x14x384): time, "
                  "memory, GFLOP/s, vs timm where timm has the module",
        repeat=5, unit_budget_s=10.0, case_timeout_s=120.0))
except ValueError:  # registered first by the token-mixer cases, with the same settings
    VISION = None

SIZES = ((56, 56, 96), (14, 14, 384))
BATCH = 8
HEADS, POINTS, DEPTH_BINS = 8, 4, 16


def _module_setup(name: str, impl: str, size, pass_: str):
    def setup() -> Runner:
        import attnkit as ak

        Y, X, C = size
        torch.manual_seed(0)
        peer = None
        if name == "eca":
            if impl != "attnkit_paper":
                peer = import_timm().layers.EcaModule(C)
            module = peer if impl == "timm" else ak.info("eca").module.from_timm(peer)
        elif name == "ela":
            if impl == "attnkit_paper":
                module = ak.get("ela", channels=C, variant="B")
            else:
                import_timm()
                peer = importlib.import_module("timm.layers.coord_attn").EfficientLocalAttn(C)
                module = peer if impl == "timm" else ak.info("ela").module.from_timm(peer)
        else:
            module = ak.get(name, channels=C)
        x = torch.randn(BATCH, C, Y, X, generator=torch.Generator().manual_seed(1))
        inputs = [x.requires_grad_()] if pass_ == "fwd+bwd" else [x]
        wrt = inputs + [p for p in module.parameters()] if pass_ == "fwd+bwd" else []
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)) if pass_ == "fwd+bwd" else None
        run = pass_fn(lambda: module(x), pass_, wrt, g)
        check = None
        if peer is not None and impl != "timm":
            def check():
                with torch.no_grad():
                    a, b = module(x).double(), peer(x).double()
                return (a - b).abs().max().item(), ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
        return Runner(run=run, check=check, check_vs="the timm module, fp32" if check else None)

    return setup


def _deformable_inputs(size, depth: bool):
    Y, X, C = size
    g = torch.Generator().manual_seed(0)
    D, N = C // HEADS, Y * X
    value = torch.randn(BATCH, N, HEADS, D, generator=g)
    loc = torch.rand(BATCH, N, HEADS, 1, POINTS, 3 if depth else 2, generator=g)
    attn = torch.rand(BATCH, N, HEADS, 1, POINTS, generator=g).softmax(-1)
    dp = torch.rand(BATCH, N, HEADS, DEPTH_BINS, generator=g).softmax(-1) if depth else None
    return value, loc, attn, dp


def _deformable_setup(depth: bool, impl: str, size, pass_: str):
    def setup() -> Runner:
        from attnkit.ops.sampling import deformable_attention, deformable_attention_3d

        Y, X, _ = size
        value, loc, attn, dp = _deformable_inputs(size, depth)
        ts = [value, loc, attn] + ([dp] if depth else [])
        if pass_ == "fwd+bwd":
            for t in ts:
                t.requires_grad_()

        def fn(backend=impl, v=value, d=dp, lo=loc, a=attn):
            if depth:
                return deformable_attention_3d(v, d, [(Y, X)], lo, a, backend=backend)
            return deformable_attention(v, [(Y, X)], lo, a, backend=backend)

        g = torch.randn(value.shape[0], Y * X, *value.shape[2:], generator=torch.Generator().manual_seed(3))
        run = pass_fn(fn, pass_, ts if pass_ == "fwd+bwd" else (), g)

        def check():  # one example, fp64, against the grid_sample formulation
            with torch.no_grad():
                a = fn(impl, value[:1].detach().double(), None if dp is None else dp[:1].detach().double(),
                       loc[:1].detach().double(), attn[:1].detach().double())
                b = fn("grid_sample", value[:1].detach().double(), None if dp is None else dp[:1].detach().double(),
                       loc[:1].detach().double(), attn[:1].detach().double())
            return (a - b).abs().max().item(), ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()

        return Runner(run=run, check=None if impl == "grid_sample" else check,
                      check_vs="the grid_sample formulation, fp64, one example")

    return setup


def _flops(name: str, size) -> float:
    import attnkit as ak

    Y, X, C = size
    if name.startswith("deformable"):
        return float(BATCH * Y * X * HEADS * POINTS * (4 * 2 * (C // HEADS) + (16 if name.endswith("3d") else 12)))
    cfg = {"channels": C, "batch": BATCH, "input_size": (Y, X)}
    return ak.info(name).flops(cfg)


def cases() -> list[Case]:
    out = []
    suites = frozenset({"vision"})
    groups = [("eca", ("timm", "attnkit")), ("ela", ("timm", "attnkit", "attnkit_paper")), ("lka", ("attnkit",)),
              ("deformable_2d", ("grid_sample", "fused", "sparse")), ("deformable_3d", ("grid_sample", "sparse"))]
    for size in SIZES:
        Y, X, C = size
        for name, impls in groups:
            for impl in impls:
                for pass_ in ("fwd", "fwd+bwd"):
                    if name.startswith("deformable"):
                        setup = _deformable_setup(name.endswith("3d"), impl, size, pass_)
                    else:
                        setup = _module_setup(name, impl, size, pass_)
                    params = (("B", BATCH), ("Y", Y), ("X", X), ("C", C), ("dtype", "float32"))
                    if name.startswith("deformable"):
                        params += (("heads", HEADS), ("points", POINTS)) + ((("depth_bins", DEPTH_BINS),)
                                                                             if name.endswith("3d") else ())
                    out.append(Case(op=name, impl=impl, group=f"{name}/{Y}x{X}x{C}/B={BATCH}", pass_=pass_,
                                    suites=suites, params=params, flops=_flops(name, size), setup=setup,
                                    baseline=impl in ("timm", "grid_sample"),
                                    requires="timm" if impl == "timm" or (impl == "attnkit" and name in ("eca", "ela"))
                                    else None))
    return out
