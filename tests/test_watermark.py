"""cnp.data.watermark: the pretraining corpus's style distribution and random texts."""

from __future__ import annotations

import torch

from cnp.data.synthetic import CorpusConfig
from cnp.data.watermark import StyleDistribution, random_text


def test_random_text_is_word_like_and_seeded():
    texts = [random_text(torch.Generator().manual_seed(s)) for s in range(200)]
    assert texts == [random_text(torch.Generator().manual_seed(s)) for s in range(200)]   # deterministic
    assert len(set(texts)) > 150                                                          # varied
    assert all(t.strip() and t.isprintable() for t in texts)
    core = [t.removeprefix("(c) ") for t in texts]
    assert all(3 <= len(t.split(" ")[0].rstrip("0123456789")) <= 7 for t in core)
    assert any(t.isupper() for t in core) and any(t.islower() for t in core) and any(t.startswith("(c) ") for t in texts)


def test_style_distribution_random_text_rate():
    g = torch.Generator().manual_seed(0)
    fixed = {StyleDistribution().sample(g).wm_text for _ in range(100)}
    assert fixed <= set(StyleDistribution().texts)
    g = torch.Generator().manual_seed(0)
    drawn = [StyleDistribution(random_text_rate=1.0).sample(g).wm_text for _ in range(100)]
    assert sum(t in StyleDistribution().texts for t in drawn) <= 1     # (a chance collision at most)
    assert len(set(drawn)) > 50


def test_corpus_recipe_unchanged_without_random_texts():
    """The default corpus keeps its recipe (so its cached backbone stays valid); random texts
    change it."""
    default = CorpusConfig().recipe()
    assert "random_text_rate" not in default["wm_styles"]
    other = CorpusConfig(wm_styles=StyleDistribution(random_text_rate=0.5)).recipe()
    assert other["wm_styles"]["random_text_rate"] == 0.5 and other != default
