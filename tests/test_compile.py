"""``torch.compile(fullgraph=True)`` of the mha, neighborhood_2d and linear_attention modules.

No graph break in the op path (the finite check no longer syncs with the host; the dispatchers
choose traceable backends while compiling): compiled output equals eager on one small case each.
"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mha", "neighborhood_2d", "linear_attention"])
def test_compile_fullgraph_matches_eager(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m, inputs = ak.info(name).example(tiny=True)
    m.eval()
    with torch.no_grad():
        eager = m(*inputs)
        explained = torch._dynamo.explain(m)(*inputs)
        assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(*inputs)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
