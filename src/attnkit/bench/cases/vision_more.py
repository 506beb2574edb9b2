"""Cases of the ``vision`` suite for HAT, MAXIM, OverLoCK and CrossFormer token mixers in their papers' settings.

Groups ``<mechanism>/<Y>x<X>x<C>/<variant>`` at ``56x56x96`` and ``14x14x384``, batch 2, fp32, forward and
forward+backward, implementation ``attnkit`` (the registered module on channels-last ``(B, Y, X, C)``). None
of these modules is in timm, so each runs alone (time, memory, GFLOP/s); each case checks its output against
the registered fp64 reference once (untimed). The variant names the paper setting: HAT's window / overlap,
MAXIM's block and grid sides, OverLoCK's kernel sizes, CrossFormer's short / long distance groups.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnkit.bench.case import Case, Runner, module_pass

BATCH = 2
RESOLUTIONS = ((56, 96, 3), (14, 384, 12))  # (side, channels, heads): head width 32


def _variants(name: str, side: int, dim: int, heads: int) -> list[tuple[str, dict]]:
    """``[(variant, options)]`` for one mechanism at one resolution (sizes that divide the map)."""
    if name == "hat_channel":
        return [("beta3-gamma30", {"dim": dim, "compress_ratio": 3, "squeeze_factor": 30})]
    if name == "hat_ocab":
        M, ratio = (8, 0.5) if side % 8 == 0 else (7, 0.3)  # Mo = 12 / 9: centred key windows
        return [(f"M{M}-Mo{M + int(ratio * M)}", {"dim": dim, "num_heads": heads, "window_size": M,
                                                  "overlap_ratio": ratio})]
    if name in ("maxim_gmlp", "maxim_cross_gating"):
        b = 8 if side % 8 == 0 else 7
        return [(f"b{b}-g{b}", {"dim": dim, "block_size": b, "grid_size": b})]
    if name == "overlock_dynamic":
        return [("k13-k7", {"dim": dim, "num_heads": heads, "kernel_sizes": (13, 7)})]
    if name == "crossformer_lsda":
        return [(f"{mode}-G7", {"dim": dim, "num_heads": heads, "group_size": 7, "mode": mode})
                for mode in ("short", "long")]
    return []


MINE = ("hat_channel", "hat_ocab", "maxim_gmlp", "maxim_cross_gating", "overlock_dynamic", "crossformer_lsda")


def setup_case(name: str, options: dict, side: int, dim: int, pass_: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        import attnkit as ak
        from attnkit.bench.cases.mechanisms import check_against_reference

        spec = ak.info(name)
        torch.manual_seed(0)
        mine = spec.module(**options).eval()
        x = torch.randn(BATCH, side, side, dim, generator=torch.Generator().manual_seed(1))

        def check():
            return check_against_reference(spec, mine, (x.detach(),))[:2]

        return Runner(run=module_pass(mine, x, pass_), check=check,
                      check_vs="registered reference (spec.reference), fp64")

    return setup


def variant_cases(names: tuple[str, ...], variants: Callable[[str, int, int, int], list[tuple[str, dict]]],
                  setup: Callable[[str, dict, int, int, str], Callable[[], Runner]]) -> list[Case]:
    """``attnkit`` cases of the registered vision mechanisms among ``names``: one group per (resolution,
    variant) of ``variants(name, side, dim, heads)``, forward and forward+backward, built by ``setup``."""
    import attnkit as ak

    registered = {s.name for s in ak.list_mechanisms(family="vision")}
    out = []
    for name in (n for n in names if n in registered):
        spec = ak.info(name)
        for side, dim, heads in RESOLUTIONS:
            for variant, options in variants(name, side, dim, heads):
                cfg = spec.config({**options, "input_size": (side, side), "batch": BATCH})
                try:
                    flops = float(spec.flops(cfg))
                except Exception:  # a setting the mechanism cannot take at this size: no case
                    continue
                group = f"{name}/{side}x{side}x{dim}/{variant}"
                params = (("B", BATCH), ("Y", side), ("X", side), ("C", dim), ("dtype", "float32"))
                for pass_ in ("fwd", "fwd+bwd"):
                    out.append(Case(op=name, impl="attnkit", group=group, pass_=pass_, suites=frozenset({"vision"}),
                                    params=params, flops=flops, setup=setup(name, options, side, dim, pass_)))
    return out


def cases() -> list[Case]:
    return variant_cases(MINE, _variants, setup_case)
