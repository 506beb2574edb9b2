"""Context parallelism on ``torch.distributed`` (``docs/design.md`` §8): one sequence split over P processes.

Every op takes THIS rank's shard of the sequence, heads-last ``(B, N_local, H, D)``, inside an
initialised process group (gloo on CPU, nccl on GPU; ``group=None`` is the default group), and
returns this rank's shard of the result. The backward runs the transposed communication, so every
rank must backpropagate through its output.

* :func:`ring_attention` — Ring Attention (arXiv 2310.01889): K/V travel round the ring, partial
  results merge in log-sum-exp form; ``layout="zigzag"`` balances causal work (:mod:`.zigzag`).
* :func:`ulysses_attention` — DeepSpeed-Ulysses (arXiv 2309.14509): all-to-all from sequence to
  heads, any ``ak.masks`` mask over the whole sequence, all-to-all back.
* :func:`usp_attention` — USP (arXiv 2405.07719): Ulysses inside ``make_usp_groups(pu, pr)``'s
  head groups, ring across them.
* :func:`lasp2_linear_attention` — LASP-2 (arXiv 2502.07563): linear attention with one all-gather
  of D x Dv states per direction, independent of N.
* :func:`lasp2h_attention` — LASP-2H: the softmax layers of a hybrid, K/V all-gathered.

Try them without ``torchrun``: :func:`attnkit.distributed.launch.run_local` runs a function on P
local gloo processes (that is how the tests compare every op with the single-process result).

Example (inside each of P processes):
    >>> from attnkit.distributed import ring_attention, zigzag
    >>> q_loc, k_loc, v_loc = (zigzag.shard(t, rank, world, "zigzag") for t in (q, k, v))
    >>> o_loc = ring_attention(q_loc, k_loc, v_loc, causal=True, layout="zigzag")
"""

from attnkit.distributed import zigzag
from attnkit.distributed.cad import cad_attention, contiguous_plan, plan_cad, simulate
from attnkit.distributed.lasp2 import lasp2_comm_elements, lasp2_linear_attention
from attnkit.distributed.lasp2h import lasp2h_attention, lasp2h_comm_elements
from attnkit.distributed.launch import run_local
from attnkit.distributed.offload import OffloadedAttention, serve
from attnkit.distributed.ring import ring_attention
from attnkit.distributed.ulysses import ulysses_attention
from attnkit.distributed.usp import make_usp_groups, usp_attention, usp_shard, usp_unshard

__all__ = [
    "OffloadedAttention",
    "cad_attention",
    "contiguous_plan",
    "lasp2_comm_elements",
    "lasp2_linear_attention",
    "lasp2h_attention",
    "lasp2h_comm_elements",
    "make_usp_groups",
    "plan_cad",
    "ring_attention",
    "run_local",
    "serve",
    "simulate",
    "ulysses_attention",
    "usp_attention",
    "usp_shard",
    "usp_unshard",
    "zigzag",
]
