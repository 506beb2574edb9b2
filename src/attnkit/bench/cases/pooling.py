"""Cases for the registered pooling modules (output without a position per token): their default examples.

Groups ``pooling/<name>/<input shape>`` (float32, fwd and fwd+bwd; fwd+bwd takes the gradient of the input and
every parameter), in the ``vision`` suite (``spp``, ``slot_attention``) or the ``cross`` suite (``filip``,
``greenplm_pool``):

* ``attnkit``: the registered module at ``spec.default_config`` on ``spec.example()``'s input;
* ``naive`` (baseline, fwd only: the twins' backward is slow, 20 s for slot attention): the spec's registered
  reference (plain torch, the test oracle) on the same module and input.

The suites are registered by their own case modules; this one only tags its cases.
"""

from __future__ import annotations

from typing import Any

import torch

from attnkit.bench.case import Case, Runner

POOLING = {"spp": "vision", "slot_attention": "vision", "filip": "cross", "greenplm_pool": "cross"}


def _setup(name: str, impl: str, pass_: str):
    def setup() -> Runner:
        import attnkit as ak

        spec = ak.info(name)
        torch.manual_seed(0)
        module, inputs = spec.example(generator=torch.Generator().manual_seed(1))
        module = module.float().eval()

        def forward(*xs: torch.Tensor) -> torch.Tensor:
            return module(*xs) if impl == "attnkit" else spec.reference(module, *xs)

        if pass_ == "fwd":
            def run() -> Any:
                with torch.no_grad():
                    return forward(*inputs)
        else:
            xs = tuple(x.detach().requires_grad_() for x in inputs)
            wrt = list(xs) + [p for p in module.parameters() if p.requires_grad]
            grad = torch.randn(spec.out_shape(spec.config()), generator=torch.Generator().manual_seed(2))

            def run() -> Any:
                return torch.autograd.grad(forward(*xs), wrt, grad, allow_unused=True)

        def check() -> tuple[float, float]:
            with torch.no_grad():
                got = module(*inputs).double()
                ref = spec.reference(module.double(), *(x.double() for x in inputs)).double()
            module.float()
            err = (got - ref).abs().max().item()
            return err, ((got - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-300)).sqrt().item()

        return Runner(run=run, check=check if impl == "attnkit" else None,
                      check_vs="registered reference (spec.reference), fp64" if impl == "attnkit" else None)

    return setup


def cases() -> list[Case]:
    import attnkit as ak

    out = []
    for name, suite in POOLING.items():
        spec = ak.info(name)
        cfg = spec.config()
        shape = "x".join(map(str, spec.input_shape(cfg)))
        try:
            flops = float(spec.flops(cfg))
        except Exception:
            flops = 0.0  # a flops() that fails is reported as "no FLOP figure", not a crash
        params = (("input", shape), ("output", "x".join(map(str, spec.out_shape(cfg)))), ("dtype", "float32"))
        for pass_ in ("fwd", "fwd+bwd"):
            for impl in ("attnkit", "naive") if pass_ == "fwd" else ("attnkit",):
                out.append(Case(op=name, impl=impl, group=f"pooling/{name}/{shape}", pass_=pass_,
                                suites=frozenset({suite}), params=params, flops=flops,
                                setup=_setup(name, impl, pass_), baseline=impl == "naive"))
    return out
