"""Capture attention probabilities from attnkit modules, transformers models and timm ViTs.

Fast attention paths never form the probability matrix, so :func:`capture` recomputes it through the
reference formula ``softmax(q k^T * scale + mask)``, only for the layers and heads asked for, while the
model's own output still comes from its usual path. What is kept per layer is chosen by ``keep``:

* ``"probs"``     ``(B, h, Nq, Nk)``   the full maps of the selected heads (O(N^2 h) memory);
* ``"head_mean"`` ``(B, Nq, Nk)``      mean over the selected heads (O(N^2));
* ``"cls_row"``   ``(B, h, Nk)``       the row of query ``query_index`` (the [CLS] row, O(N h));
* ``"col_sum"``   ``(B, h, Nk)``       attention received by each key, summed over queries (O(N h));
* ``"entropy"``   ``(B, h, Nq)``       the entropy of every row, nats (O(N h)).

The reductions are accumulated over blocks of ``chunk`` query rows, so asking only for ``cls_row``,
``col_sum`` or ``entropy`` never holds more than ``chunk x Nk`` probabilities per head at once.

Where the probabilities come from:

* attnkit modules that call ``ak.attention`` (``mha``, ``single_head``, ...): the op is wrapped while
  the context is open; each call recomputes its rows with the call's own mask and scale;
* transformers models: an attention function registered as ``"attnkit_capture"`` is set on the model
  for the duration of the context; it records, then runs the model's previous implementation;
* timm ViTs (``timm.layers.Attention`` and kin): ``fused_attn`` is switched off on the selected layers
  and the probabilities are read at the input of ``attn_drop``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from attnkit._validate import int_arg

KEEP = ("probs", "head_mean", "cls_row", "col_sum", "entropy")
_CAPTURE_IMPL = "attnkit_capture"


class AttentionMaps:
    """What :func:`capture` recorded: per layer (in call order) the kept quantities.

    ``maps.layers`` lists the layer names that produced maps; ``maps.get(layer, kind)`` returns one
    quantity (``layer`` an index into the model's attention layers or a name); ``maps.probs()`` is the
    list of ``(B, h, Nq, Nk)`` maps in layer order, the input of ``rollout``/``flow``.
    """

    def __init__(self, all_layers: list[str], selected: list[str], heads: list[int] | None, keep: tuple[str, ...]):
        self.all_layers = all_layers
        self.selected = selected
        self.heads = heads
        self.keep = keep
        self.data: dict[str, dict[str, torch.Tensor]] = {}
        self.num_heads: dict[str, int] = {}

    @property
    def layers(self) -> list[str]:
        return [n for n in self.all_layers if n in self.data] + [n for n in self.data if n not in self.all_layers]

    def _name(self, layer: int | str) -> str:
        if isinstance(layer, str):
            if layer in self.data:
                return layer
            raise KeyError(f"AttentionMaps: layer {layer!r} produced no map (recorded: {self.layers})")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"AttentionMaps: layer must be an int index or a name, got {type(layer).__name__}")
        names = self.all_layers or self.layers
        if not -len(names) <= layer < len(names):
            raise KeyError(f"AttentionMaps: layer {layer} does not exist (the model has {len(names)} attention "
                           f"layers: 0..{len(names) - 1})")
        name = names[layer]
        if name not in self.data:
            raise KeyError(f"AttentionMaps: layer {layer} ({name!r}) produced no map: it was not selected or never "
                           f"ran (recorded: {self.layers})")
        return name

    def get(self, layer: int | str, kind: str = "probs") -> torch.Tensor:
        """One kept quantity of one layer (see the module docstring for shapes)."""
        name = self._name(layer)
        if kind not in self.data[name]:
            raise KeyError(f"AttentionMaps: map {kind!r} of layer {name!r} was never produced "
                           f"(kept: {sorted(self.data[name])}; pass keep=(..., {kind!r}) to capture)")
        return self.data[name][kind]

    def probs(self) -> list[torch.Tensor]:
        """The ``(B, h, Nq, Nk)`` maps of every recorded layer, in layer order."""
        return [self.get(n, "probs") for n in self.layers]

    def nbytes(self) -> int:
        """Bytes held by the recorded tensors."""
        return sum(t.numel() * t.element_size() for d in self.data.values() for t in d.values())

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"AttentionMaps(layers={len(self.data)}, keep={self.keep}, heads={self.heads})"


# ---- the reducer: rows of probabilities in, kept quantities out -----------------------------------------

class _Recorder:
    def __init__(self, maps: AttentionMaps, query_index: int, chunk: int, modules: dict[int, str]):
        self.maps, self.query_index, self.chunk = maps, query_index, chunk
        self.modules = modules                   # id(attention module) -> layer name, selected layers only

    def wants(self, module: nn.Module) -> str | None:
        return self.modules.get(id(module))

    def _heads(self, name: str, h: int) -> list[int] | None:
        self.maps.num_heads[name] = h
        heads = self.maps.heads
        if heads is not None:
            bad = [i for i in heads if not -h <= i < h]
            if bad:
                raise ValueError(f"capture: head {bad[0]} does not exist in layer {name!r} ({h} heads: 0..{h - 1})")
            return [i % h for i in heads]
        return None

    def record_rows(self, name: str, rows) -> None:
        """``rows``: an iterable of ``(q0, p)`` with ``p (B, H, c, Nk)`` the probabilities of rows ``q0:q0+c``."""
        keep, out = self.maps.keep, {}
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("probs", "head_mean", "entropy")}
        col = cls = None
        for q0, p in rows:
            sel = self._heads(name, p.shape[1])
            p = p if sel is None else p[:, sel]                                   # (B, h, c, Nk)
            if "probs" in keep:
                parts["probs"].append(p)
            if "head_mean" in keep:
                parts["head_mean"].append(p.mean(1))                                # (B, c, Nk)
            if "entropy" in keep:
                parts["entropy"].append(-(p * torch.log(p.clamp_min(1e-30))).sum(-1))  # (B, h, c)
            if "col_sum" in keep:
                s = p.sum(2)                                                        # (B, h, Nk)
                col = s if col is None else col + s
            if "cls_row" in keep and q0 <= self.query_index < q0 + p.shape[2]:
                cls = p[:, :, self.query_index - q0].clone()                         # (B, h, Nk)
        for k in ("probs", "entropy"):
            if parts[k]:
                out[k] = torch.cat(parts[k], -1 if k == "entropy" else 2)
        if parts["head_mean"]:
            out["head_mean"] = torch.cat(parts["head_mean"], 1)
        if col is not None:
            out["col_sum"] = col
        if "cls_row" in keep:
            if cls is None:
                raise ValueError(f"capture: query_index {self.query_index} is outside layer {name!r}'s query rows")
            out["cls_row"] = cls
        self.maps.data[name] = out

    def record_qk(self, name: str, q: torch.Tensor, k: torch.Tensor, scale: float, mask_rows=None) -> None:
        """Recompute from heads-first ``q (B, H, Nq, D)``, ``k (B, Hkv, Nk, D)``; ``mask_rows(q0, q1)`` returns a
        bool (True = attend) or float additive mask broadcastable to ``(B, H, q1 - q0, Nk)``, or None."""
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        q, k = q.detach().to(work), k.detach().to(work)
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)                  # (B, H, Nk, D): GQA groups
        sel = self._heads(name, q.shape[1])
        if sel is not None:                                                         # recompute only these heads
            q, k = q[:, sel], k[:, sel]
        saved, self.maps.heads = self.maps.heads, None

        def rows():
            nq = q.shape[2]
            step = nq if "probs" in self.maps.keep or "head_mean" in self.maps.keep else self.chunk
            for q0 in range(0, nq, step):
                q1 = min(nq, q0 + step)
                s = torch.matmul(q[:, :, q0:q1], k.transpose(-1, -2)) * scale       # (B, h, c, Nk)
                m = None if mask_rows is None else mask_rows(q0, q1)
                if m is not None:
                    s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(work)
                p = torch.softmax(s, -1)
                yield q0, torch.nan_to_num(p, nan=0.0)                             # fully masked rows -> 0
        try:
            with torch.no_grad():
                self.record_rows(name, rows())
        finally:
            self.maps.heads = saved
        self.maps.num_heads[name] = len(sel) if sel is not None else q.shape[1]


_ACTIVE: list[_Recorder] = []      # open captures, outermost first; every one records what it selected
_RUNNING: list[nn.Module] = []      # attnkit attention modules running now (innermost last)


# ---- transformers -------------------------------------------------------------------------------------

def _hf_capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: record (when a capture is open), then run the previous implementation."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = getattr(module, "_attnkit_capture_previous", "sdpa")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5

    def mask_rows(q0, q1):
        return None if attention_mask is None else attention_mask[..., q0:q1, :key.shape[2]]
    for rec in _ACTIVE:
        name = rec.wants(module)
        if name is not None:
            rec.record_qk(name, query, key, scale, mask_rows)                     # query (B, H, Nq, D)
    if previous == "eager":
        mod = sys.modules[type(module).__module__]
        fn = getattr(mod, "eager_attention_forward", None) or ALL_ATTENTION_FUNCTIONS["sdpa"]
    else:
        fn = ALL_ATTENTION_FUNCTIONS[previous]
    return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _register_hf() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(_CAPTURE_IMPL, _hf_capture_attention)
    # the capture function accepts the same masks as sdpa (bool, True = attend, or None)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_CAPTURE_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "set_attn_implementation") and hasattr(model, "config")


def _hf_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # transformers attention modules carry ``scaling`` and ``is_causal`` and pass themselves to the function
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "scaling") and hasattr(m, "is_causal")]


# ---- timm ---------------------------------------------------------------------------------------------

def _timm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)]


# ---- attnkit modules ----------------------------------------------------------------------------------

def _ak_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from attnkit.ops.dense.call import attention

    out = []
    for n, m in model.named_modules():
        mod = sys.modules.get(type(m).__module__)
        fn = getattr(mod, "attention", None) if mod is not None else None
        while hasattr(fn, "_attnkit_wrapped"):                                   # see through capture/edit wrappers
            fn = fn._attnkit_wrapped
        if type(m).__module__.startswith("attnkit.") and fn is attention:
            out.append((n, m))
    return out


def _ak_wrapper(inner):
    from attnkit.ops.dense.call import make_call

    def attention(q, k, v, mask=None, *, scale=None, backend=None, return_lse=False):
        out = inner(q, k, v, mask, scale=scale, backend=backend, return_lse=return_lse)
        recs = [(r, r.wants(_RUNNING[-1])) for r in _ACTIVE] if _RUNNING else []
        recs = [(r, n) for r, n in recs if n is not None]
        if recs:
            call = make_call(q, k, v, mask, scale=scale)
            m = call.mask

            def mask_rows(q0, q1):
                if m is None:
                    return None
                return m.tile(q0, q1, torch.arange(call.nk), call.nq, call.nk).to(q.device)
            for rec, name in recs:
                rec.record_qk(name, q.transpose(1, 2), k.transpose(1, 2), call.scale, mask_rows)  # (B, H, N, D)
        return out
    attention._attnkit_wrapped = inner
    attention._attnkit_capture = True
    return attention


def _track_layers(found, stack: list[nn.Module]) -> list:
    """Hooks keeping ``stack[-1]`` = the attention module running now; returns their removers."""
    def push(mod, _args):
        stack.append(mod)

    def pop(_mod, _args, _out):
        stack.pop()
    out = []
    for _, m in found:
        out += [m.register_forward_pre_hook(push).remove, m.register_forward_hook(pop).remove]
    return out


def attention_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s attention layers that :func:`capture` can record, in module order."""
    return [n for n, _ in _find_layers(model)[1]]


def _find_layers(model: nn.Module) -> tuple[str, list[tuple[str, nn.Module]]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture: model must be an nn.Module, got {type(model).__name__}")
    if _is_hf(model):
        return "transformers", _hf_layers(model)
    timm_layers = _timm_layers(model)
    if timm_layers:
        return "timm", timm_layers
    ak_layers = _ak_layers(model)
    if ak_layers:
        return "attnkit", ak_layers
    raise ValueError(f"capture: found no attention layer in {type(model).__name__} (supported: attnkit modules "
                     "calling ak.attention, transformers models, timm ViT Attention)")


def _select(names: list[str], layers) -> list[str]:
    if layers is None:
        return list(names)
    if isinstance(layers, (int, str)):
        layers = [layers]
    out = []
    for ly in layers:
        if isinstance(ly, str):
            if ly not in names:
                raise ValueError(f"capture: layer {ly!r} does not exist (attention layers: {names})")
            out.append(ly)
        elif isinstance(ly, int) and not isinstance(ly, bool):
            if not -len(names) <= ly < len(names):
                raise ValueError(f"capture: layer {ly} does not exist (the model has {len(names)} attention layers: "
                                 f"0..{len(names) - 1})")
            out.append(names[ly])
        else:
            raise TypeError(f"capture: layers must hold ints or names, got {type(ly).__name__}")
    return out


@contextlib.contextmanager
def capture(model: nn.Module, layers: int | str | Sequence[int | str] | None = None,
            heads: Sequence[int] | None = None, keep: str | Sequence[str] = ("probs",), *,
            query_index: int = 0, chunk: int = 256) -> Iterator[AttentionMaps]:
    """Record attention probabilities of ``model`` while the context is open.

    Args:
        model: an attnkit module (or a model built of them), a transformers ``PreTrainedModel`` or a timm ViT.
        layers: attention layers to record: indices into :func:`attention_layers` (negative allowed) or names;
            None = all.
        heads: head indices kept in every recorded layer; None = all.
        keep: what to keep per layer: any of ``"probs" (B, h, Nq, Nk)``, ``"head_mean" (B, Nq, Nk)``,
            ``"cls_row" (B, h, Nk)``, ``"col_sum" (B, h, Nk)``, ``"entropy" (B, h, Nq)``.
        query_index: the query row kept by ``"cls_row"``.
        chunk: query rows recomputed at once for the row reductions (bounds the transient memory).

    Yields:
        :class:`AttentionMaps`, filled as the model runs.

    Example:
        >>> with capture(model, layers=[-1], keep=("cls_row", "col_sum")) as maps:
        ...     model(x)
        >>> maps.get(-1, "cls_row").shape      # (B, H, N)
    """
    keep = (keep,) if isinstance(keep, str) else tuple(keep)
    bad = [k for k in keep if k not in KEEP]
    if bad or not keep:
        raise ValueError(f"capture: keep must be a non-empty subset of {KEEP}, got {keep}")
    if heads is not None:
        heads = [int(h) for h in heads]
    int_arg("capture: chunk", chunk, 1)
    kind, found = _find_layers(model)
    names = [n for n, _ in found]
    selected = _select(names, layers)
    maps = AttentionMaps(names, selected, heads, keep)
    rec = _Recorder(maps, query_index, chunk, {id(m): n for n, m in found if n in selected})
    undo: list = []
    try:
        if kind == "transformers":
            _register_hf()
            previous = model.config._attn_implementation or "eager"
            if previous != _CAPTURE_IMPL:        # an outer capture already routes this model through us
                for _, m in found:
                    m._attnkit_capture_previous = previous
                    undo.append(lambda m=m: delattr(m, "_attnkit_capture_previous"))
                model.set_attn_implementation(_CAPTURE_IMPL)
                undo.append(lambda: model.set_attn_implementation(previous))
        elif kind == "timm":
            for n, m in found:
                if n not in selected:
                    continue
                fused = m.fused_attn
                m.fused_attn = False
                undo.append(lambda m=m, f=fused: setattr(m, "fused_attn", f))

                def hook(_mod, args, n=n):
                    if rec in _ACTIVE:
                        with torch.no_grad():
                            rec.record_rows(n, [(0, args[0].detach().float())])
                undo.append(m.attn_drop.register_forward_pre_hook(hook).remove)
        else:
            for mod_name in {type(m).__module__ for _, m in found}:
                mod = sys.modules[mod_name]
                if getattr(mod.attention, "_attnkit_capture", False):
                    continue                     # an outer capture's wrapper already records for every capture
                current = mod.attention
                mod.attention = _ak_wrapper(current)
                undo.append(lambda mod=mod, o=current: setattr(mod, "attention", o))
            undo += _track_layers(found, _RUNNING)
        _ACTIVE.append(rec)
        yield maps
    finally:
        if rec in _ACTIVE:
            _ACTIVE.remove(rec)
        for u in reversed(undo):
            u()
