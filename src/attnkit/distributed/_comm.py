"""The collectives the context-parallel ops use, on any ``torch.distributed`` group (gloo or nccl).

None of them carries autograd: each op is one ``torch.autograd.Function`` whose backward calls
the transposed collective explicitly (autograd does not flow through ``dist`` calls to other ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_world(group=None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group size."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised (start with torchrun, or "
                           "attnkit.distributed.launch.run_local)")
    return dist.get_rank(group), dist.get_world_size(group)


def _global(group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


def all_gather_stack(x: torch.Tensor, group=None) -> torch.Tensor:
    """``(P, *x.shape)``: every rank's ``x`` in rank order (all ranks pass equal shapes)."""
    _, world = rank_world(group)
    out = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
    if x.device.type == "cuda":
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    else:  # gloo has no all_gather_into_tensor; the rows of `out` are the receive buffers
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
    return out


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group=None) -> torch.Tensor:
    """Split ``x`` into P equal pieces along ``scatter_dim``, send piece j to rank j, and concatenate
    the pieces received (in rank order) along ``gather_dim``."""
    _, world = rank_world(group)
    if world == 1:
        return x
    if x.shape[scatter_dim] % world:
        raise ValueError(f"all_to_all: dim {scatter_dim} of size {x.shape[scatter_dim]} does not split "
                         f"into {world} ranks")
    send = [p.contiguous() for p in x.chunk(world, dim=scatter_dim)]
    recv = [torch.empty_like(send[0]) for _ in range(world)]
    dist.all_to_all(recv, send, group=group)
    return torch.cat(recv, dim=gather_dim)


# ---- differentiable forms: autograd crosses ranks through these (backward = the transposed collective)

def reduce_scatter_stack(g: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``g (P, *shape)`` over ranks and return this rank's row (the transpose of the all-gather)."""
    _, world = rank_world(group)
    if world == 1:
        return g[0]
    g = g.contiguous()
    out = torch.empty_like(g[0])
    if g.device.type == "cuda":
        dist.reduce_scatter_tensor(out, g, group=group)
    else:  # gloo: the rows are the send buffers
        dist.reduce_scatter(out, list(g.unbind(0)), group=group)
    return out


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_stack(x, group) if rank_world(group)[1] > 1 else x[None]

    @staticmethod
    def backward(ctx, g):
        # rank s's x fed slot s on every rank: its gradient is slot s summed over ranks, which a
        # reduce-scatter delivers to its owner alone ((P-1)/P of the all-gather's volume)
        return reduce_scatter_stack(g, ctx.group), None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, g):
        s, gd = ctx.dims
        return all_to_all(g, gd, s, ctx.group), None, None, None


def all_gather_diff(x: torch.Tensor, group=None) -> torch.Tensor:
    """:func:`all_gather_stack` with a backward (a reduce-scatter of the gradient to each slot's owner)."""
    return _AllGather.apply(x, group)


def all_to_all_diff(x: torch.Tensor, scatter_dim: int, gather_dim: int, group=None) -> torch.Tensor:
    """:func:`all_to_all` with a backward (the all-to-all with the two dims swapped)."""
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


# ---- softmax context parallelism (ring / Ulysses / USP) helpers

def ring_shift_start(tensors: list[torch.Tensor], group=None):
    """Send every tensor to the next rank of the ring and receive the previous rank's, without waiting:
    returns ``(received, wait)`` at once, so the caller computes while the block travels; call
    ``wait()`` before reading ``received`` (and keep ``tensors`` unchanged until then). Sends and
    receives are posted together (``batch_isend_irecv``), so no ordering can deadlock."""
    rank, world = rank_world(group)
    if world == 1:
        return [t.clone() for t in tensors], lambda: None
    nxt, prv = _global(group, (rank + 1) % world), _global(group, (rank - 1) % world)
    send = [t.contiguous() for t in tensors]
    out = [torch.empty_like(t) for t in send]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in send]
    ops += [dist.P2POp(dist.irecv, o, prv, group) for o in out]
    reqs = dist.batch_isend_irecv(ops)

    def wait() -> None:
        for req in reqs:
            req.wait()
        send.clear()  # the send buffers may go now
    return out, wait


def check_group_shapes(op: str, values: dict[str, int], group=None, *, equal: tuple[str, ...] = (),
                       device=None) -> list[dict]:
    """All-gather a few ints per rank (one tiny collective) and raise the same ValueError on every rank
    when a value in ``equal`` differs between ranks. Returns every rank's values, in rank order.
    ``device``: where the collective runs (the inputs' device: nccl gathers only CUDA tensors)."""
    _, world = rank_world(group)
    names = list(values)
    mine = torch.tensor([int(values[n]) for n in names], dtype=torch.int64, device=device)
    rows = all_gather_stack(mine, group).tolist() if world > 1 else [mine.tolist()]
    per_rank = [dict(zip(names, r, strict=True)) for r in rows]
    for n in equal:
        seen = [r[n] for r in per_rank]
        if len(set(seen)) > 1:
            raise ValueError(f"{op}: {n} differs across ranks: {seen} (every rank must pass the same {n})")
    return per_rank


def needs_grad(*tensors: torch.Tensor) -> int:
    """1 when autograd will run a backward through any of ``tensors`` (grad mode on, one requires grad)."""
    return int(torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def check_same_shapes(op: str, group=None, **tensors: torch.Tensor) -> None:
    """Raise the same ValueError on every rank when the named tensors' shapes differ across ranks
    (ring passes and all-to-alls need equal shards; without this check they hang or fail obscurely).
    One all-gather of a fixed-width row per tensor (rank, then up to 8 sizes, -1 padded)."""
    _, world = rank_world(group)
    if world == 1:
        return
    if any(t.dim() > 8 for t in tensors.values()):
        raise ValueError(f"{op}: tensors of more than 8 dims are not supported")
    values = {f"{n}.{i}": (t.dim() if i < 0 else (t.shape[i] if i < t.dim() else -1))
              for n, t in tensors.items() for i in range(-1, 8)}
    # the backward is a collective: a rank runs it when grad mode is on and an input requires grad, so ranks
    # that disagree would hang in it; the flag travels with the shapes (no extra collective)
    values["requires_grad"] = needs_grad(*tensors.values())
    rows = check_group_shapes(op, values, group, device=_dev(group))
    flags = [bool(r["requires_grad"]) for r in rows]
    if len(set(flags)) > 1:
        raise ValueError(f"{op}: requires_grad of the inputs differs across ranks (per rank: {flags}); every rank "
                         f"must agree, since the backward is a collective that every rank runs")
    shapes = {n: [tuple(r[f"{n}.{i}"] for i in range(r[f"{n}.-1"])) for r in rows] for n in tensors}
    bad = "; ".join(f"{n}: {s}" for n, s in shapes.items() if len(set(s)) > 1)
    if bad:
        raise ValueError(f"{op}: every rank must pass shards of equal shape; got per rank {bad}")


def _dev(group=None) -> torch.device:
    """Where the group's collectives take tensors (nccl: the current CUDA device)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
