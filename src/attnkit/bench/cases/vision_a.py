"""Cases of the ``vision`` suite for ULSAM, BEVANet's SDLSKA (+ CKS) and OverLoCK's ContMix, at two resolutions.

Groups ``<name>/<Y>x<X>x<C>/B=<B>`` at 56x56x96 and 14x14x384 (batch 8, float32, fwd and fwd+bwd; fwd+bwd takes
the gradient of the input). No peer library ships these modules, so each group has the ``attnkit`` module alone
(training mode, as a training step runs it); ``overlock_dynamic`` also times its zero-padding border variant
(``attnkit_zero``) next to the authors' clamped windows (``attnkit``).
"""

from __future__ import annotations

import torch

from attnkit.bench.case import Case, Runner, module_pass
from attnkit.bench.suites import Suite, register_suite

try:
    register_suite(Suite(
        "vision", "vision token mixers and CNN attention blocks at two resolutions (56x56x96 and 14x14x384): time, "
                  "memory, GFLOP/s, vs timm where timm has the module",
        repeat=5, unit_budget_s=10.0, case_timeout_s=120.0))
except ValueError:  # registered first by another vision case module, with the same settings
    pass

SIZES = ((56, 56, 96), (14, 14, 384))
BATCH = 8
GROUPS = (("ulsam", ("attnkit",)), ("sdlska", ("attnkit",)), ("overlock_dynamic", ("attnkit", "attnkit_zero")))


def _setup(name: str, impl: str, size, pass_: str):
    def setup() -> Runner:
        import attnkit as ak

        Y, X, C = size
        torch.manual_seed(0)
        opts = {"border": "zero"} if impl == "attnkit_zero" else {}
        cnn = ak.info(name).input_kind.value == "cnn"
        module = ak.get(name, **{"channels" if cnn else "dim": C}, **opts)  # CNN blocks: channels; mixers: dim
        shape = (BATCH, C, Y, X) if cnn else (BATCH, Y, X, C)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        return Runner(run=module_pass(module, x, pass_))

    return setup


def _flops(name: str, size) -> float:
    import attnkit as ak

    Y, X, C = size
    spec = ak.info(name)
    cfg = {"channels" if spec.input_kind.value == "cnn" else "dim": C, "batch": BATCH, "input_size": (Y, X)}
    return spec.flops(cfg)


def cases() -> list[Case]:
    import attnkit as ak

    known = {s.name for s in ak.list_mechanisms()}
    out = []
    suites = frozenset({"vision"})
    for size in SIZES:
        Y, X, C = size
        for name, impls in GROUPS:
            if name not in known:
                continue
            for impl in impls:
                for pass_ in ("fwd", "fwd+bwd"):
                    params = (("B", BATCH), ("Y", Y), ("X", X), ("C", C), ("dtype", "float32"))
                    out.append(Case(op=name, impl=impl, group=f"{name}/{Y}x{X}x{C}/B={BATCH}", pass_=pass_,
                                    suites=suites, params=params, flops=_flops(name, size),
                                    setup=_setup(name, impl, size, pass_), baseline=impl == "attnkit"))
    return out
