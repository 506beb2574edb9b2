"""What a task generator returns: token ids and the target of every scored position."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg

IGNORE = -100  # target of a position the task does not score (the value ``cross_entropy`` skips)


@dataclass(frozen=True)
class TaskBatch:
    """A batch of task sequences.

    Attributes:
        inputs: ``(B, N)`` int64 token ids.
        targets: ``(B, N)`` int64; ``targets[b, t]`` is what the model must output at position ``t`` (its
            next-token prediction there), :data:`IGNORE` where the task scores nothing.
    """

    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def scored(self) -> torch.Tensor:
        """``(B, N)`` bool: the positions the task scores."""
        return self.targets != IGNORE

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def slice(self, start: int, stop: int) -> TaskBatch:
        """Rows ``start:stop``."""
        return TaskBatch(self.inputs[start:stop], self.targets[start:stop])


def count(fn: str, arg: str, value: object, minimum: int) -> int:
    """``value`` as an int ``>= minimum``; the error names the generator ``fn`` and the argument."""
    return int_arg(f"{fn}: {arg}", value, minimum)
