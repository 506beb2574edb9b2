"""Decode-time attention: KV caches, split-KV decoding, quantized and sparse caches, attention sinks.

``decode_attention`` (split-KV, Lean Attention arXiv 2405.10480), ``KVCache`` (static / dynamic, the
transformers cache protocol), ``KIVICache`` / ``ZipCache`` (arXiv 2402.02750 / 2405.14256),
``TidalDecode`` (arXiv 2410.05076) and StreamingLLM sinks (arXiv 2309.17453).
"""

from attnkit.ops.decode.cache import KVCache
from attnkit.ops.decode.call import DISPATCHER, decode_attention, explain
from attnkit.ops.decode.split_kv import BACKEND as SPLIT_KV_BACKEND
from attnkit.ops.decode.split_kv import merge_splits, split_kv_attention
from attnkit.ops.decode.window import DecodeWindow, decode_window

__all__ = [
           "DISPATCHER",
           "SPLIT_KV_BACKEND",
           "DecodeWindow",
           "KVCache",
           "decode_attention",
           "decode_window",
           "explain",
           "merge_splits",
           "split_kv_attention",
]
