"""Cases of the ``vision`` suite for MaxViT multi-axis attention ("MaxViT: Multi-Axis Vision Transformer",
arXiv 2204.01697), against timm's ``maxxvit`` with the same weights.

Groups ``maxvit_attention/<Y>x<X>x<C>`` at ``56x56x96`` and ``14x14x384`` (the resolutions of the other
vision mixers, batch 2, fp32, head width 32), block and grid partitions ``P = G = 7``, forward and
forward+backward. Implementations: ``attnkit`` (``MultiAxisAttention`` on ``(B, Y, X, C)``) and the
baseline ``timm``: the attention path of timm's block- and grid-partition ``PartitionAttentionCl``
(partition -> ``AttentionCl`` with ``RelPosBias`` -> reverse, block then grid), which is what
``MultiAxisAttention.from_timm`` copies; timm's norms, MLPs and residuals are outside both sides.
The issue's figure per group and pass is ``t(attnkit) / t(timm)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnkit.bench.case import Case, Runner, module_pass
from attnkit.bench.cases.vision_mixers import BATCH, RESOLUTIONS
from attnkit.bench.peers import import_timm, timm_installed

NAME = "maxvit_attention"
PARTITION = 7


def _config(side: int, dim: int, heads: int) -> dict:
    return {"input_size": (side, side), "batch": BATCH, "dim": dim, "num_heads": heads,
            "block_size": PARTITION, "grid_size": PARTITION}


def _timm_pair(dim: int, heads: int) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """timm's block and grid ``PartitionAttentionCl`` and their attention path, block then grid."""
    mx = import_timm().models.maxxvit
    cfg = mx.MaxxVitTransformerCfg(dim_head=dim // heads, window_size=(PARTITION, PARTITION))
    pair = torch.nn.ModuleList([mx.PartitionAttentionCl(dim, "block", cfg=cfg),
                                mx.PartitionAttentionCl(dim, "grid", cfg=cfg)]).eval()
    return pair, lambda x: pair[1]._partition_attn(pair[0]._partition_attn(x))


def setup_case(impl: str, side: int, dim: int, heads: int, pass_: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        import attnkit as ak
        from attnkit.bench.cases.mechanisms import check_against_reference

        spec = ak.info(NAME)
        torch.manual_seed(0)
        x = torch.randn(BATCH, side, side, dim, generator=torch.Generator().manual_seed(1))
        if impl == "timm":
            return Runner(run=module_pass(_timm_pair(dim, heads)[1], x, pass_))
        if timm_installed():  # timm's weights (the same function as the baseline); else a fresh module
            pair = _timm_pair(dim, heads)[0]
            mine = spec.module.from_timm(pair[0], pair[1]).eval()
        else:
            mine = spec.module(**spec.options(spec.config(_config(side, dim, heads)))).eval()

        def check():
            return check_against_reference(spec, mine, (x.detach(),))[:2]

        return Runner(run=module_pass(mine, x, pass_), check=check,
                      check_vs="registered reference (spec.reference), fp64")

    return setup


def cases() -> list[Case]:
    import attnkit as ak

    if NAME not in {s.name for s in ak.list_mechanisms()}:
        return []
    spec = ak.info(NAME)
    out = []
    for side, dim, heads in RESOLUTIONS:
        cfg = spec.config(_config(side, dim, heads))
        group = f"{NAME}/{side}x{side}x{dim}"
        params = (("B", BATCH), ("Y", side), ("X", side), ("C", dim), ("H", heads), ("P", PARTITION),
                  ("dtype", "float32"))
        for pass_ in ("fwd", "fwd+bwd"):
            for impl in ("attnkit", "timm"):
                out.append(Case(op=NAME, impl=impl, group=group, pass_=pass_, suites=frozenset({"vision"}),
                                params=params, flops=float(spec.flops(cfg)),
                                setup=setup_case(impl, side, dim, heads, pass_),
                                baseline=impl == "timm",
                                requires="timm" if impl == "timm" else None))
    return out
