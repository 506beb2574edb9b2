"""Zoology: Measuring and Improving Recall in Efficient Language Models (arXiv 2312.04927), §3: multi-query
associative recall (MQAR).

A sequence opens with ``K`` key-value pairs ``k_1 v_1 ... k_K v_K`` (keys from the lower half of the
vocabulary, values from the upper half, both drawn without replacement), then a query region where every
key appears once more, at even offsets whose gaps follow a power law (most queries come soon after the
context, a few far away). At a query the model must output the value that followed that key in the
context; only those positions are scored. The other positions of the query region hold random tokens from
the whole vocabulary, as in Zoology, so a model cannot simply count positions.
"""

from __future__ import annotations

import torch

from attnkit.tasks.batch import IGNORE, TaskBatch, count


def _power_law_slots(n: int, slots: int, k: int, power_a: float, g: torch.Generator) -> torch.Tensor:
    """``k`` distinct slot indices in ``[0, slots)`` per row, weighted ``p(s) ∝ (s + 1) ** (power_a - 1)``.

    Gumbel top-k draws without replacement in proportion to the weights, exactly like drawing one slot at a
    time and renormalising (Zoology's ``np.random.choice(replace=False, p=...)``), but vectorised.
    """
    logp = (power_a - 1.0) * torch.log(torch.arange(1, slots + 1, dtype=torch.float64))  # (slots,)
    u = torch.rand(n, slots, generator=g, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(u))  # (n, slots)
    return torch.topk(logp + gumbel, k, dim=1).indices  # (n, k)


def _distinct(n: int, low: int, high: int, k: int, g: torch.Generator) -> torch.Tensor:
    """``k`` distinct integers in ``[low, high)`` per row, uniformly: a random permutation's first ``k``."""
    return torch.rand(n, high - low, generator=g).argsort(dim=1)[:, :k] + low  # (n, k)


def mqar(n: int, seed: int, *, vocab_size: int = 256, seq_len: int = 256, num_kv_pairs: int = 16,
         power_a: float = 0.01, random_fill: bool = True) -> TaskBatch:
    """``n`` MQAR sequences drawn from ``seed`` (same arguments, same batch).

    Args:
        n: number of sequences.
        seed: seeds a private ``torch.Generator``; the global RNG is untouched.
        vocab_size: keys come from ``[1, vocab_size // 2)``, values from ``[vocab_size // 2, vocab_size)``;
            token 0 is the filler when ``random_fill`` is False.
        seq_len: ``N``; needs ``N >= 4 K`` (the query region has room for every key at an even offset).
        num_kv_pairs: ``K``.
        power_a: power-law exponent of the query gaps (Zoology uses 0.01).
        random_fill: fill non-query positions of the query region with random tokens (Zoology's default).

    Returns:
        :class:`TaskBatch` with ``inputs`` ``(n, N)`` and ``targets`` ``(n, N)``: the value at each query
        position, :data:`IGNORE` elsewhere (``K`` scored positions per sequence).
    """
    n = count("mqar", "n", n, 1)
    seq_len = count("mqar", "seq_len", seq_len, 4)
    k = count("mqar", "num_kv_pairs", num_kv_pairs, 1)
    vocab_size = count("mqar", "vocab_size", vocab_size, 4)
    if seq_len < 4 * k:
        raise ValueError(f"mqar: seq_len must be >= 4 * num_kv_pairs = {4 * k}, got {seq_len}")
    if vocab_size // 2 - 1 < k:
        raise ValueError(f"mqar: vocab_size {vocab_size} has {vocab_size // 2 - 1} keys, fewer than "
                         f"num_kv_pairs={k}")
    if not 0.0 < power_a <= 1.0:
        raise ValueError(f"mqar: power_a must be in (0, 1], got {power_a}")
    g = torch.Generator().manual_seed(int(seed))
    half = vocab_size // 2
    keys = _distinct(n, 1, half, k, g)  # (n, K)
    values = _distinct(n, half, vocab_size, k, g)  # (n, K)
    ctx = 2 * k
    slots = (seq_len - ctx) // 2  # query i sits at ctx + 2 * slot_i
    slot = _power_law_slots(n, slots, k, power_a, g)  # (n, K)
    if random_fill:
        inputs = torch.randint(0, vocab_size, (n, seq_len), generator=g)
    else:
        inputs = torch.zeros(n, seq_len, dtype=torch.long)
    inputs[:, 0:ctx:2] = keys
    inputs[:, 1:ctx:2] = values
    qpos = ctx + 2 * slot  # (n, K)
    inputs.scatter_(1, qpos, keys)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    targets.scatter_(1, qpos, values)
    return TaskBatch(inputs, targets)
