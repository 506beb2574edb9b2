"""Quality cases: every causal sequence mechanism trained on MQAR (Zoology, arXiv 2312.04927) and MAD's six
tasks (arXiv 2403.17844), beside its speed (suites ``quality`` and ``quality-quick``).

A case is one (mechanism, task, width, seed). Its setup measures the peak RSS of building the model and one
forward on the evaluation batch (in the unit's fresh forked process, before anything else ran there), then
trains a :class:`~attnkit.tasks.model.TinyLM` with the task's fixed step budget and measures test accuracy on
the scored positions; the timed ``run`` is the trained model's forward on the evaluation batch, so the row's
``median_s`` is forward time at the same width. Training figures go to the row's ``params``:
``mechanism``, ``task``, ``width``, ``seed``, ``accuracy`` (in [0, 1]), ``train_s``, ``steps_per_s``, ``steps``,
``lr``, ``fwd_peak_rss_mb``. Every case is its own comparison, hence its own process and its own line in
``results.jsonl``: a rerun skips the trained ones.

``quality`` also holds the ordering study: MQAR at N=256 with 16 key-value pairs, width 64, 2 layers, three
seeds, for softmax attention, linear attention without decay and a decayed linear attention (Zoology §3).
Mechanisms that cannot run causally on sequences are listed, with the reason, by :func:`skipped_mechanisms`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attnkit.bench.case import Case, Runner
from attnkit.bench.suites import Suite, register_suite

QUALITY = register_suite(Suite(
    "quality", "every causal sequence mechanism trained on MQAR and MAD's six tasks at widths 32 and 64, and "
               "the MQAR ordering study (N=256, 16 pairs, width 64, 3 seeds): accuracy beside forward time and "
               "memory (<= 60 min on 2 cores)",
    repeat=5, min_repeat=3, warmup_s=0.02, unit_budget_s=1.0, case_timeout_s=1800.0, memory=False))
QUALITY_QUICK = register_suite(Suite(
    "quality-quick", "every causal sequence mechanism trained briefly on a small MQAR, and mha on each MAD task "
                     "(<= 5 min on 2 cores)",
    repeat=3, min_repeat=2, warmup_s=0.0, unit_budget_s=0.3, case_timeout_s=600.0, memory=False))

LAYERS = 2
EVAL_BATCH = 8  # sequences in the timed forward


@dataclass(frozen=True)
class Setting:
    """One task setting with its training budget (shared by every mechanism: no per-mechanism tuning)."""

    task: str
    params: tuple[tuple[str, Any], ...]
    steps: int
    lr: float
    batch_size: int = 32
    train_examples: int | None = None
    study: str = "grid"


# The grid: step budgets and learning rates from a small shared sweep (lr 1e-3 / 3e-3 with mha and
# linear_attention on MQAR); training stops early at 99% on a held-out probe batch, as Zoology does.
GRID = (
    Setting("mqar", (("seq_len", 64), ("num_kv_pairs", 8)), steps=1000, lr=3e-3),
    Setting("in_context_recall", (), steps=600, lr=3e-3, train_examples=4096),
    Setting("fuzzy_recall", (), steps=600, lr=3e-3, train_examples=4096),
    Setting("noisy_recall", (), steps=600, lr=3e-3, train_examples=4096),
    Setting("selective_copying", (), steps=600, lr=3e-3, train_examples=4096),
    Setting("compression", (), steps=600, lr=3e-3, train_examples=4096),
    Setting("memorization", (), steps=600, lr=3e-3, train_examples=4096),
)
GRID_WIDTHS = (32, 64)
ORDERING = Setting("mqar", (("seq_len", 256), ("num_kv_pairs", 16)), steps=2000, lr=3e-3, study="ordering")
ORDERING_MECHANISMS = ("mha", "linear_attention", "lightning_attention")
ORDERING_SEEDS = (0, 1, 2)
QUICK_MQAR = Setting("mqar", (("seq_len", 64), ("num_kv_pairs", 4)), steps=100, lr=3e-3, study="quick")
QUICK_MAD_STEPS = 40


def causal_sequence_mechanisms() -> tuple[list[str], dict[str, str]]:
    """``(names, skipped)``: registry mechanisms the quality suites train (``causal-self`` pattern, sequence
    input, a config that takes the model's width and length), and ``{name: reason}`` for the others."""
    from attnkit.registry import list_mechanisms
    from attnkit.tasks.model import mechanism_config

    names, skipped = [], {}
    for spec in list_mechanisms():
        if "causal-self" not in spec.patterns:
            skipped[spec.name] = f"no causal-self pattern (patterns: {', '.join(spec.patterns)})"
        elif str(spec.input_kind) != "sequence":
            skipped[spec.name] = f"input kind {spec.input_kind}, not a token sequence"
        else:
            try:
                mechanism_config(spec, 64, 64)
            except Exception as exc:
                skipped[spec.name] = f"config cannot be sized for the tasks: {exc}"
                continue
            names.append(spec.name)
    return names, skipped


def skipped_mechanisms() -> dict[str, str]:
    """``{name: reason}`` of registered mechanisms the quality suites cannot train."""
    return causal_sequence_mechanisms()[1]


def _train_config(s: Setting, width: int, seed: int) -> Any:
    from attnkit.tasks.train import TrainConfig

    return TrainConfig(steps=s.steps, batch_size=s.batch_size, lr=s.lr, train_examples=s.train_examples,
                       test_examples=256 if s.study != "quick" else 64, width=width, layers=LAYERS, seed=seed,
                       early_stop=0.99, eval_every=50)


def _setup(mechanism: str, s: Setting, width: int, seed: int) -> Callable[[], Runner]:
    def setup() -> Runner:
        from attnkit.bench.memory import hwm_mb, release_free_memory, reset_peak, rss_mb
        from attnkit.tasks.registry import get_task
        from attnkit.tasks.train import build_model, train_task

        task = get_task(s.task)
        p = task.resolve(dict(s.params))
        cfg = _train_config(s, width, seed)
        release_free_memory()
        can_peak = reset_peak()
        base = rss_mb()
        run_threads = torch.get_num_threads()
        # Training runs on one thread whatever the run's --threads: these models are tiny (each op a few
        # hundred microseconds), so a second OpenMP thread buys little and, on a loaded machine, costs a lot:
        # a parallel region waits at its barrier for a descheduled thread (hybrid_attention's compiled
        # chunk kernel took 2.4-5 s per step at 2 threads vs 0.2-0.3 s at 1, measured on a busy 2-core box).
        # One thread also makes the trained weights, hence the accuracy, independent of --threads.
        torch.set_num_threads(1)
        try:
            model = build_model(mechanism, s.task, p, width, LAYERS, seed)
            ev = task.generate(EVAL_BATCH, 7 + seed, **p)
            with torch.no_grad():
                model(ev.inputs)
            peak = hwm_mb() - base if can_peak and base is not None else None  # params + inputs + one forward
            result = train_task(mechanism, s.task, p, cfg, model=model)
        finally:
            torch.set_num_threads(run_threads)  # the timed forward runs at the run's thread count
        model.eval()

        def run() -> Any:
            with torch.no_grad():
                return model(ev.inputs)

        row = result.row()
        row.update({"fwd_peak_rss_mb": peak, "eval_batch": EVAL_BATCH, "study": s.study,
                    "task_params": json.dumps(p, sort_keys=True)})
        return Runner(run=run, params=row)

    return setup


def _flops(mechanism: str, s: Setting, width: int) -> float:
    """Forward FLOPs of the model's sequence mixers on the evaluation batch (the registry's count x layers)."""
    try:
        from attnkit.registry import info
        from attnkit.tasks.model import mechanism_config
        from attnkit.tasks.registry import get_task

        spec = info(mechanism)
        p = get_task(s.task).resolve(dict(s.params))
        cfg = {**mechanism_config(spec, width, p["seq_len"]), "batch": EVAL_BATCH}
        return float(spec.flops(cfg)) * LAYERS
    except Exception:
        return 0.0  # no figure rather than a failed discovery


def _case(mechanism: str, s: Setting, width: int, seed: int, suites: set[str]) -> Case:
    p = dict(s.params)
    tag = "".join(f"/{k}={v}" for k, v in s.params)
    params = (("mechanism", mechanism), ("task", s.task), ("width", width), ("layers", LAYERS), ("seed", seed),
              ("study", s.study), ("N", p.get("seq_len", 0)), ("lr", s.lr), ("step_budget", s.steps),
              ("dtype", "float32"))
    return Case(op=mechanism, impl="tinylm", group=f"quality-{s.study}/{s.task}{tag}/w{width}/seed{seed}",
                pass_="fwd", suites=frozenset(suites), params=params, flops=_flops(mechanism, s, width),
                setup=_setup(mechanism, s, width, seed))


def cases() -> list[Case]:
    """The grid and the ordering study (``quality``) and the quick subset (``quality-quick``)."""
    from attnkit.tasks.registry import TASKS

    names, _ = causal_sequence_mechanisms()
    out: list[Case] = []
    for mech in names:
        out.append(_case(mech, QUICK_MQAR, 32, 0, {"quality-quick"}))
    if "mha" in names:
        for t in TASKS:
            if t != "mqar":
                quick = Setting(t, (), steps=QUICK_MAD_STEPS, lr=3e-3, train_examples=512, study="quick")
                out.append(_case("mha", quick, 32, 0, {"quality-quick"}))
    for s in GRID:
        for width in GRID_WIDTHS:
            for mech in names:
                out.append(_case(mech, s, width, 0, {"quality"}))
    for seed in ORDERING_SEEDS:
        for mech in ORDERING_MECHANISMS:
            if mech in names:
                out.append(_case(mech, ORDERING, 64, seed, {"quality"}))
    return out
