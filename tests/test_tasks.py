"""attnkit.tasks: generators deterministic per seed, answers recoverable by brute force, the tiny LM, the training
loop, and the quality benchmark cases and report section built on them."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit.tasks import (
    IGNORE,
    TASKS,
    TinyLM,
    TrainConfig,
    compression,
    fuzzy_recall,
    in_context_recall,
    mechanism_config,
    memorization,
    mqar,
    noisy_recall,
    selective_copying,
    train_task,
)
from attnkit.tasks.train import cosine_lr

SMALL = {  # small settings of every task, so the pure-Python solvers stay fast
    "mqar": {"seq_len": 64, "num_kv_pairs": 8},
    "in_context_recall": {"seq_len": 48},
    "fuzzy_recall": {"seq_len": 48},
    "noisy_recall": {"seq_len": 48},
    "selective_copying": {"seq_len": 40, "num_tokens": 6},
    "compression": {"seq_len": 16},
    "memorization": {"seq_len": 16},
}


@pytest.mark.parametrize("name", list(TASKS))
def test_same_seed_same_batch_other_seed_other_batch(name):
    t = TASKS[name]
    p = t.resolve(SMALL[name])
    a, b, c = t.generate(6, 3, **p), t.generate(6, 3, **p), t.generate(6, 4, **p)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    assert a.inputs.shape == a.targets.shape == (6, p["seq_len"]) and a.inputs.dtype == torch.long
    assert int(a.inputs.min()) >= 0 and int(a.inputs.max()) < t.vocab_size(p)
    assert a.scored.sum() > 0
    state = torch.random.get_rng_state()
    t.generate(2, 0, **p)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


def _solve_mqar(x: list[int], k: int) -> dict[int, int]:
    """Brute force: each query (a key of the context seen again after it) -> the token that followed it."""
    ctx = {x[i]: x[i + 1] for i in range(0, 2 * k, 2)}
    out, asked = {}, set()
    for t in range(2 * k, len(x)):
        if x[t] in ctx and x[t] not in asked and (t - 2 * k) % 2 == 0:
            out[t] = ctx[x[t]]
    return out


def test_mqar_answers_recoverable_and_layout():
    k, n_seq = 8, 64
    b = mqar(40, 0, seq_len=n_seq, num_kv_pairs=k, random_fill=False)
    for row in range(40):
        x, y = b.inputs[row].tolist(), b.targets[row].tolist()
        keys, values = x[0:2 * k:2], x[1:2 * k:2]
        assert len(set(keys)) == k and all(1 <= q < 128 for q in keys) and all(128 <= v < 256 for v in values)
        scored = {t: y[t] for t in range(n_seq) if y[t] != IGNORE}
        assert len(scored) == k and sorted(x[t] for t in scored) == sorted(keys)  # every key asked once
        assert scored == _solve_mqar(x, k)
    # with random filler a brute-force solver still recovers every answer (first occurrence is in the context)
    b = mqar(40, 1, seq_len=n_seq, num_kv_pairs=k)
    for row in range(40):
        x, y = b.inputs[row].tolist(), b.targets[row].tolist()
        ctx = {x[i]: x[i + 1] for i in range(0, 2 * k, 2)}
        for t in range(n_seq):
            if y[t] != IGNORE:
                assert y[t] == ctx[x[t]]


def test_mqar_queries_follow_a_power_law():
    b = mqar(400, 0, seq_len=256, num_kv_pairs=16)
    slot = (b.scored.nonzero()[:, 1] - 32) // 2  # slots 0..111
    early, late = int((slot < 16).sum()), int((slot >= 96).sum())
    assert early > 2 * late  # most queries come soon after the context


def _recall_expected(x: list[int], half: int, v: int) -> dict[int, int]:
    """Key-value recall by brute force, skipping noise tokens (>= v): key position -> value if seen before."""
    out, seen, t = {}, {}, 0
    while t < len(x):
        if x[t] >= v:
            t += 1
            continue
        assert x[t] < half and half <= x[t + 1] < v
        if x[t] in seen:
            assert seen[x[t]] == x[t + 1]  # one mapping per sequence
            out[t] = x[t + 1]
        seen[x[t]] = x[t + 1]
        t += 2
    return out


@pytest.mark.parametrize("noisy", [False, True])
def test_recall_answers_recoverable(noisy):
    b = noisy_recall(30, 5, seq_len=48) if noisy else in_context_recall(30, 5, seq_len=48)
    for row in range(30):
        x, y = b.inputs[row].tolist(), b.targets[row].tolist()
        got = {t: y[t] for t in range(len(y)) if y[t] != IGNORE}
        assert got == _recall_expected(x, 16, 32)
        if noisy:
            assert sum(tok >= 32 for tok in x) >= round(0.4 * 48)


def test_fuzzy_recall_answers_recoverable():
    b = fuzzy_recall(30, 2, seq_len=48)
    for row in range(30):
        x, y = b.inputs[row].tolist(), b.targets[row].tolist()
        want, seen, t = {}, {}, 0
        while t < len(x) and x[t] != 32:  # parse runs: key tokens < 16, value tokens in [16, 32), pad 32
            s = t
            while x[t] < 16:
                t += 1
            key = tuple(x[s:t])
            s2 = t
            while t < len(x) and 16 <= x[t] < 32:
                t += 1
            val = tuple(x[s2:t])
            assert key and val
            if key in seen:
                assert seen[key] == val
                want.update({s2 - 1 + i: tok for i, tok in enumerate(val)})
            seen[key] = val
        assert {t: y[t] for t in range(len(y)) if y[t] != IGNORE} == want
        keys = list(seen)  # prefix-free: no key motif starts another
        assert not any(a != c and c[:len(a)] == a for a in keys for c in keys)


def test_selective_copying_compression_memorization_recoverable():
    b = selective_copying(20, 0, seq_len=40, num_tokens=6)
    for row in range(20):
        x, y = b.inputs[row].tolist(), b.targets[row].tolist()
        content = [tok for tok in x[:34] if tok < 16]
        assert len(content) == 6 and x[34:] == [17] * 6 and y[34:] == content and set(y[:34]) == {IGNORE}
    b = compression(10, 0, seq_len=16)
    assert torch.equal(b.targets[:, :-1], b.inputs[:, :-1]) and (b.inputs[:, -1] == 16).all()
    # memorization: one fixed map (from mapping_seed) shared by every batch; batch seeds only draw keys
    a, c = memorization(64, 0, seq_len=16), memorization(64, 1, seq_len=16)
    table = {}
    for bb in (a, c):
        for k, v in zip(bb.inputs[:, 0::2].flatten().tolist(), bb.targets[:, 1::2].flatten().tolist()):
            assert table.setdefault(k, v) == v
        assert (bb.inputs[:, 1::2] == 256).all()
    other = memorization(64, 0, seq_len=16, mapping_seed=1)
    assert not torch.equal(other.targets, a.targets)


@pytest.mark.parametrize("call, match", [
    (lambda: mqar(2, 0, seq_len=60, num_kv_pairs=16), "seq_len must be >= 4"),
    (lambda: mqar(2, 0, vocab_size=16, seq_len=64, num_kv_pairs=8), "fewer than"),
    (lambda: mqar(0, 0), "n must be >= 1"),
    (lambda: in_context_recall(2, 0, seq_len=33), "even"),
    (lambda: noisy_recall(2, 0, frac_noise=1.5), "frac_noise"),
    (lambda: selective_copying(2, 0, seq_len=10, num_tokens=6), "2 \\* num_tokens"),
    (lambda: TASKS["mqar"].resolve({"kv": 3}), "unknown parameters"),
])
def test_bad_arguments_raise_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_tinylm_shapes_scored_readout_and_causality():
    torch.manual_seed(0)
    m = TinyLM("mha", vocab_size=40, seq_len=16, width=32)
    x = torch.randint(0, 40, (3, 16))
    full = m(x)
    assert full.shape == (3, 16, 40)
    scored = torch.zeros(3, 16, dtype=torch.bool)
    scored[0, 3] = scored[2, 15] = True
    torch.testing.assert_close(m(x, scored), full[scored])
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 40  # the LM readout is causal: earlier logits do not move
    torch.testing.assert_close(m(x2)[:, :10], full[:, :10])
    c = TinyLM("mha", vocab_size=40, seq_len=16, width=32, readout="compress")
    out = c(x)
    assert out.shape == (3, 16, 40)
    x3 = x.clone()
    x3[:, -1] = (x3[:, -1] + 1) % 40  # compress: every position is decoded from the last one
    assert not torch.allclose(c(x3)[:, 0], out[:, 0])
    with pytest.raises(ValueError, match="readout"):
        TinyLM("mha", 40, 16, readout="cls")
    with pytest.raises(ValueError, match="tokens must be"):
        m(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="not a causal sequence mechanism"):
        TinyLM("agent_attention", 40, 16)


def test_every_causal_sequence_mechanism_is_sized_and_runs():
    import attnkit as ak
    from attnkit.bench.cases.quality import causal_sequence_mechanisms

    names, skipped = causal_sequence_mechanisms()
    assert "mha" in names and "linear_attention" in names
    for spec in ak.list_mechanisms():
        assert (spec.name in names) != (spec.name in skipped)
        if spec.name in skipped:
            assert skipped[spec.name]
    for name in names:
        cfg = mechanism_config(ak.info(name), 32, 24)
        assert ak.info(name).input_shape(cfg)[1:] == (24, 32) and cfg["causal"] is True
        torch.manual_seed(0)
        m = TinyLM(name, vocab_size=20, seq_len=24, width=32)
        assert m(torch.randint(0, 20, (2, 24))).shape == (2, 24, 20), name


def test_mechanism_config_lowers_heads_that_do_not_divide_the_width():
    import attnkit as ak

    cfg = mechanism_config(ak.info("mha"), 18, 24)  # registered with 4 heads, 2 key/value heads
    assert cfg["num_heads"] == 3 and cfg["num_kv_heads"] == 1
    assert TinyLM("mha", vocab_size=8, seq_len=24, width=18)(torch.zeros(1, 24, dtype=torch.long)).shape == (1, 24, 8)
    assert mechanism_config(ak.info("mha"), 64, 24)["num_heads"] == 4  # a count that divides is kept


def test_cosine_schedule():
    assert cosine_lr(0, 100, 0.1) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 0.1) == pytest.approx(1.0)
    assert cosine_lr(10, 100, 0.1) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 0.1) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 0.1) == pytest.approx(0.0)


def test_train_task_learns_memorization_and_is_reproducible():
    # memorization is learned by the MLP alone: a short run must clear chance (1/128) by far
    cfg = TrainConfig(steps=120, batch_size=16, lr=1e-2, width=32, train_examples=256, test_examples=64, seed=1)
    params = {"vocab_size": 32, "seq_len": 16}
    torch.set_num_threads(1)
    r = train_task("mha", "memorization", params, cfg)
    assert r.accuracy > 0.5 and r.steps == 120 and r.train_s > 0 and r.steps_per_s > 0
    r2 = train_task("mha", "memorization", params, cfg)
    assert r2.accuracy == r.accuracy and r2.final_loss == r.final_loss
    row = r.row()
    assert {"mechanism", "task", "width", "seed", "accuracy", "train_s", "steps_per_s"} <= set(row)
    assert 0.0 <= row["accuracy"] <= 1.0


def test_quality_case_setup_records_training_and_times_the_forward(monkeypatch):
    from attnkit.bench.cases import quality as q

    s = q.Setting("mqar", (("seq_len", 32), ("num_kv_pairs", 4)), steps=20, lr=3e-3, study="quick")
    case = q._case("mha", s, 32, 0, {"quality-quick"})
    assert case.op == "mha" and case.param["task"] == "mqar" and case.param["width"] == 32
    runner = case.setup()
    p = runner.params
    assert p["mechanism"] == "mha" and p["task"] == "mqar" and p["steps"] == 20 and p["width"] == 32
    assert 0.0 <= p["accuracy"] <= 1.0 and p["train_s"] > 0 and p["steps_per_s"] > 0
    assert json.loads(p["task_params"])["seq_len"] == 32
    assert p["history"] == [] and p["nonfinite"] == []  # quick cases: no early-stop probes
    out = runner.run()
    assert out.shape == (q.EVAL_BATCH, 32, TASKS["mqar"].vocab_size())
    all_cases = q.cases()
    ids = [c.id for c in all_cases]
    assert len(ids) == len(set(ids))
    quick = [c for c in all_cases if "quality-quick" in c.suites]
    names, _ = q.causal_sequence_mechanisms()
    assert {c.op for c in quick} == set(names)
    from attnkit.bench.suites import get_suite

    assert get_suite("quality").memory is False and get_suite("quality-quick").name == "quality-quick"


def _rec(mech, task, width, seed, acc, study="grid", n=64):
    return {"kind": "case", "id": f"{mech}/{task}/{width}/{seed}/{study}", "op": mech, "impl": "tinylm",
            "group": f"g/{task}/{width}/{seed}", "status": "ok", "median_s": 0.002,
            "params": {"mechanism": mech, "task": task, "width": width, "seed": seed, "accuracy": acc,
                       "study": study, "N": n, "layers": 2, "lr": 3e-3, "train_s": 10.0 + acc, "steps": 100,
                       "steps_per_s": 10.0, "fwd_peak_rss_mb": 12.0}}


def test_report_quality_tables_and_plots(tmp_path):
    from attnkit.bench import report_quality as rq

    cases = [_rec(m, t, w, 0, a) for m, a in (("mha", 0.95), ("linear_attention", 0.3))
             for t in ("mqar", "compression") for w in (32, 64)]
    cases += [_rec(m, "mqar", 64, s, a + 0.01 * s, "ordering", 256) for m, a in (("mha", 0.9), ("linear_attention",
                                                                                               0.2)) for s in range(3)]
    cases.append({**_rec("moa", "mqar", 32, 0, 0.0), "status": "error", "reason": "setup: boom"})
    header, rows = rq.pick_table(cases)
    assert header[:4] == ["width", "mechanism", "mqar N=64", "compression"]
    assert [r[1] for r in rows] == ["mha", "linear_attention", "mha", "linear_attention"]  # best first per width
    assert rows[0][4] == "95.0" and rows[0][5] == "2" and rows[0][6] == "12"
    header, rows = rq.ordering_table(cases)
    assert rows[0][0] == "mha" and rows[0][2] == "3" and rows[0][3] == "91.0" and rows[0][4] == "1.0"
    assert rows[1][5] == "20.0–22.0"
    assert rq.failed_table(cases)[1] == [["moa", "g/mqar/32/0", "error", "setup: boom"]]
    titles = [t.title for t in rq.quality_sections({"cases": cases})]
    assert any("which mechanism to pick" in t for t in titles) and any("ordering" in t for t in titles)
    notes = next(t for t in rq.quality_sections({"cases": cases}) if "ordering" in t.title).notes
    assert any("meets the 90% mark" in n for n in notes)  # worst mha seed 90.0%
    skipped = next(t for t in rq.quality_sections({"cases": cases}) if "skip" in t.title)
    assert any(r[0] == "agent_attention" for r in skipped.rows)  # skipped, with its reason
    assert rq.quality_plots(cases, tmp_path)
    assert (tmp_path / "quality_accuracy_vs_width.png").stat().st_size > 1000
    assert (tmp_path / "quality_accuracy_vs_time.png").stat().st_size > 1000
    assert rq.quality_sections({"cases": [{"kind": "case", "op": "x", "impl": "blocked", "params": {}}]}) == []


def test_report_shows_quality_sections_and_figures(tmp_path):
    """The quality tables and plots reach report.md and report.html through SECTIONS / FIGURE_MAKERS."""
    from attnkit.bench import report

    cases = [_rec(m, "mqar", 64, s, a, "ordering", 256) for m, a in (("mha", 0.95), ("linear_attention", 0.2))
             for s in range(3)]
    lines = [{"kind": "run", "suite": "quality", "run_id": "r1", "time": 0}]
    lines += [{**c, "suite": "quality", "suites": ["quality"], "run_id": "r1", "pass": "fwd", "impl": "tinylm"}
              for c in cases]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    paths = report.write_reports(tmp_path)
    md = paths["md"].read_text()
    assert "MQAR ordering study" in md and "meets the 90% mark" in md and "quality_accuracy_vs_time.png" in md
    assert "75.0 points below mha" in md
    assert "MQAR ordering study" in paths["html"].read_text()


def test_time_limit_stops_training_and_every_quality_case_is_its_own_unit():
    from attnkit.bench.cases import quality as q
    from attnkit.bench.harness import units

    r = train_task("mha", "mqar", {"seq_len": 32, "num_kv_pairs": 4},  # no compiled kernel to build first
                   TrainConfig(steps=100_000, width=16, batch_size=4, time_limit_s=0.3, test_examples=8))
    assert 1 <= r.steps < 100_000 and r.train_s < 5.0 and r.row()["time_limit_s"] == 0.3
    cs = q.cases()
    assert all(len(u) == 1 for u in units(cs))  # one child and one results line per trained model
    assert q._trained_path("mha", q.QUICK_MQAR, 32, 0) is None  # no training cache outside the bench worker
    quick = [c for c in cs if "quality-quick" in c.suites]
    assert all(c.param["study"] == "quick" for c in quick)
