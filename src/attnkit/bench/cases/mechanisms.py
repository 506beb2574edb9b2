"""One case per registered mechanism, from its spec's ``example`` / ``flops`` / ``default_config``.

The registry is data: a mechanism is benchmarked the moment it is registered. Each case
runs ``module(*inputs)`` of the spec's small example in fp32 (forward; forward+backward
through every parameter and float input in ``full``) and checks the fp32 output against the
mechanism's registered reference (``spec.reference(module, *inputs)``, a naive twin) computed
in fp64 on an fp64 copy of the module and inputs; a spec without a reference is checked against
the same module in fp64 (which measures rounding only, not correctness), and the report says
which (``error_vs``). ``default`` takes the forward of every mechanism (examples are small by
contract); ``quick`` the first three.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch

from attnkit.bench.case import Case, Runner


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _outputs(o)]
    return []


def _floating(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


REFERENCE_VS = "registered reference (spec.reference), fp64"
SELF_VS = "same module in fp64 (no registered reference)"


def _value(x: Any) -> str:
    """An enum's value (``Family.DENSE`` -> ``"dense"``) or the string itself."""
    return str(getattr(x, "value", x))


def check_against_reference(spec: Any, module: torch.nn.Module, inputs: tuple) -> tuple[float, float, str]:
    """``(max_abs, rel_rmse, what)``: ``module(*inputs)`` vs the spec's reference in fp64.

    The reference runs on an fp64 deep copy of ``module`` and fp64 copies of the float inputs, so
    it sees the same parameters; without ``spec.reference`` the fp64 copy itself is the reference.
    """
    ref_fn = getattr(spec, "reference", None)
    ref_mod = copy.deepcopy(module).double()
    ref_in = tuple(x.detach().double() if _floating(x) else x for x in inputs)
    with torch.no_grad():
        got = _outputs(module(*inputs))
        ref = _outputs(ref_fn(ref_mod, *ref_in) if ref_fn is not None else ref_mod(*ref_in))
    if len(got) != len(ref):
        raise ValueError(f"{len(got)} outputs but the reference gave {len(ref)}")
    err = max((a.double() - b).abs().max().item() for a, b in zip(got, ref))
    num = sum((a.double() - b).pow(2).sum().item() for a, b in zip(got, ref))
    den = sum(b.double().pow(2).sum().item() for b in ref)
    return err, (num / max(den, 1e-300)) ** 0.5, REFERENCE_VS if ref_fn is not None else SELF_VS


def _setup(name: str, pass_: str):
    def setup() -> Runner:
        import attnkit as ak

        spec = ak.info(name)
        module, inputs = spec.example(None)
        module = module.float()
        inputs = tuple(x.float() if _floating(x) else x for x in inputs)
        if pass_ == "fwd":
            module.eval()

            def run() -> Any:
                with torch.no_grad():
                    return module(*inputs)
        else:
            inputs = tuple(x.detach().requires_grad_(True) if _floating(x) else x for x in inputs)
            wrt = [p for p in module.parameters() if p.requires_grad] + [x for x in inputs if _floating(x)]
            outs = _outputs(module(*inputs))
            g = torch.Generator().manual_seed(0)
            grads = [torch.randn(o.shape, generator=g) for o in outs if o.requires_grad]

            def run() -> Any:
                o = [t for t in _outputs(module(*inputs)) if t.requires_grad]
                return torch.autograd.grad(o, wrt, grads, allow_unused=True)

        def check() -> tuple[float, float]:
            return check_against_reference(spec, module, inputs)[:2]

        vs = REFERENCE_VS if getattr(spec, "reference", None) is not None else SELF_VS
        return Runner(run=run, check=check, check_vs=vs)

    return setup


def cases() -> list[Case]:
    """A forward case per mechanism (default, full; quick: first three) and a fwd+bwd one (full)."""
    import attnkit as ak

    out = []
    for i, spec in enumerate(ak.list_mechanisms()):
        cfg = dict(spec.default_config)
        try:
            flops = float(spec.flops(cfg))
        except Exception:
            flops = 0.0  # a flops() that fails is reported as "no FLOP figure", not a crash
        family = _value(spec.family)
        params = (("family", family), ("config", json.dumps(cfg, sort_keys=True, default=str)),
                  ("dtype", "float32"), *((k, cfg[k]) for k in ("N", "B", "H", "D") if k in cfg))
        for pass_ in ("fwd", "fwd+bwd"):
            suites = {"full"} | ({"default"} | ({"quick"} if i < 3 else set()) if pass_ == "fwd" else set())
            out.append(Case(op=spec.name, impl="module", group=f"{family}/{spec.name}", pass_=pass_,
                            suites=frozenset(suites), params=params, flops=flops, setup=_setup(spec.name, pass_)))
    return out
