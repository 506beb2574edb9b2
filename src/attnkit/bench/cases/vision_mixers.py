"""Cases of the ``vision`` suite (token-mixer half): every channels-last vision token mixer at two
resolutions, forward and forward+backward, against timm's module where timm has it.

Groups ``<mechanism>/<Y>x<X>x<C>`` at ``56x56x96`` (stage 1 of a tiny model) and ``14x14x384`` (stage 3),
batch 2, fp32. Implementations: ``attnkit`` (the registered module, channels-last ``(B, Y, X, C)``) and
the baseline ``timm``, called the way timm's own blocks call it, in timm's layout, with the same weights
(``from_timm``):

* ``pool_mixer``: ``metaformer.Pooling`` on ``(B, C, Y, X)``;
* ``focal_modulation``: ``focalnet.FocalModulation`` on ``(B, C, Y, X)``;
* ``davit_channel``: ``davit.ChannelAttention`` on ``(B, N, C)``;
* ``davit_window``: ``davit.WindowAttention`` inside ``SpatialBlock``'s pad / window partition / reverse /
  crop on ``(B, Y, X, C)``;
* ``gcvit_global``: the stage's ``FeatureBlock`` (global queries, on ``(B, C, Y, X)``) and the block's
  window partition / ``WindowAttentionGlobal`` / reverse on ``(B, Y, X, C)``.

The issue's figure per group and pass is ``t(attnkit) / t(timm)`` (acceptance: <= 1.1). Mechanisms timm
does not have run alone (time, memory, GFLOP/s). Each attnkit case checks its output against the
registered fp64 reference once (untimed).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from attnkit.bench.case import Case, Runner, module_pass
from attnkit.bench.peers import import_timm
from attnkit.bench.suites import Suite, register_suite

try:
    VISION = register_suite(Suite(
        "vision", "vision token mixers and CNN attention blocks at two resolutions (56x56x96 and 14x14x384): time, "
                  "memory, GFLOP/s, vs timm where timm has the module",
        repeat=5, unit_budget_s=10.0, case_timeout_s=120.0))
except ValueError:  # registered by the CNN-block cases with other settings: keep theirs
    VISION = None

BATCH = 2
RESOLUTIONS = ((56, 96, 3), (14, 384, 12))  # (side, channels, heads): head width 32 as DaViT / GC ViT
WINDOW = 7


# ------------------------------------------------------------------------------------- the two sides


def _config(name: str, side: int, dim: int, heads: int) -> dict:
    cfg = {"input_size": (side, side), "batch": BATCH, "dim": dim}
    if name in ("davit_channel", "davit_window", "gcvit_global", "hat_ocab", "crossformer_lsda"):
        cfg["num_heads"] = heads
    if name in ("davit_window", "gcvit_global"):
        cfg["window_size"] = WINDOW
    if name == "gcvit_global":
        cfg["feat_levels"] = int(math.log2(side // WINDOW))
    return cfg


def _timm_side(name: str, cfg: dict):
    """``(timm_module, fn(x_timm_layout), to_timm_layout(x_channels_last))``: timm's module as timm's blocks call it."""
    timm = import_timm()
    dim, heads = cfg["dim"], cfg.get("num_heads")
    if name == "pool_mixer":
        t = timm.models.metaformer.Pooling(3)
        return t, t, lambda x: x.permute(0, 3, 1, 2).contiguous()
    if name == "focal_modulation":
        t = timm.models.focalnet.FocalModulation(dim, 3, 2)
        return t, t, lambda x: x.permute(0, 3, 1, 2).contiguous()
    if name == "davit_channel":
        t = timm.models.davit.ChannelAttention(dim, heads)
        return t, t, lambda x: x.flatten(1, 2).contiguous()
    if name == "davit_window":
        davit = timm.models.davit
        t = davit.WindowAttention(dim, (WINDOW, WINDOW), heads)

        def spatial(x):  # SpatialBlock's attention path on an LN-ed (B, Y, X, C) map (no padding needed here)
            Y, X, C = x.shape[1:]
            win = davit.window_partition(x, t.window_size).view(-1, WINDOW * WINDOW, C)
            out = t(win).view(-1, WINDOW, WINDOW, C)
            return davit.window_reverse(out, t.window_size, Y, X)
        return t, spatial, lambda x: x
    if name == "gcvit_global":
        gcvit = timm.models.gcvit
        attn = gcvit.WindowAttentionGlobal(dim, heads, (WINDOW, WINDOW), use_global=True)
        block = gcvit.FeatureBlock(dim, cfg["feat_levels"])
        holder = torch.nn.ModuleList([attn, block])

        def stage(x):  # the stage's global queries, then the block's window attention, as timm runs them
            qg = block(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            Y, X, C = x.shape[1:]
            win = gcvit.window_partition(x, (WINDOW, WINDOW)).view(-1, WINDOW * WINDOW, C)
            return gcvit.window_reverse(attn(win, qg), (WINDOW, WINDOW), (Y, X))
        return holder, stage, lambda x: x
    return None


def _from_timm(name: str, t: torch.nn.Module) -> torch.nn.Module:
    import attnkit as ak

    cls = ak.info(name).module
    if name == "gcvit_global":
        return cls.from_timm(t[0], t[1])
    return cls.from_timm(t)


# the channels-last token mixers this module benchmarks (the CNN blocks have their own cases)
MINE = ("pool_mixer", "focal_modulation", "davit_channel", "davit_window", "gcvit_global", "hat_channel", "hat_ocab",
        "crossformer_lsda", "maxim_gmlp", "maxim_cross_gating", "overlock_dynamic", "ninformer_gating")
TIMM_PEERS = ("pool_mixer", "focal_modulation", "davit_channel", "davit_window", "gcvit_global")


def setup_case(name: str, impl: str, side: int, dim: int, heads: int, pass_: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        import attnkit as ak
        from attnkit.bench.cases.mechanisms import check_against_reference

        spec = ak.info(name)
        cfg = spec.config(_config(name, side, dim, heads))
        torch.manual_seed(0)
        x = torch.randn(BATCH, side, side, dim, generator=torch.Generator().manual_seed(1))
        if name in TIMM_PEERS:
            t, fn, layout = _timm_side(name, cfg)
            t.eval()
            mine = spec.module.from_timm(t, dim) if name == "pool_mixer" else _from_timm(name, t)
        else:
            mine = spec.module(**spec.options(cfg))
        mine.eval()
        if impl == "timm":
            return Runner(run=module_pass(fn, layout(x), pass_))

        def check():
            return check_against_reference(spec, mine, (x.detach(),))[:2]

        return Runner(run=module_pass(mine, x, pass_), check=check,
                      check_vs="registered reference (spec.reference), fp64")

    return setup


def mechanisms() -> list[str]:
    import attnkit as ak

    registered = {s.name for s in ak.list_mechanisms(family="vision")}
    return [n for n in MINE if n in registered]


def cases() -> list[Case]:
    import attnkit as ak

    out = []
    for name in mechanisms():
        spec = ak.info(name)
        for side, dim, heads in RESOLUTIONS:
            cfg = spec.config(_config(name, side, dim, heads))
            try:
                flops = float(spec.flops(cfg))
            except Exception:  # a config the mechanism cannot take at this size: no case
                continue
            group = f"{name}/{side}x{side}x{dim}"
            params = (("B", BATCH), ("Y", side), ("X", side), ("C", dim), ("dtype", "float32"))
            impls = ("attnkit", "timm") if name in TIMM_PEERS else ("attnkit",)
            for pass_ in ("fwd", "fwd+bwd"):
                for impl in impls:
                    out.append(Case(op=name, impl=impl, group=group, pass_=pass_, suites=frozenset({"vision"}),
                                    params=params, flops=flops,
                                    setup=setup_case(name, impl, side, dim, heads, pass_),
                                    baseline=impl == "timm", requires="timm" if impl == "timm" else None))
    return out
