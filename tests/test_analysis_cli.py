"""``attnkit analyze`` (the typer sub-app in attnkit.analysis.cli) on all-MiniLM-L6-v2: PNGs and a JSON."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from attnkit.analysis.cli import app
from peers import skip_if_no_minilm, skip_if_no_transformers


def _cli() -> typer.Typer:
    root = typer.Typer()
    root.add_typer(app, name="analyze")
    return root


def test_analyze_writes_pictures_and_numbers(tmp_path):
    skip_if_no_transformers()
    skip_if_no_minilm()
    res = CliRunner().invoke(_cli(), ["analyze", "--model", "minilm", "--text", "The cat sat on the mat.",
                                      "--analysis", "rollout", "--analysis", "sinks", "--analysis", "heads",
                                      "--analysis", "prune", "--analysis", "flow", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data["tokens"][0] == "[CLS]" and data["tokens"][-1] == "[SEP]"
    assert abs(sum(data["rollout_cls_row"]) - 1) < 1e-5
    assert all(0 <= v <= 1 + 1e-9 for v in data["flow_cls_row"])
    assert len(data["cls_sep_share_per_layer"]) == 6
    assert 0 < data["prune"]["embedding_cosine"] <= 1 + 1e-6
    for name in ("rollout.png", "sinks.png", "heads_layer5.png", "flow.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_analyze_names_a_bad_layer_or_analysis(tmp_path):
    skip_if_no_transformers()
    skip_if_no_minilm()
    res = CliRunner().invoke(_cli(), ["analyze", "--text", "Hi there.", "--layer", "9", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "layer 9 does not exist" in res.output
    res = CliRunner().invoke(_cli(), ["analyze", "--text", "Hi.", "--analysis", "magic", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "magic" in res.output
