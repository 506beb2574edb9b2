"""Every paper of the cross-attention work is either a registered mechanism or named, with its arXiv id, in
the notes of the registered mechanism it builds on (the papers that add no operator beyond plain
cross-attention or a pointer distribution)."""

from __future__ import annotations

import pytest

import attnkit as ak
from attnkit.mechanisms.cross_unregistered import NOT_REGISTERED

# (arXiv id, short title): the seed papers whose contribution is cross-modal / cross-branch attention
REGISTERED = {
    "2308.06721": "IP-Adapter", "2103.14899": "CrossViT", "2408.14023": "Video-CCAM",
    "2205.02151": "Dual Cross-Attention Learning", "2505.17020": "CrossLMM", "2111.07783": "FILIP",
    "2408.15966": "More Text, Less Point", "2211.07198": "Fcaformer", "2203.11082": "MixFormer",
    "2410.17779": "ADEM-VL", "2408.11795": "EE-MLLM", "2501.11276": "ITCFN", "2312.00777": "VideoBooth",
    "2010.15831": "RelationNet++", "2406.16860": "Cambrian-1", "2303.10438": "Spatial-Aware Token",
}
# (arXiv id) -> (title words the note must carry, the registered mechanism whose notes name it)
IN_NOTES = {
    "2506.03928": ("Vision Remember", "cambrian_sva"),
    "2307.13254": ("Conditional Cross Attention Network", "mha"),
    "2104.08541": ("TransVG", "mha"),
    "2407.13335": ("OAT", "bvr"),
}


def test_registered_papers_have_their_arxiv_id():
    ids = {s.paper.arxiv for s in ak.list_mechanisms()}
    missing = {a: t for a, t in REGISTERED.items() if a not in ids}
    assert not missing, f"cross papers without a registered mechanism: {missing}"


@pytest.mark.parametrize("arxiv", sorted(IN_NOTES))
def test_no_op_papers_are_named_in_the_notes_of_the_mechanism_they_build_on(arxiv):
    title, host = IN_NOTES[arxiv]
    assert arxiv not in {s.paper.arxiv for s in ak.list_mechanisms()}, "registered: move it to REGISTERED"
    notes = ak.info(host).notes
    assert f"arXiv {arxiv}" in notes and title in notes, (host, notes)
    sentence = notes[notes.index(title):]
    assert "adds no" in sentence[:200], f"{host}'s notes must say why {title} adds no operator"


def test_every_cross_paper_is_covered_and_nothing_is_left_unregistered():
    notes = " ".join(s.notes for s in ak.list_mechanisms())
    ids = {s.paper.arxiv for s in ak.list_mechanisms()}
    for arxiv in (*REGISTERED, *IN_NOTES):
        assert arxiv in ids or f"arXiv {arxiv}" in notes, arxiv
    assert NOT_REGISTERED == {}
