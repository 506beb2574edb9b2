"""``KVCache``: per-layer key/value cache for decoding, static (preallocated) or dynamic (grows).

Heads-first storage ``(B, Hkv, capacity, D)``, so each K/V head's keys are contiguous and split-KV
decoding (Lean Attention, arXiv 2405.10480) reads them without a copy; the attnkit views
(``keys(layer)``, ``(B, N, Hkv, D)``) and the transformers views (``update`` returns ``(B, Hkv, N, D)``)
are both strided views of that storage. A dynamic cache doubles its capacity when full (amortised
O(1) appends, where transformers' ``DynamicCache`` concatenates every step).

It implements transformers' cache protocol (``update(key_states, value_states, layer_idx,
cache_kwargs)``, ``get_seq_length``, ``get_mask_sizes``, ``crop``, ``reorder_cache``, ...) by duck
typing, so ``model.generate(..., past_key_values=KVCache())`` works without attnkit importing
transformers.
"""

from __future__ import annotations

import torch

from attnkit._validate import int_arg

_MIN_CAPACITY = 256


class _Layer:
    """One layer's cache; the attributes transformers reads of a cache layer are provided."""

    is_sliding = False
    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, fixed: int | None):
        self.fixed = fixed
        self.k: torch.Tensor | None = None   # (B, Hkv, capacity, D)
        self.v: torch.Tensor | None = None   # (B, Hkv, capacity, Dv)
        self.length = 0

    @property
    def is_initialized(self) -> bool:
        return self.k is not None

    # transformers reads these two as heads-first (B, Hkv, N, D)
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.k is None else self.k[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.v is None else self.v[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1 if self.fixed is None else self.fixed

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0


class KVCache:
    """Key/value cache of a decoder, one entry per layer, GQA-aware.

    Args:
        max_length: None for a dynamic cache (grows); an int for a static one preallocated to that many
            tokens, which raises instead of dropping tokens when an append would exceed it.
        num_layers: optional; layers are otherwise created as they are first written.

    Shapes: attnkit methods are heads-last: ``append(layer, k (B, N, Hkv, D), v (B, N, Hkv, Dv))``,
    ``keys(layer) -> (B, N, Hkv, D)``. The transformers method ``update`` takes and returns
    ``(B, Hkv, N, D)``.

    Example:
        >>> cache = KVCache()
        >>> k_all, v_all = cache.append(0, k_new, v_new)          # (B, N, Hkv, D) views
        >>> out = decode_attention(q, k_all, v_all)
        >>> model.generate(ids, past_key_values=KVCache(), max_new_tokens=20)   # transformers
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, max_length: int | None = None, *, num_layers: int | None = None):
        self.max_length = None if max_length is None else int_arg("max_length", max_length, 1)
        self.layers: list[_Layer] = []
        if num_layers is not None:
            for _ in range(int_arg("num_layers", num_layers, 0)):
                self.layers.append(_Layer(self.max_length))

    # ---- attnkit API (heads-last) ---------------------------------------------------------------------
    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k (B, N, Hkv, D)``, ``v (B, N, Hkv, Dv)`` to layer ``layer_idx``; returns the whole layer's
        ``(keys, values)`` as heads-last views ``(B, Nk, Hkv, D)``."""
        self._write(layer_idx, k.transpose(1, 2), v.transpose(1, 2), "k", "v")      # (B, Hkv, N, D)
        return self.keys(layer_idx), self.values(layer_idx)

    def keys(self, layer_idx: int, length: int | None = None) -> torch.Tensor:
        """The first ``length`` (default all) cached keys of a layer, ``(B, length, Hkv, D)`` (a view)."""
        lay = self._read(layer_idx, length)
        return lay.k[:, :, : self._len(lay, length)].transpose(1, 2)

    def values(self, layer_idx: int, length: int | None = None) -> torch.Tensor:
        """The first ``length`` (default all) cached values of a layer, ``(B, length, Hkv, Dv)`` (a view)."""
        lay = self._read(layer_idx, length)
        return lay.v[:, :, : self._len(lay, length)].transpose(1, 2)

    def memory_bytes(self) -> int:
        """Bytes held by the cache's buffers (capacity, not only the filled part)."""
        return sum(t.numel() * t.element_size() for lay in self.layers for t in (lay.k, lay.v) if t is not None)

    def used_bytes(self) -> int:
        """Bytes of the cached tokens themselves."""
        return sum(lay.length * (lay.k.shape[0] * lay.k.shape[1]) * (lay.k.shape[-1] + lay.v.shape[-1])
                   * lay.k.element_size() for lay in self.layers if lay.k is not None)

    # ---- transformers' cache protocol (heads-first) -------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers: append ``key_states (B, Hkv, N, D)``, ``value_states (B, Hkv, N, Dv)`` and return the
        layer's keys and values ``(B, Hkv, Nk, D)`` (views)."""
        self._write(layer_idx, key_states, value_states, "key_states", "value_states")
        lay = self.layers[layer_idx]
        return lay.keys, lay.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1 if self.max_length is None else self.max_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_initialized(self) -> bool:
        return bool(self.layers) and all(lay.is_initialized for lay in self.layers)

    @property
    def batch_size(self) -> int:
        sizes = {lay.k.shape[0] for lay in self.layers if lay.k is not None}
        return sizes.pop() if len(sizes) == 1 else -1

    def crop(self, max_length: int) -> None:
        """Keep at most the first ``max_length`` tokens of every layer (negative: drop that many from the end);
        a shorter layer is left as it is, as transformers' caches do."""
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"KVCache.crop: max_length must be an int, got {type(max_length).__name__}")
        for lay in self.layers:
            n = max_length if max_length >= 0 else lay.length + max_length
            lay.length = max(0, min(n, lay.length))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: batch row ``i`` becomes row ``beam_idx[i]``."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for lay in self.layers:
            if lay.k is not None:
                lay.k = lay.k.index_select(0, indices.to(lay.k.device))
                lay.v = lay.v.index_select(0, indices.to(lay.v.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for lay in self.layers:
            if lay.k is not None:
                lay.k, lay.v = lay.k.repeat_interleave(repeats, 0), lay.v.repeat_interleave(repeats, 0)

    def reset(self) -> None:
        for lay in self.layers:
            lay.length = 0

    def activate_past_recording(self, **kwargs) -> None:  # transformers calls it on assistant caches
        pass

    def __repr__(self) -> str:
        kind = "dynamic" if self.max_length is None else f"static(max_length={self.max_length})"
        lens = [lay.length for lay in self.layers]
        return f"KVCache({kind}, layers={len(self.layers)}, lengths={lens})"

    # ---- internals -----------------------------------------------------------------------------------
    def _read(self, layer_idx: int, length: int | None) -> _Layer:
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise TypeError(f"KVCache: layer_idx must be an int, got {type(layer_idx).__name__}")
        if not 0 <= layer_idx < len(self.layers) or self.layers[layer_idx].k is None:
            raise ValueError(f"KVCache: layer_idx {layer_idx} was never written "
                             f"(written layers: {[i for i, lay in enumerate(self.layers) if lay.k is not None]})")
        return self.layers[layer_idx]

    @staticmethod
    def _len(lay: _Layer, length: int | None) -> int:
        if length is None:
            return lay.length
        int_arg("length", length, 0)
        if length > lay.length:
            raise ValueError(f"KVCache: length={length} queried past the cache length {lay.length}")
        return length

    def _write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, kname: str, vname: str) -> None:
        """Append heads-first ``k (B, Hkv, N, D)``, ``v (B, Hkv, N, Dv)``."""
        int_arg("KVCache: layer_idx", layer_idx, 0)
        for name, t in ((kname, k), (vname, v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"KVCache: {name} must be a 4-D tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if k.shape[:3] != v.shape[:3] or k.dtype != v.dtype:
            raise ValueError(f"KVCache: {kname} {tuple(k.shape)} {k.dtype} and {vname} {tuple(v.shape)} {v.dtype} "
                             f"must agree on batch, heads, tokens and dtype")
        while len(self.layers) <= layer_idx:
            self.layers.append(_Layer(self.max_length))
        lay = self.layers[layer_idx]
        b, h, n, _ = k.shape
        if lay.k is not None:
            want = (lay.k.shape[0], lay.k.shape[1], lay.k.shape[3], lay.v.shape[3])
            if (b, h, k.shape[3], v.shape[3]) != want:
                raise ValueError(f"KVCache: layer {layer_idx} holds (B, Hkv, D, Dv) = {want}; {kname}/{vname} "
                                 f"bring {(b, h, k.shape[3], v.shape[3])} (mismatched head count or size)")
            if k.dtype != lay.k.dtype or k.device != lay.k.device:
                raise TypeError(f"KVCache: layer {layer_idx} holds {lay.k.dtype} on {lay.k.device}; {kname} is "
                                f"{k.dtype} on {k.device}")
        need = lay.length + n
        if self.max_length is not None and need > self.max_length:
            raise ValueError(f"KVCache: appending {n} token(s) to layer {layer_idx} holding {lay.length} would "
                             f"exceed the static max_length={self.max_length}")
        cap = 0 if lay.k is None else lay.k.shape[2]
        if need > cap:
            new_cap = self.max_length if self.max_length is not None else max(_MIN_CAPACITY, need, 2 * cap)
            nk = k.new_empty(b, h, new_cap, k.shape[3])
            nv = v.new_empty(b, h, new_cap, v.shape[3])
            if lay.k is not None:
                nk[:, :, : lay.length] = lay.k[:, :, : lay.length]
                nv[:, :, : lay.length] = lay.v[:, :, : lay.length]
            lay.k, lay.v = nk, nv
        lay.k[:, :, lay.length: need] = k
        lay.v[:, :, lay.length: need] = v
        lay.length = need
