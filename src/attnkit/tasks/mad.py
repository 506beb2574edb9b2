"""Mechanistic Design and Scaling of Hybrid Architectures (MAD, arXiv 2403.17844), §3 and App. B: the six
synthetic token-manipulation tasks, one shrunken setting each so that a CPU trains them in minutes.

Every generator is ``fn(n, seed, **params) -> TaskBatch`` and draws from a private ``torch.Generator``:
the same arguments give the same batch. Token ids are laid out per task (content tokens first, special
tokens after them); :func:`vocab_size` of a task gives the embedding size a model needs.

Deviations from MAD, chosen for a CPU budget and a clean score: the recall tasks score every position whose
answer the inputs already determine (a key seen before), so 100% is attainable; noise tokens sit between
key-value pairs, never inside one; compression decodes every position from the last hidden state through a
small position-conditioned decoder (MAD's encoder-decoder readout, see ``attnkit.tasks.model``).
"""

from __future__ import annotations

import torch

from attnkit.tasks.batch import IGNORE, TaskBatch, count


def _frac(fn: str, arg: str, value: float) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{fn}: {arg} must be in [0, 1), got {value}")
    return float(value)


def _seen_before(keys: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``(n, P)`` bool: key ``keys[b, i]`` already occurred at some ``j < i`` in row ``b``."""
    onehot = torch.nn.functional.one_hot(keys, num_keys)  # (n, P, num_keys)
    before = onehot.cumsum(dim=1) - onehot  # occurrences strictly before i, (n, P, num_keys)
    return before.gather(2, keys.unsqueeze(-1)).squeeze(-1) > 0  # (n, P)


def in_context_recall(n: int, seed: int, *, vocab_size: int = 32, seq_len: int = 64) -> TaskBatch:
    """Key-value pairs ``k v k v ...`` from a mapping drawn per sequence; recall the value of a repeated key.

    Keys are ``[0, V/2)``, values ``[V/2, V)``; each sequence draws its own key -> value map and ``N/2``
    keys uniformly. Scored: every key position whose key occurred earlier (target: its value).

    Returns:
        :class:`TaskBatch`, ``inputs``/``targets`` ``(n, N)``.
    """
    n, seq_len = count("in_context_recall", "n", n, 1), count("in_context_recall", "seq_len", seq_len, 4)
    v = count("in_context_recall", "vocab_size", vocab_size, 4)
    if seq_len % 2:
        raise ValueError(f"in_context_recall: seq_len must be even, got {seq_len}")
    g = torch.Generator().manual_seed(int(seed))
    half = v // 2
    mapping = torch.randint(half, v, (n, half), generator=g)  # (n, V/2): key -> value
    keys = torch.randint(0, half, (n, seq_len // 2), generator=g)  # (n, P)
    inputs = torch.empty(n, seq_len, dtype=torch.long)
    inputs[:, 0::2] = keys
    inputs[:, 1::2] = mapping.gather(1, keys)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    targets[:, 0::2] = torch.where(_seen_before(keys, half), inputs[:, 1::2], IGNORE)
    return TaskBatch(inputs, targets)


def noisy_recall(n: int, seed: int, *, vocab_size: int = 32, seq_len: int = 64, noise_vocab_size: int = 8,
                 frac_noise: float = 0.4) -> TaskBatch:
    """In-context recall with noise tokens ``[V, V + noise_vocab_size)`` scattered between the pairs.

    ``round(frac_noise * N)`` positions (rounded so that the pairs fill the rest) hold noise the model must
    ignore. Scored: the key positions of repeated keys.
    """
    fn = "noisy_recall"
    n, seq_len, v = count(fn, "n", n, 1), count(fn, "seq_len", seq_len, 4), count(fn, "vocab_size", vocab_size, 4)
    nv = count(fn, "noise_vocab_size", noise_vocab_size, 1)
    n_noise = round(_frac(fn, "frac_noise", frac_noise) * seq_len)
    n_noise += (seq_len - n_noise) % 2  # the pairs take an even number of positions
    pairs = (seq_len - n_noise) // 2
    if pairs < 2:
        raise ValueError(f"{fn}: seq_len {seq_len} with frac_noise {frac_noise} leaves fewer than 2 pairs")
    g = torch.Generator().manual_seed(int(seed))
    half = v // 2
    mapping = torch.randint(half, v, (n, half), generator=g)  # (n, V/2)
    keys = torch.randint(0, half, (n, pairs), generator=g)  # (n, P)
    noise = torch.randint(v, v + nv, (n, n_noise), generator=g)  # (n, n_noise)
    # units: P pairs and n_noise noise tokens in a random order; a pair unit spans two positions
    is_pair = torch.zeros(n, pairs + n_noise, dtype=torch.bool)
    order = torch.rand(n, pairs + n_noise, generator=g).argsort(dim=1)[:, :pairs]  # (n, P)
    is_pair.scatter_(1, order, True)
    seen = _seen_before(keys, half)
    inputs = torch.empty(n, seq_len, dtype=torch.long)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    for b in range(n):  # lay out units left to right
        t = ip = inz = 0
        for unit in is_pair[b].tolist():
            if unit:
                k = int(keys[b, ip])
                inputs[b, t], inputs[b, t + 1] = k, mapping[b, k]
                if seen[b, ip]:
                    targets[b, t] = mapping[b, k]
                t, ip = t + 2, ip + 1
            else:
                inputs[b, t] = noise[b, inz]
                t, inz = t + 1, inz + 1
    return TaskBatch(inputs, targets)


def _motifs(g: torch.Generator, m: int, max_len: int, low: int, high: int, prefix_free: bool) -> list[tuple]:
    """``m`` distinct token tuples of length ``1..max_len`` over ``[low, high)``; optionally prefix-free."""
    out: list[tuple] = []
    tries = 0
    while len(out) < m:
        tries += 1
        if tries > 10000:
            raise ValueError(f"fuzzy_recall: cannot draw {m} distinct motifs of length <= {max_len} from "
                             f"{high - low} tokens")
        length = int(torch.randint(1, max_len + 1, (1,), generator=g))
        cand = tuple(torch.randint(low, high, (length,), generator=g).tolist())
        clash = any(cand == o or (prefix_free and (cand[:len(o)] == o or o[:len(cand)] == cand)) for o in out)
        if not clash:
            out.append(cand)
    return out


def fuzzy_recall(n: int, seed: int, *, vocab_size: int = 32, seq_len: int = 64, num_keys: int = 8,
                 key_len: int = 3, value_len: int = 3) -> TaskBatch:
    """Recall with multi-token keys and values: ``num_keys`` key motifs (1..``key_len`` tokens from
    ``[0, V/2)``, prefix-free) each bound to a value motif (1..``value_len`` tokens from ``[V/2, V)``).

    The sequence concatenates randomly chosen (key motif, value motif) pairs; a tail too short for the next
    pair holds the pad token ``V``. Scored: every position whose next token belongs to the value motif of a
    key motif seen earlier in the sequence (target: that next token).
    """
    fn = "fuzzy_recall"
    n, seq_len, v = count(fn, "n", n, 1), count(fn, "seq_len", seq_len, 4), count(fn, "vocab_size", vocab_size, 4)
    m, kl, vl = count(fn, "num_keys", num_keys, 1), count(fn, "key_len", key_len, 1), count(fn, "value_len",
                                                                                             value_len, 1)
    g = torch.Generator().manual_seed(int(seed))
    half = v // 2
    inputs = torch.full((n, seq_len), v, dtype=torch.long)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    for b in range(n):
        keys = _motifs(g, m, kl, 0, half, prefix_free=True)
        vals = _motifs(g, m, vl, half, v, prefix_free=False)
        t, seen = 0, set()
        while True:
            i = int(torch.randint(0, m, (1,), generator=g))
            pair = keys[i] + vals[i]
            if t + len(pair) > seq_len:
                break
            inputs[b, t:t + len(pair)] = torch.tensor(pair)
            if i in seen:  # predict each value token from the position before it
                start = t + len(keys[i]) - 1
                targets[b, start:start + len(vals[i])] = torch.tensor(vals[i])
            seen.add(i)
            t += len(pair)
    return TaskBatch(inputs, targets)


def selective_copying(n: int, seed: int, *, vocab_size: int = 16, seq_len: int = 64,
                      num_tokens: int = 8) -> TaskBatch:
    """Copy the content tokens, in order, that are scattered among blanks.

    The first ``N - num_tokens`` positions hold ``num_tokens`` content tokens ``[0, V)`` at random positions,
    the blank ``V`` elsewhere; then ``num_tokens`` copy tokens ``V + 1``. Scored: the copy positions
    (target at the ``j``-th: the ``j``-th content token).
    """
    fn = "selective_copying"
    n, seq_len, v = count(fn, "n", n, 1), count(fn, "seq_len", seq_len, 4), count(fn, "vocab_size", vocab_size, 2)
    k = count(fn, "num_tokens", num_tokens, 1)
    region = seq_len - k
    if region < k:
        raise ValueError(f"{fn}: seq_len must be >= 2 * num_tokens = {2 * k}, got {seq_len}")
    g = torch.Generator().manual_seed(int(seed))
    content = torch.randint(0, v, (n, k), generator=g)  # (n, k)
    pos = torch.rand(n, region, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values  # (n, k), increasing
    inputs = torch.full((n, seq_len), v, dtype=torch.long)
    inputs.scatter_(1, pos, content)
    inputs[:, region:] = v + 1
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    targets[:, region:] = content
    return TaskBatch(inputs, targets)


def compression(n: int, seed: int, *, vocab_size: int = 16, seq_len: int = 32) -> TaskBatch:
    """Reconstruct a random sequence from the model's state at its last position.

    ``N - 1`` random tokens ``[0, V)`` then the compression token ``V``. Targets: the ``N - 1`` tokens at
    their own positions; a model reads them out of the last position's hidden state only (``readout =
    "compress"`` in :data:`attnkit.tasks.TASKS`), so the sequence mixer must gather the whole sequence there.
    """
    fn = "compression"
    n, seq_len, v = count(fn, "n", n, 1), count(fn, "seq_len", seq_len, 2), count(fn, "vocab_size", vocab_size, 2)
    g = torch.Generator().manual_seed(int(seed))
    inputs = torch.randint(0, v, (n, seq_len), generator=g)
    inputs[:, -1] = v
    targets = inputs.clone()
    targets[:, -1] = IGNORE
    return TaskBatch(inputs, targets)


def memorization(n: int, seed: int, *, vocab_size: int = 256, seq_len: int = 32, mapping_seed: int = 0) -> TaskBatch:
    """Learn a fixed key -> value map in the weights: ``k1 I k2 I ...``, output ``map[k]`` at each ``I``.

    Keys ``[0, V/2)``, values ``[V/2, V)``, insert token ``V``. The map is drawn from ``mapping_seed`` (part
    of the task: training and test batches share it); ``seed`` draws the keys. Scored: the insert positions.
    """
    fn = "memorization"
    n, seq_len, v = count(fn, "n", n, 1), count(fn, "seq_len", seq_len, 2), count(fn, "vocab_size", vocab_size, 4)
    if seq_len % 2:
        raise ValueError(f"{fn}: seq_len must be even, got {seq_len}")
    half = v // 2
    mapping = torch.randint(half, v, (half,), generator=torch.Generator().manual_seed(int(mapping_seed)))
    g = torch.Generator().manual_seed(int(seed))
    keys = torch.randint(0, half, (n, seq_len // 2), generator=g)  # (n, P)
    inputs = torch.full((n, seq_len), v, dtype=torch.long)
    inputs[:, 0::2] = keys
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    targets[:, 1::2] = mapping[keys]
    return TaskBatch(inputs, targets)
