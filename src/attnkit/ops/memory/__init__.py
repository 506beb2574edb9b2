"""Test-time-trained memories: Titans' neural long-term memory (arXiv 2501.00663)."""

from attnkit.ops.memory.titans import titans_memory, titans_retrieve

__all__ = ["titans_memory", "titans_retrieve"]
