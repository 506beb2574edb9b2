"""Cases for ``attnkit.analysis.capture``: what recording attention costs in memory.

A 6-layer stack of attnkit ``mha`` blocks (width 256, 8 heads of 32, pre-norm residual) runs forward on one
sequence of N tokens (N = 1024, 4096), in inference mode:

* ``none``: no capture (the baseline);
* ``cls_row+col_sum``: every layer's [CLS] row and per-head column sums (attention received), the
  reductions recomputed in blocks of 256 query rows: O(N·H) stored per layer, O(256·N·H) transient;
* ``probs_1layer``: the full ``(B, H, N, N)`` maps of the last layer only: O(N²·H) for one layer.

The harness reports peak RSS per case (fresh process); ``stored_MiB`` in the params is what the capture
holds after the pass. ``attnkit bench --suite analysis`` runs them (~1-2 min on 2 cores).
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.bench.case import Case, Runner
from attnkit.bench.suites import Suite, register_suite

ANALYSIS = register_suite(Suite(
    "analysis", "attention capture memory: 6-layer attnkit mha stack (width 256, 8 heads) at N=1024/4096, no "
                "capture vs [CLS] row + column sums (O(N·H)) vs full maps of one layer (O(N²·H)); peak RSS",
    repeat=3, min_repeat=2, warmup_s=0.0, unit_budget_s=30.0, case_timeout_s=300.0, memory=True))

LAYERS, DIM, HEADS = 6, 256, 8
KEEP = {"none": None, "cls_row+col_sum": ("cls_row", "col_sum"), "probs_1layer": ("probs",)}


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        from attnkit.mechanisms.mha import MultiHeadAttention

        self.norm = nn.LayerNorm(DIM)
        self.attn = MultiHeadAttention(DIM, HEADS)

    def forward(self, x):
        return x + self.attn(self.norm(x))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[_Block() for _ in range(LAYERS)]).eval()


def _setup(impl: str, n: int):
    def setup() -> Runner:
        from attnkit.analysis import capture

        model = build_model()
        x = torch.randn(1, n, DIM, generator=torch.Generator().manual_seed(1))
        keep = KEEP[impl]
        stored: dict[str, float] = {}

        def run():
            with torch.inference_mode():
                if keep is None:
                    return model(x)
                layers = [-1] if impl == "probs_1layer" else None
                with capture(model, layers=layers, keep=keep) as maps:
                    out = model(x)
                stored["stored_MiB"] = maps.nbytes() / 2 ** 20
                return out
        run()
        return Runner(run=run, params={"stored_MiB": round(stored.get("stored_MiB", 0.0), 3)})
    return setup


def cases() -> list[Case]:
    out = []
    for n in (1024, 4096):
        flops = LAYERS * (2 * n * DIM * 4 * DIM + 4 * n * n * DIM)                  # projections + QK^T and PV
        for impl in KEEP:
            params = (("N", n), ("B", 1), ("layers", LAYERS), ("dim", DIM), ("H", HEADS), ("dtype", "float32"),
                      ("keep", impl))
            out.append(Case(op="analysis_capture", impl=impl, group=f"mha_stack_L{LAYERS}/N={n}", pass_="fwd",
                            suites=frozenset({"analysis"}), params=params, flops=flops, setup=_setup(impl, n),
                            baseline=impl == "none"))
    return out
