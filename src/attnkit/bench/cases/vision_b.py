"""Cases of the ``vision`` suite for settings the generic vision cases do not take: MAXIM's cross-gating block on
two different streams and CrossFormer's padded (dense-prediction) groups.

Groups ``<mechanism>/<Y>x<X>x<C>/<variant>`` at ``56x56x96`` and ``14x14x384``, batch 2, fp32, forward and
forward+backward (the gradient of every input), implementation ``attnkit``; each case checks its output against
the registered fp64 reference once (untimed). The plain single-input cases of ``ninformer_gating``,
``crossformer_lsda`` and ``maxim_cross_gating`` come from ``vision_mixers`` / ``vision_more``.

* ``maxim_cross_gating/.../two-stream-b<b>``: ``m(x, y, return_both=True)``, x and y different maps;
* ``crossformer_lsda/.../<mode>-G8-pad``: group side 8 (interval for LDA: ``ceil(side / 8)``), so the 14 x 14
  map is padded to 16 x 16 and cropped (the 56 x 56 one divides evenly: the padding-free cost to compare).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnkit.bench.case import Case, Runner, pass_with_random_grad
from attnkit.bench.cases.vision_more import BATCH, variant_cases


def _variants(name: str, side: int, dim: int, heads: int) -> list[tuple[str, dict]]:
    if name == "maxim_cross_gating":
        b = 8 if side % 8 == 0 else 7
        return [(f"two-stream-b{b}", {"dim": dim, "block_size": b, "grid_size": b})]
    if name == "crossformer_lsda":
        return [(f"{mode}-G8-pad", {"dim": dim, "num_heads": heads, "group_size": 8, "mode": mode, "pad": True})
                for mode in ("short", "long")]
    return []


def setup_case(name: str, options: dict, side: int, dim: int, pass_: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        import attnkit as ak
        from attnkit.bench.cases.mechanisms import check_against_reference

        spec = ak.info(name)
        torch.manual_seed(0)
        mine = spec.module(**options).eval()
        gen = torch.Generator().manual_seed(1)
        inputs = [torch.randn(BATCH, side, side, dim, generator=gen)]
        if name == "maxim_cross_gating":
            inputs.append(torch.randn(BATCH, side, side, dim, generator=gen))
            fn = lambda: torch.cat(mine(*inputs, return_both=True), -1)  # noqa: E731  both outputs' gradients
        else:
            fn = lambda: mine(*inputs)  # noqa: E731
        if pass_ != "fwd":
            for t in inputs:
                t.requires_grad_()

        def check():
            return check_against_reference(spec, mine, tuple(t.detach() for t in inputs))[:2]

        return Runner(run=pass_with_random_grad(fn, pass_, inputs, seed=2), check=check,
                      check_vs="registered reference (spec.reference), fp64")

    return setup


def cases() -> list[Case]:
    # the flop count of maxim_cross_gating covers both streams
    return variant_cases(("maxim_cross_gating", "crossformer_lsda"), _variants, setup_case)
