"""Small synthetic tasks that show whether a sequence mechanism *learns*, on a CPU in minutes.

* :mod:`~attnkit.tasks.mqar` -- Zoology's multi-query associative recall (arXiv 2312.04927);
* :mod:`~attnkit.tasks.mad` -- MAD's six tasks (arXiv 2403.17844): in-context recall, fuzzy recall, noisy
  recall, selective copying, compression, memorization;
* :mod:`~attnkit.tasks.model` -- a tiny LM around any registered causal sequence mechanism;
* :mod:`~attnkit.tasks.train` -- AdamW, cosine schedule, fixed step budget, accuracy on scored positions.

``attnkit bench --suite quality`` (and ``quality-quick``) trains every causal sequence mechanism on them.

Example:
    >>> from attnkit.tasks import TrainConfig, train_task
    >>> r = train_task("mha", "mqar", {"seq_len": 64, "num_kv_pairs": 4}, TrainConfig(steps=200))
    >>> 0.0 <= r.accuracy <= 1.0
    True
"""

from attnkit.tasks.batch import IGNORE, TaskBatch
from attnkit.tasks.mad import (
    compression,
    fuzzy_recall,
    in_context_recall,
    memorization,
    noisy_recall,
    selective_copying,
)
from attnkit.tasks.model import TinyLM, mechanism_config
from attnkit.tasks.mqar import mqar
from attnkit.tasks.registry import TASKS, Task, get_task
from attnkit.tasks.train import QualityResult, TrainConfig, accuracy, build_model, train_task

__all__ = [
    "IGNORE", "TASKS", "QualityResult", "Task", "TaskBatch", "TinyLM", "TrainConfig", "accuracy", "build_model",
    "compression", "fuzzy_recall", "get_task", "in_context_recall", "mechanism_config", "memorization", "mqar",
    "noisy_recall", "selective_copying", "train_task",
]
