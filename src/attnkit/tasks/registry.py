"""The small synthetic tasks by name: generator, default parameters, vocabulary and readout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from attnkit.tasks import mad
from attnkit.tasks.batch import TaskBatch
from attnkit.tasks.mqar import mqar


@dataclass(frozen=True)
class Task:
    """One synthetic task.

    Attributes:
        name: the task's id (``"mqar"``, ``"in_context_recall"``, ...).
        generate: ``generate(n, seed, **params) -> TaskBatch``, deterministic per seed.
        defaults: the parameters used when none are given (each must include ``seq_len``).
        extra_tokens: ``extra_tokens(params)``, special tokens past ``vocab_size`` (blank, copy, noise, ...).
        readout: ``"lm"`` or ``"compress"`` (see :class:`attnkit.tasks.model.TinyLM`).
        paper: where the task comes from.
    """

    name: str
    generate: Callable[..., TaskBatch]
    defaults: dict[str, Any]
    extra_tokens: Callable[[dict[str, Any]], int] = field(default=lambda p: 0)
    readout: str = "lm"
    paper: str = ""

    def resolve(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The defaults updated by ``params``; an unknown key raises ``ValueError`` naming the valid ones."""
        bad = sorted(set(params or {}) - set(self.defaults))
        if bad:
            raise ValueError(f"task {self.name!r}: unknown parameters {bad}; valid: {sorted(self.defaults)}")
        return {**self.defaults, **(params or {})}

    def vocab_size(self, params: dict[str, Any] | None = None) -> int:
        """Embedding rows a model needs for this task: content tokens plus the special ones."""
        p = self.resolve(params)
        return int(p["vocab_size"]) + int(self.extra_tokens(p))


MAD = "Mechanistic Design and Scaling of Hybrid Architectures (arXiv 2403.17844)"
ZOOLOGY = "Zoology: Measuring and Improving Recall in Efficient Language Models (arXiv 2312.04927)"

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("mqar", mqar, {"vocab_size": 256, "seq_len": 256, "num_kv_pairs": 16, "power_a": 0.01,
                        "random_fill": True}, paper=ZOOLOGY),
    Task("in_context_recall", mad.in_context_recall, {"vocab_size": 32, "seq_len": 64}, paper=MAD),
    Task("fuzzy_recall", mad.fuzzy_recall, {"vocab_size": 32, "seq_len": 64, "num_keys": 8, "key_len": 3,
                                            "value_len": 3}, extra_tokens=lambda p: 1, paper=MAD),
    Task("noisy_recall", mad.noisy_recall, {"vocab_size": 32, "seq_len": 64, "noise_vocab_size": 8,
                                            "frac_noise": 0.4}, extra_tokens=lambda p: p["noise_vocab_size"],
         paper=MAD),
    Task("selective_copying", mad.selective_copying, {"vocab_size": 16, "seq_len": 64, "num_tokens": 8},
         extra_tokens=lambda p: 2, paper=MAD),
    Task("compression", mad.compression, {"vocab_size": 16, "seq_len": 32}, extra_tokens=lambda p: 1,
         readout="compress", paper=MAD),
    Task("memorization", mad.memorization, {"vocab_size": 256, "seq_len": 32, "mapping_seed": 0},
         extra_tokens=lambda p: 1, paper=MAD),
)}


def get_task(name: str) -> Task:
    """The task called ``name``; unknown names raise ``KeyError`` listing the valid ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}") from None
