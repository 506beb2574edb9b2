"""Train a :class:`~attnkit.tasks.model.TinyLM` on one task with a fixed step budget; accuracy on scored positions.

AdamW (Zoology's setting: weight decay 0.1, lr around 1e-3), linear warm-up then cosine decay to zero over
the budget, gradient clipping at 1.0. The loss and the accuracy count only the positions the task scores
(``targets != IGNORE``). Training batches come from a fixed training set when the config names its size
(MAD's protocol), else fresh from the generator every step (Zoology's large training set, in effect); the
test set is drawn from seeds no training batch uses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from attnkit.tasks.batch import TaskBatch
from attnkit.tasks.model import TinyLM
from attnkit.tasks.registry import get_task

_TEST_SEED = 1_000_000_007  # test batches: seed + this; training seeds stay far below it


@dataclass(frozen=True)
class TrainConfig:
    """How one model is trained.

    Attributes:
        steps: optimizer steps (the fixed budget).
        batch_size: sequences per step.
        lr: peak learning rate.
        weight_decay: AdamW's decoupled weight decay.
        warmup_frac: fraction of ``steps`` of linear warm-up before the cosine decay.
        train_examples: size of the fixed training set; None draws a fresh batch every step.
        test_examples: sequences in the test set.
        width: model width.
        layers: blocks.
        seed: seeds the parameters, the training data and the test data.
        early_stop: stop once the accuracy on a held-out probe batch reaches this (None: never);
            checked every ``eval_every`` steps. The recorded ``steps`` are those actually taken.
        eval_every: steps between early-stop checks.
        time_limit_s: stop once training has taken this many seconds (None: never), a budget in time shared
            by every mechanism for quick checks; the recorded ``steps`` say how far each got.
        probe_examples: sequences in the early-stop probe batch (at most ``test_examples``).
    """

    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    train_examples: int | None = None
    test_examples: int = 256
    width: int = 64
    layers: int = 2
    seed: int = 0
    early_stop: float | None = None
    eval_every: int = 50
    time_limit_s: float | None = None
    probe_examples: int = 128


@dataclass(frozen=True)
class QualityResult:
    """What one training run gave."""

    mechanism: str
    task: str
    task_params: dict[str, Any]
    config: TrainConfig
    accuracy: float
    train_accuracy: float
    final_loss: float
    steps: int
    train_s: float
    steps_per_s: float
    params: int
    history: tuple[tuple[int, float], ...] = field(default=())

    def row(self) -> dict[str, Any]:
        """The figures a benchmark row records."""
        return {"mechanism": self.mechanism, "task": self.task, "width": self.config.width,
                "layers": self.config.layers, "seed": self.config.seed, "accuracy": self.accuracy,
                "train_accuracy": self.train_accuracy, "final_loss": self.final_loss, "steps": self.steps,
                "step_budget": self.config.steps, "train_s": self.train_s, "steps_per_s": self.steps_per_s,
                "lr": self.config.lr, "batch_size": self.config.batch_size, "model_params": self.params,
                "time_limit_s": self.config.time_limit_s,
                "task_params": dict(self.task_params)}


def cosine_lr(step: int, steps: int, warmup_frac: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up over ``warmup_frac * steps``, then cosine to 0."""
    warm = max(1, round(warmup_frac * steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def accuracy(model: TinyLM, data: TaskBatch, batch_size: int = 64) -> float:
    """Fraction of scored positions where ``argmax`` of the logits equals the target, over ``data``."""
    was = model.training
    model.eval()
    hit = total = 0
    for i in range(0, len(data), batch_size):
        part = data.slice(i, i + batch_size)
        scored = part.scored
        pred = model(part.inputs, scored).argmax(dim=-1)  # (S,)
        hit += int((pred == part.targets[scored]).sum())
        total += int(scored.sum())
    model.train(was)
    return hit / total if total else float("nan")


def build_model(mechanism: str, task: str, task_params: dict[str, Any] | None = None, width: int = 64,
                layers: int = 2, seed: int = 0) -> TinyLM:
    """A :class:`TinyLM` sized for ``task`` (its vocabulary, length and readout), parameters from ``seed``."""
    t = get_task(task)
    p = t.resolve(task_params)
    with torch.random.fork_rng(devices=[]):  # the registry's modules draw from the global RNG
        torch.manual_seed(seed)
        return TinyLM(mechanism, vocab_size=t.vocab_size(p), seq_len=p["seq_len"], width=width, layers=layers,
                      readout=t.readout)


def train_task(mechanism: str, task: str, task_params: dict[str, Any] | None = None,
               config: TrainConfig | None = None, model: TinyLM | None = None,
               progress: Callable[[int, float, float], None] | None = None) -> QualityResult:
    """Train ``mechanism`` on ``task`` for ``config.steps`` steps and measure its test accuracy.

    Args:
        mechanism: registry name of a causal sequence mechanism.
        task: a name in :data:`attnkit.tasks.TASKS`.
        task_params: overrides of the task's default parameters.
        config: the training configuration (:class:`TrainConfig`).
        model: an already built model to train (e.g. to time its forward afterwards); None builds one.
        progress: called as ``progress(step, probe_accuracy, loss)`` at every early-stop check.

    Returns:
        :class:`QualityResult`; ``accuracy`` in [0, 1] over every scored position of the test set.
    """
    cfg = config or TrainConfig()
    t = get_task(task)
    p = t.resolve(task_params)
    if model is None:
        model = build_model(mechanism, task, p, cfg.width, cfg.layers, cfg.seed)
    test = t.generate(cfg.test_examples, _TEST_SEED + cfg.seed, **p)
    probe = t.generate(min(cfg.test_examples, cfg.probe_examples), _TEST_SEED // 2 + cfg.seed, **p)
    pool = t.generate(cfg.train_examples, cfg.seed, **p) if cfg.train_examples else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.steps, cfg.warmup_frac))
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(pool), generator=g) if pool is not None else None
    cursor, loss_v, history = 0, float("nan"), []
    model.train()
    t0 = time.perf_counter()
    step = 0
    while step < cfg.steps:
        if pool is None:
            batch = t.generate(cfg.batch_size, cfg.seed * 100_003 + step + 1, **p)
        else:
            if cursor + cfg.batch_size > len(pool):  # next epoch: reshuffle the fixed training set
                order, cursor = torch.randperm(len(pool), generator=g), 0
            idx = order[cursor:cursor + cfg.batch_size]
            cursor += cfg.batch_size
            batch = TaskBatch(pool.inputs[idx], pool.targets[idx])
        scored = batch.scored
        logits = model(batch.inputs, scored)  # (S, V)
        loss = torch.nn.functional.cross_entropy(logits, batch.targets[scored])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        loss_v = float(loss.detach())
        if cfg.time_limit_s is not None and time.perf_counter() - t0 >= cfg.time_limit_s:
            break
        if cfg.early_stop is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            acc = accuracy(model, probe)
            history.append((step, acc))
            if progress is not None:
                progress(step, acc, loss_v)
            if acc >= cfg.early_stop:
                break
    train_s = time.perf_counter() - t0
    # training data: the fixed set's first rows, or the first fresh batch's seed drawn at test size
    seen = pool.slice(0, cfg.test_examples) if pool is not None else t.generate(cfg.test_examples,
                                                                                   cfg.seed * 100_003 + 1, **p)
    train_acc = accuracy(model, seen)
    return QualityResult(
        mechanism=model.mechanism, task=t.name, task_params=p, config=cfg, accuracy=accuracy(model, test),
        train_accuracy=train_acc, final_loss=loss_v, steps=step, train_s=train_s,
        steps_per_s=step / train_s if train_s > 0 else float("nan"),
        params=sum(x.numel() for x in model.parameters()), history=tuple(history))
