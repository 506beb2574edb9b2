"""Cases of the ``vision`` suite for ACMIL's pooling, MEDUSA's multi-scale gate, RISurConv's surface attention
and CSA's class-semantic gates, each at two sizes in its paper's setting.

Groups ``<mechanism>/<size>/<variant>``, fp32, forward and forward+backward, implementation ``attnkit`` (the
registered module built from its spec with the sizes below). None of them is in timm, so each runs alone
(time, memory, GFLOP/s); each case checks its output against the registered fp64 reference once (untimed).
ACMIL runs in training mode with a fixed seed (the masked path, reproducible for the check).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnkit.bench.case import Case, Runner, pass_with_random_grad

# name -> [(size label, variant label, config overrides: options and input sizes)]
SETTINGS: dict[str, list[tuple[str, str, dict]]] = {
    "acmil_pool": [
        ("N4096xC512", "M5-K10-p0.6", {"batch": 1, "seq_len": 4096, "dim": 512, "seed": 0}),
        ("N16384xC512", "M5-K10-p0.6", {"batch": 1, "seq_len": 16384, "dim": 512, "seed": 0}),
    ],
    "medusa": [  # the registered single-input form: the body reads x, head 0 gates x
        ("56x56x96", "Cb32-residual", {"batch": 2, "input_size": (56, 56), "dim": 96}),
        ("14x14x384", "Cb32-residual", {"batch": 2, "input_size": (14, 14), "dim": 384}),
    ],
    "risur_attention": [  # ModelNet40 layers: 512 reference points with 16 neighbours, 1024 with 32
        ("N512-k16", "E64-C64", {"batch": 4, "seq_len": 512, "k": 16, "out_dim": 64}),
        ("N1024-k32", "E64-C128", {"batch": 2, "seq_len": 1024, "k": 32, "out_dim": 128}),
    ],
    "class_semantic": [  # BMN-CSA: ActivityNet (T = 100) and THUMOS-14 (T = 256) snippet sequences
        ("T100xC256", "k3-concat", {"batch": 16, "seq_len": 100, "dim": 256}),
        ("T256xC512", "k3-concat", {"batch": 16, "seq_len": 256, "dim": 512}),
    ],
}


def setup_case(name: str, config: dict, pass_: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        import attnkit as ak
        from attnkit.bench.cases.mechanisms import check_against_reference

        spec = ak.info(name)
        torch.manual_seed(0)
        module, inputs = spec.example(config, generator=torch.Generator().manual_seed(1))
        if name != "acmil_pool":  # ACMIL keeps training mode: its masked path is the one of interest
            module.eval()
        if pass_ != "fwd":
            inputs[0].requires_grad_()

        def check():
            return check_against_reference(spec, module, tuple(x.detach() for x in inputs))[:2]

        run = pass_with_random_grad(lambda: module(*inputs), pass_, inputs[:1])
        return Runner(run=run, check=check, check_vs="registered reference (spec.reference), fp64")

    return setup


def cases() -> list[Case]:
    import attnkit as ak

    registered = {s.name for s in ak.list_mechanisms()}
    out = []
    for name, settings in SETTINGS.items():
        if name not in registered:
            continue
        spec = ak.info(name)
        for size, variant, config in settings:
            cfg = spec.config(config)
            group = f"{name}/{size}/{variant}"
            params = (*((k, str(v) if isinstance(v, tuple) else v) for k, v in config.items() if v is not None),
                      ("dtype", "float32"))
            for pass_ in ("fwd", "fwd+bwd"):
                out.append(Case(op=name, impl="attnkit", group=group, pass_=pass_, suites=frozenset({"vision"}),
                                params=params, flops=float(spec.flops(cfg)), setup=setup_case(name, config, pass_)))
    return out
