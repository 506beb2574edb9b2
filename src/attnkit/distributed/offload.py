"""Attention offloading: the KV cache and decode attention live in worker processes (Lamina).

"Efficient and Economic Large Language Model Inference with Attention Offloading", arXiv 2405.01814
(§3-4): decode attention is memory-bound, so it runs next to the KV cache on memory-rich devices while
the model's projections and FFNs run elsewhere; the cache may be spread over several such devices,
each returning a partial ``(o_s, lse_s)`` that is merged exactly by log-sum-exp (Lean Attention,
arXiv 2405.10480 §3.2).

Protocol, over ``torch.distributed`` point-to-point messages (gloo on one machine, nccl across GPUs:
the same calls, tensors on the group's device):

* the model process (:class:`OffloadedAttention`) sends each worker a header ``int64 (9,)`` (op,
  layer, B, Nq, Hq, Hkv, D, Dv, whether this worker receives the step's new keys and values), then
  ``q (B, Nq, Hq, D)``, and to ONE worker the step's new ``k, v (B, Nq, Hkv, D|Dv)``;
* :meth:`OffloadedAttention.fill` ships a prompt's keys and values once, spread over the workers;
* each worker (:func:`serve`) appends the new keys and values to its own :class:`KVCache`, attends
  (:func:`attnkit.ops.decode.decode_attention`, causal among the new queries on the worker that holds
  them, every older token visible) and sends back ``out (B, Nq, Hq, Dv)`` and ``lse (B, Nq, Hq)``
  (float32);
* the model merges the partials; with one worker the worker's output is returned as it is, so it
  equals in-process ``decode_attention`` over the same cache bit for bit.

New tokens go to the workers in turn, a step at a time, so the cache spreads evenly over them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnkit.ops.decode.cache import KVCache
from attnkit.ops.decode.call import decode_attention
from attnkit.ops.decode.split_kv import merge_splits, split_kv_attention

_STEP, _STOP, _FILL = 1, 2, 3
_HEADER = 9


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class OffloadedAttention:
    """The model side of offloaded decode attention.

    Args:
        workers: ranks of the processes running :func:`serve` (each holds part of every layer's cache).
        group: the process group (default: the default group).
        device: where messages are staged (``"cpu"`` for gloo, the rank's GPU for nccl).

    ``bytes_sent`` / ``bytes_received`` count every message, headers included.

    Example (rank 0; ranks 1..W run ``serve(0)``):
        >>> att = OffloadedAttention([1, 2])
        >>> out = att.step(layer, q, k_new, v_new)     # (B, Nq, Hq, Dv)
        >>> att.close()
    """

    def __init__(self, workers: list[int], *, group=None, device: str | torch.device = "cpu"):
        if not workers:
            raise ValueError("OffloadedAttention: workers must name at least one rank")
        self.workers = [int(w) for w in workers]
        self.group = group
        self.device = torch.device(device)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.steps: dict[int, int] = {}
        self.closed = False

    def step(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """Append ``k_new (B, Nq, Hkv, D)``, ``v_new (B, Nq, Hkv, Dv)`` to ``layer``'s remote cache and attend from
        ``q (B, Nq, Hq, D)`` (the same tokens, causal) over the whole remote cache; returns ``(B, Nq, Hq, Dv)``."""
        if self.closed:
            raise ValueError("OffloadedAttention.step: closed")
        for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"OffloadedAttention.step: {name} must be a 4-D (B, N, H, D) tensor")
        b, nq, hq, d = q.shape
        if k_new.shape[:2] != (b, nq) or v_new.shape[:3] != k_new.shape[:3] or k_new.shape[3] != d:
            raise ValueError(f"OffloadedAttention.step: k_new {tuple(k_new.shape)} / v_new {tuple(v_new.shape)} "
                             f"must hold the {nq} new tokens of q {tuple(q.shape)}")
        hkv, dv = k_new.shape[2], v_new.shape[3]
        n = self.steps.get(layer, 0)
        owner = self.workers[n % len(self.workers)]
        self.steps[layer] = n + 1
        q, k_new, v_new = (t.to(self.device).contiguous() for t in (q, k_new, v_new))
        for w in self.workers:
            head = torch.tensor([_STEP, layer, b, nq, hq, hkv, d, dv, int(w == owner)], dtype=torch.long,
                                device=self.device)
            self._send(head, w)
            self._send(q, w)
            if w == owner:
                self._send(k_new, w)
                self._send(v_new, w)
        outs, lses = [], []
        for w in self.workers:
            o = torch.empty(b, nq, hq, dv, dtype=q.dtype, device=self.device)
            lse = torch.empty(b, nq, hq, dtype=torch.float32, device=self.device)
            self._recv(o, w)
            self._recv(lse, w)
            outs.append(o), lses.append(lse)
        if len(outs) == 1:
            return outs[0]
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, _ = merge_splits(torch.stack([o.to(work) for o in outs]), torch.stack([x.to(work) for x in lses]))
        return out.to(q.dtype)

    def fill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prefill ``layer``'s remote cache with ``k (B, N, Hkv, D)``, ``v (B, N, Hkv, Dv)`` without attending
        (the prompt's own attention ran elsewhere); the tokens are spread evenly over the workers."""
        if self.closed:
            raise ValueError("OffloadedAttention.fill: closed")
        b, n, hkv, d = k.shape
        dv = v.shape[-1]
        bounds = [n * i // len(self.workers) for i in range(len(self.workers) + 1)]
        for w, a, e in zip(self.workers, bounds, bounds[1:]):
            head = torch.tensor([_FILL, layer, b, e - a, 0, hkv, d, dv, 1], dtype=torch.long, device=self.device)
            self._send(head, w)
            self._send(k[:, a:e].to(self.device).contiguous(), w)
            self._send(v[:, a:e].to(self.device).contiguous(), w)

    def close(self) -> None:
        """Tell every worker to stop (its :func:`serve` returns)."""
        if self.closed:
            return
        for w in self.workers:
            self._send(torch.tensor([_STOP] + [0] * (_HEADER - 1), dtype=torch.long, device=self.device), w)
        self.closed = True

    def _send(self, t: torch.Tensor, dst: int) -> None:
        dist.send(t, dst, group=self.group)
        self.bytes_sent += _nbytes(t)

    def _recv(self, t: torch.Tensor, src: int) -> None:
        dist.recv(t, src, group=self.group)
        self.bytes_received += _nbytes(t)


def serve(model_rank: int = 0, *, group=None, device: str | torch.device = "cpu", dtype=torch.float32) -> dict:
    """The worker side: hold a :class:`KVCache` per layer and answer the model's steps until it closes.

    Args:
        model_rank: the rank of the :class:`OffloadedAttention` process.
        dtype: dtype of q, k and v on the wire (the model's).

    Returns:
        ``{"steps": answered steps, "tokens": cached tokens per layer, "cache_bytes": bytes held}``.
    """
    device = torch.device(device)
    cache = KVCache()
    steps = 0
    head = torch.empty(_HEADER, dtype=torch.long, device=device)
    while True:
        dist.recv(head, model_rank, group=group)
        op, layer, b, nq, hq, hkv, d, dv, owns = head.tolist()
        if op == _STOP:
            break
        if op == _FILL:
            k = torch.empty(b, nq, hkv, d, dtype=dtype, device=device)
            v = torch.empty(b, nq, hkv, dv, dtype=dtype, device=device)
            dist.recv(k, model_rank, group=group)
            dist.recv(v, model_rank, group=group)
            cache.append(layer, k, v)
            continue
        q = torch.empty(b, nq, hq, d, dtype=dtype, device=device)
        dist.recv(q, model_rank, group=group)
        if owns:
            k = torch.empty(b, nq, hkv, d, dtype=dtype, device=device)
            v = torch.empty(b, nq, hkv, dv, dtype=dtype, device=device)
            dist.recv(k, model_rank, group=group)
            dist.recv(v, model_rank, group=group)
            cache.append(layer, k, v)
        has = layer < len(cache.layers) and cache.layers[layer].k is not None and cache.get_seq_length(layer) > 0
        if has:
            keys, values = cache.keys(layer), cache.values(layer)
            if owns:   # this step's tokens are the last nq here: causal among them
                out, lse = decode_attention(q, keys, values, return_lse=True)
            else:      # only older tokens here: every query sees all of them
                out, lse = split_kv_attention(q, keys, values, None, scale=d ** -0.5)
        else:
            out = torch.zeros(b, nq, hq, dv, dtype=dtype, device=device)
            lse = torch.full((b, nq, hq), float("-inf"), dtype=torch.float32, device=device)
        dist.send(out.contiguous(), model_rank, group=group)
        dist.send(lse.to(torch.float32).contiguous(), model_rank, group=group)
        steps += 1
    return {"steps": steps, "tokens": [lay.length for lay in cache.layers], "cache_bytes": cache.used_bytes()}
