"""Tests of cnp.pruning: surgery (= masking), selection, normalisation, LRP aggregation, CNP vs
vanilla ranking, a full-size VGG-16 step, and the schedule (curves, resume, errors)."""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

import cnp.pruning.ranking as ranking
import cnp.pruning.schedule as schedule
from cnp.data.splits import Split
from cnp.images import normalize_images
from cnp.io import CNPError
from cnp.lrp import LRP
from cnp.models import count_macs, count_params, full_vgg16
from cnp.pruning import PruneConfig, mask_filters, remove_filters, run_pruning
from cnp.pruning.ranking import (
    filter_scores,
    l1_filter_scores,
    lrp_filter_scores,
    normalise_per_layer,
    protected_indices,
    random_filter_scores,
    select_filters,
)
from cnp.virtual_layer import get_virtual_layer, insert_virtual_layer

D = 16
TINY_WIDTHS = [4, 4, 8, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16]
CONV_NAMES = [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _split(images, labels=None, name="rank"):
    n = images.shape[0]
    labels = torch.ones(n, dtype=torch.long) if labels is None else labels
    return Split(images=images, labels=labels, wm=torch.zeros(n, dtype=torch.bool),
                 masks=torch.zeros(n, images.shape[-2], images.shape[-1], dtype=torch.bool), name=name)


# ============================================================================ surgery
@pytest.mark.parametrize("pool_size, size", [(1, 32), (2, 64)])
@pytest.mark.parametrize("remove", [
    {0: [1]},                                    # the first conv
    {12: [0, 3, 15]},                            # the last conv: fc6 column blocks
    {4: [2, 5], 5: [0, 7]},                      # two consecutive convs
    {i: [0] for i in range(13)},                 # every conv at once
    {0: [0, 1, 2], 12: list(range(1, 16)), 7: [4]},
], ids=["first", "last", "consecutive", "all-layers", "extremes"])
def test_removal_equals_masking(make_tiny_vgg, make_images, pool_size, size, remove):
    model = make_tiny_vgg(bias_std=0.1, pool_size=pool_size)
    x = normalize_images(make_images(3, size))
    masked = mask_filters(copy.deepcopy(model), remove)
    removed = remove_filters(copy.deepcopy(model), remove)
    ref = _logits(masked, x)
    assert torch.allclose(_logits(removed, x), ref, atol=1e-5 * float(ref.abs().max()))
    assert not torch.allclose(ref, _logits(model, x), atol=1e-4)  # something was removed
    widths = [w - len(remove.get(i, [])) for i, w in enumerate(TINY_WIDTHS)]
    assert removed.conv_widths == widths
    assert removed.classifier[0].in_features == widths[-1] * pool_size**2
    assert removed.arch["conv_widths"] == widths
    # masking needs the bias too: zeroing the weights only is not the same network
    w_only = copy.deepcopy(model)
    with torch.no_grad():
        for ci, idx in remove.items():
            w_only.convs[ci].weight[idx] = 0
    assert not torch.allclose(_logits(w_only, x), ref, atol=1e-4)


def test_removal_keeps_layer_names(make_tiny_vgg, make_images):
    model = make_tiny_vgg(bias_std=0.1)
    names = [n for n, _ in model.named_modules()]
    types = [type(m) for _, m in model.named_modules()]
    keys = list(model.state_dict())
    remove_filters(model, {0: [0], 9: [3], 12: [1, 2]})
    assert [n for n, _ in model.named_modules()] == names
    assert [type(m) for _, m in model.named_modules()] == types
    assert list(model.state_dict()) == keys
    assert model.features[21].out_channels == 15  # conv4_3 is still features.21
    assert count_params(model) < count_params(make_tiny_vgg())
    model(normalize_images(make_images(1)))


def test_removal_with_a_virtual_layer_attached(tiny_vgg, make_images, random_U):
    """Removing filters around the DRSA layer (not in it) keeps the virtual layer working."""
    x = normalize_images(make_images(2))
    vl = insert_virtual_layer(tiny_vgg, random_U(D), 4, ablated=[0])
    remove_filters(tiny_vgg, {8: [0, 1], 10: [2]})
    assert get_virtual_layer(tiny_vgg) is vl
    out = LRP(tiny_vgg).attribute(x, 1, filters=True)
    assert torch.allclose(vl.last_concept_relevance.sum(1), out.target_logit, atol=1e-4)


def test_removal_errors(tiny_vgg):
    with pytest.raises(CNPError, match="conv index 13"):
        remove_filters(tiny_vgg, {13: [0]})
    with pytest.raises(CNPError, match="out of range"):
        remove_filters(tiny_vgg, {0: [4]})
    with pytest.raises(CNPError, match="out of range"):
        remove_filters(tiny_vgg, {0: [-1]})
    with pytest.raises(CNPError, match="all 4 filters"):
        remove_filters(tiny_vgg, {0: [0, 1, 2, 3]})
    assert tiny_vgg.conv_widths == TINY_WIDTHS  # nothing half-done
    remove_filters(tiny_vgg, {0: [], 1: [2, 2]})  # empty lists and duplicates are fine
    assert tiny_vgg.conv_widths[:2] == [4, 3]


# ============================================================================ selection
def test_select_filters_respects_protection_and_min_keep():
    scores = [torch.tensor([0.0, 0.0, 0.0, 0.0]),     # lowest everywhere: would be emptied
              torch.tensor([1.0, 2.0, 3.0]),
              torch.tensor([0.0, 0.0, 0.1])]          # protected
    chosen = select_filters(scores, 5, protected={2}, normalise=False)
    assert 2 not in chosen
    assert chosen[0].tolist() == [0, 1, 2]             # one filter stays
    assert chosen[1].tolist() == [0, 1]
    assert sum(len(v) for v in chosen.values()) == 5
    chosen = select_filters(scores, 1, protected={2}, min_keep=3, normalise=False)
    assert {k: v.tolist() for k, v in chosen.items()} == {0: [0]}
    with pytest.raises(CNPError, match="only 1 filters can be removed while keeping 3"):
        select_filters(scores, 2, protected={2}, min_keep=3, normalise=False)
    with pytest.raises(CNPError, match="only 5 filters"):
        select_filters(scores, 6, protected={2}, normalise=False)
    with pytest.raises(CNPError, match="negative"):
        select_filters(scores, -1, protected=set())
    with pytest.raises(CNPError, match="every conv layer is protected"):
        select_filters(scores, 1, protected={0, 1, 2})
    assert select_filters(scores, 0, protected=set()) == {}


def test_select_filters_breaks_ties_deterministically():
    scores = [torch.ones(4), torch.ones(4)]
    a = select_filters(scores, 3, protected=set())
    b = select_filters([s.clone() for s in scores], 3, protected=set())
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in b.items()} == {0: [0, 1, 2]}


def test_protected_indices(tiny_vgg):
    assert protected_indices(tiny_vgg, ("conv4_3",)) == {9}
    assert protected_indices(tiny_vgg, ["conv1_1", "features.28"]) == {0, 12}
    with pytest.raises(CNPError, match="unknown layer name"):
        protected_indices(tiny_vgg, ("conv4_4",))
    with pytest.raises(CNPError, match="not a convolution"):
        protected_indices(tiny_vgg, ("relu4_3",))


def test_normalise_per_layer_sum_is_the_papers_rule():
    """``sum`` (the default): v / sum(v) per layer, signed scores kept signed, as in Yeom et al.'s
    ``normalize_ranks_per_layer`` and the paper's code; a zero-sum layer is left as it is."""
    v = [torch.tensor([1.0, 3.0]), torch.zeros(3), torch.tensor([-1.0, 2.0, 1.0]), torch.tensor([-1.0, -3.0])]
    out = normalise_per_layer(v)
    assert out[0].tolist() == [0.25, 0.75]
    assert out[1].tolist() == [0.0, 0.0, 0.0]
    assert out[2].tolist() == [-0.5, 1.0, 0.5]              # the negative filter ranks lowest
    assert out[3].tolist() == [0.25, 0.75]                   # a negative total flips the signs, as v / sum(v)
    assert all(float(o.sum()) == pytest.approx(1.0) for o in (out[0], out[2], out[3]))
    # a layer's scale does not matter
    scaled = normalise_per_layer([7.0 * v[0], v[1], 0.01 * v[2], 3.0 * v[3]])
    assert all(torch.allclose(a, b) for a, b in zip(out, scaled))
    # global ranking after v / sum(v): with equal layer totals the wide layer's filters are smaller
    narrow, wide = torch.full((4,), 1.0), torch.full((16,), 0.25)
    chosen = select_filters([narrow, wide], 4, protected=set())
    assert {k: v.tolist() for k, v in chosen.items()} == {1: [0, 1, 2, 3]}
    with pytest.raises(CNPError, match="normalisation must be one of"):
        normalise_per_layer(v, "median")


def test_normalise_per_layer_mean_variant():
    v = [torch.tensor([1.0, 3.0]), torch.zeros(3), torch.tensor([-1.0, 2.0, 1.0])]
    out = normalise_per_layer(v, "mean")
    assert float(out[0][1] / out[0][0]) == pytest.approx(3.0)   # proportional within a layer
    assert out[1].tolist() == [0.0, 0.0, 0.0]                     # an all-zero layer stays zero
    assert (out[2] > 0).all()                                     # signed scores: by |v|
    assert float(out[2][1] / out[2][0]) == pytest.approx(2.0)
    # a layer's scale does not matter
    scaled = normalise_per_layer([7.0 * v[0], v[1], 0.01 * v[2]], "mean")
    assert all(torch.allclose(a, b) for a, b in zip(out, scaled))


def test_normalisation_matters_when_layer_totals_differ():
    """A layer with a large total (e.g. larger weights for L1, or a layer that leaks relevance)
    is never pruned by the raw global ranking; normalised, its weakest filter goes first."""
    big = torch.tensor([10.0, 30.0, 30.0, 30.0])      # total 100, weakest filter 10 %
    small = torch.tensor([0.3, 0.3, 0.2, 0.2])         # total 1, weakest filters 20 %
    raw = select_filters([big, small], 1, protected=set(), normalise=False)
    norm = select_filters([big, small], 1, protected=set(), normalise=True)
    assert {k: v.tolist() for k, v in raw.items()} == {1: [2]}
    assert {k: v.tolist() for k, v in norm.items()} == {0: [0]}


def test_normalisation_protects_a_wide_layer_with_the_same_total():
    narrow = torch.tensor([0.5, 1.0, 1.25, 1.25])                     # 4 filters, total 4
    wide = torch.linspace(0.15, 0.35, 16) * (4.0 / torch.linspace(0.15, 0.35, 16).sum())  # 16, total 4
    assert float(narrow.sum()) == pytest.approx(float(wide.sum()))
    raw = select_filters([narrow, wide], 4, protected=set(), normalise=False)
    norm = select_filters([narrow, wide], 4, protected=set(), normalisation="mean")
    assert {k: v.tolist() for k, v in raw.items()} == {1: [0, 1, 2, 3]}  # raw: only the wide layer
    # the mean variant should make the two layers comparable: the narrow layer's clearly
    # weakest filter (half its layer's mean) goes before the wide layer's near-average ones
    assert 0 in norm and norm[0].tolist() == [0]


# ============================================================================ scores
class _FakeLRP:
    """Stands in for cnp.lrp.LRP in ranking: fixed relevance maps (n, C, 2 positions) per image,
    keyed by the image's first normalised value."""

    maps: dict = {}

    def __init__(self, model, config=None):
        self.convs = [(n, m.out_channels) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]

    def attribute(self, x, target, filters=False, input_relevance=True, layers=()):
        assert target == 1 and filters
        rel, rel_abs = {}, {}
        for name, width in self.convs:
            per = []
            for i in range(x.shape[0]):
                key = round(float(x[i, 0, 0, 0]), 3)
                m = self.maps[key] if name == "features.0" else torch.zeros(width, 2)
                per.append(m)
            R = torch.stack(per)
            rel[name], rel_abs[name] = R.sum(2), R.abs().sum(2)
        return SimpleNamespace(filter_relevance=rel, filter_relevance_abs=rel_abs)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_aggregation_conventions_on_a_constructed_example(monkeypatch, tiny_vgg, batch_size):
    """conv1_1's relevance maps (4 filters x 2 positions), image A and image B:

        A: f0 [2, -1]  f1 [1, 1]   f2 [-3, 0]  f3 [0.5, 0]
        B: f0 [-3, 1]  f1 [1, -1]  f2 [1, 0]   f3 [0, 0]

    abs        (sum |R|):          f0 3+4 = 7,  f1 2+2 = 4, f2 3+1 = 4, f3 0.5
    abs_of_sum (sum_img |sum_pos|): f0 1+2 = 3,  f1 2+0 = 2, f2 3+1 = 4, f3 0.5
    signed     (sum R):            f0 1-2 = -1, f1 2+0 = 2, f2 -3+1 = -2, f3 0.5
    A negative image C (huge relevance) only counts with ranking_data='pos+neg'.
    """
    images = torch.stack([torch.full((3, 32, 32), v, dtype=torch.uint8) for v in (10, 20, 30)])
    keys = [round(float(normalize_images(images[i:i + 1])[0, 0, 0, 0]), 3) for i in range(3)]
    _FakeLRP.maps = {
        keys[0]: torch.tensor([[2.0, -1.0], [1.0, 1.0], [-3.0, 0.0], [0.5, 0.0]]),
        keys[1]: torch.tensor([[-3.0, 1.0], [1.0, -1.0], [1.0, 0.0], [0.0, 0.0]]),
        keys[2]: torch.full((4, 2), 100.0),
    }
    monkeypatch.setattr(ranking, "LRP", _FakeLRP)
    split = _split(images, labels=torch.tensor([1, 1, 0]))
    expected = {"abs": [7.0, 4.0, 4.0, 0.5], "abs_of_sum": [3.0, 2.0, 4.0, 0.5], "signed": [-1.0, 2.0, -2.0, 0.5]}
    for agg, want in expected.items():
        s = lrp_filter_scores(tiny_vgg, split, aggregation=agg, batch_size=batch_size)
        assert len(s) == 13 and [v.numel() for v in s] == TINY_WIDTHS
        assert s[0].dtype == torch.float64
        assert s[0].tolist() == want
        assert all((v == 0).all() for v in s[1:])
    s = lrp_filter_scores(tiny_vgg, split, aggregation="abs", ranking_data="pos+neg", batch_size=batch_size)
    assert s[0].tolist() == [207.0, 204.0, 204.0, 200.5]
    # the lowest-scoring filter by each convention (no other layer in play)
    sel = {agg: select_filters(lrp_filter_scores(tiny_vgg, split, aggregation=agg), 1,
                               protected=set(range(1, 13)), normalise=False)[0].tolist()
           for agg in expected}
    assert sel == {"abs": [3], "abs_of_sum": [3], "signed": [2]}


def test_lrp_scores_match_the_relevance_maps(tiny_vgg, make_images):
    images = make_images(4, seed=3)
    split = _split(images)
    out = LRP(tiny_vgg).attribute(normalize_images(images), 1, layers=["conv1_1", "conv5_2", "conv5_3"])
    for agg in ("abs", "abs_of_sum", "signed"):
        s = lrp_filter_scores(tiny_vgg, split, aggregation=agg, batch_size=3)
        for ci, name in ((0, "features.0"), (11, "features.26"), (12, "features.28")):
            R = out.layer_relevance[name].double()
            want = {"abs": R.abs().sum((0, 2, 3)), "abs_of_sum": R.sum((2, 3)).abs().sum(0),
                    "signed": R.sum((0, 2, 3))}[agg]
            assert torch.allclose(s[ci], want, rtol=1e-5, atol=1e-8)
    abs_, aos = (lrp_filter_scores(tiny_vgg, split, aggregation=a)[11] for a in ("abs", "abs_of_sum"))
    assert (abs_ >= aos - 1e-9).all() and (abs_ > aos + 1e-6).any()


def test_ranking_input_errors(tiny_vgg, make_images):
    split = _split(make_images(2), labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(CNPError, match="no positive images"):
        lrp_filter_scores(tiny_vgg, split)
    with pytest.raises(CNPError, match="ranking_data"):
        lrp_filter_scores(tiny_vgg, split, ranking_data="neg")
    with pytest.raises(CNPError, match="aggregation"):
        lrp_filter_scores(tiny_vgg, split, aggregation="max")
    with pytest.raises(CNPError, match="unknown ranking criterion"):
        filter_scores(tiny_vgg, "taylor")
    with pytest.raises(CNPError, match="needs a ranking split"):
        filter_scores(tiny_vgg, "lrp")


def test_rank_split_positives_then_negatives(tiny_pair):
    """The synthetic ranking set holds n_rank positives (the same images, in the same order, as
    when it held only positives, so 'pos' rankings are unchanged) followed by n_rank negatives
    with the training bias - without them ranking_data='pos+neg' would silently equal 'pos'."""
    from cnp.data.synthetic import PairConfig, _biased_counts, _make_split

    rank = tiny_pair["rank"]
    assert rank.labels.tolist() == [1] * 6 + [0] * 6
    cfg = PairConfig(pair="carton-dugong", seed=0, image_size=32, n_train_per_class=8,
                     n_drsa=6, n_rank=6, n_val_per_subgroup=2, n_test_per_subgroup=3)
    positives_only = _make_split(cfg, "rank", _biased_counts(6, 0, cfg.wm_rate_pos, 0))
    assert torch.equal(rank.images[:6], positives_only.images) and torch.equal(rank.wm[:6], positives_only.wm)
    # the negatives are new images, none shared with the training split
    train = {bytes(x.numpy()) for x in tiny_pair["train"].images}
    assert not any(bytes(x.numpy()) in train for x in rank.images[6:])
    # the layout is part of the pair's cache key, not of the pretraining corpus's (whose key
    # names the cached backbone: a rank-split change must not retrain it)
    from cnp.data.synthetic import RANK_LAYOUT, CorpusConfig
    assert cfg.recipe()["rank_layout"] == RANK_LAYOUT == 2
    assert "rank_layout" not in CorpusConfig().recipe()


def test_split_concat_keeps_order_and_checks_extra_masks(tiny_pair):
    from cnp.data.splits import Split

    a, b = tiny_pair["val"], tiny_pair["test"]
    c = Split.concat([a, b], name="both")
    assert len(c) == len(a) + len(b) and c.name == "both"
    assert torch.equal(c.images[len(a):], b.images) and torch.equal(c.labels[:len(a)], a.labels)
    odd = Split(images=a.images, labels=a.labels, wm=a.wm, masks=a.masks, name="odd",
                extra_masks={"ball": a.masks})
    with pytest.raises(CNPError, match="different extra masks"):
        Split.concat([a, odd], name="x")
    with pytest.raises(CNPError, match="at least one"):
        Split.concat([], name="x")


def test_ranking_data_pos_neg_uses_the_negatives(tiny_vgg, tiny_pair):
    """'pos' scores equal the scores on the positives alone; 'pos+neg' adds the negatives'."""
    rank = tiny_pair["rank"]
    pos = lrp_filter_scores(tiny_vgg, rank, ranking_data="pos")
    pos_only = lrp_filter_scores(tiny_vgg, rank.positives(), ranking_data="pos+neg")
    both = lrp_filter_scores(tiny_vgg, rank, ranking_data="pos+neg")
    neg = lrp_filter_scores(tiny_vgg, rank.subset(torch.nonzero(rank.labels == 0).flatten()), ranking_data="pos+neg")
    for a, b, c, d in zip(pos, pos_only, both, neg):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)
        assert torch.allclose(c, a + d, rtol=1e-4, atol=1e-8)
    assert any(not torch.allclose(a, c) for a, c in zip(pos, both))


def test_l1_and_random_scores(tiny_vgg):
    l1 = l1_filter_scores(tiny_vgg)
    assert [v.numel() for v in l1] == TINY_WIDTHS
    assert float(l1[3][5]) == pytest.approx(float(tiny_vgg.convs[3].weight[5].detach().abs().sum()), rel=1e-6)
    r1 = random_filter_scores(tiny_vgg, torch.Generator().manual_seed(4))
    r2 = filter_scores(tiny_vgg, "random", generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(r1, r2))
    assert all(((v >= 0) & (v < 1)).all() for v in r1)


def test_cnp_ranking_differs_from_vanilla_when_a_subspace_is_ablated(tiny_vgg, make_images, random_U):
    split = _split(make_images(6, seed=5))
    vanilla = lrp_filter_scores(tiny_vgg, split)
    vl = insert_virtual_layer(tiny_vgg, random_U(D), 4)
    same = lrp_filter_scores(tiny_vgg, split)  # nothing ablated: the same relevance
    for v, s in zip(vanilla, same):
        assert torch.allclose(v, s, rtol=1e-4, atol=1e-6 * float(v.max()))
    vl.set_ablation([0])
    cnp = lrp_filter_scores(tiny_vgg, split)
    changed = [i for i, (v, c) in enumerate(zip(vanilla, cnp)) if not torch.allclose(v, c, rtol=1e-3)]
    assert set(range(10)) <= set(changed)  # every conv up to conv4_3 sees the ablation
    n = 30
    sel_v = select_filters(vanilla, n, protected={9})
    sel_c = select_filters(cnp, n, protected={9})
    assert {k: v.tolist() for k, v in sel_v.items()} != {k: v.tolist() for k, v in sel_c.items()}
    vl.enabled = False  # bypassed: vanilla again
    bypassed = lrp_filter_scores(tiny_vgg, split)
    assert all(torch.equal(v, b) for v, b in zip(vanilla, bypassed))


@pytest.mark.slow
def test_full_size_vgg16_ranking_and_removal_step(init_vgg, make_images):
    """full_vgg16(2), 224 px, batch 2: one LRP ranking + removal of 5 % of the prunable filters."""
    model = init_vgg(full_vgg16(2), seed=0, head_scale=0.1)
    split = _split(make_images(2, 224, seed=0))
    x = normalize_images(split.images)
    protect = protected_indices(model, ("conv4_3",))
    n_prunable = sum(w for i, w in enumerate(model.conv_widths) if i not in protect)
    assert n_prunable == 4224 - 512
    scores = lrp_filter_scores(model, split, batch_size=2)
    assert all(torch.isfinite(s).all() for s in scores)
    n_remove = round(0.05 * n_prunable)
    chosen = select_filters(scores, n_remove, protect)
    assert 9 not in chosen and sum(len(v) for v in chosen.values()) == n_remove == 186
    widths = [w - len(chosen.get(i, [])) for i, w in enumerate(model.conv_widths)]
    masked_logits = _logits(mask_filters(copy.deepcopy(model), chosen), x)
    remove_filters(model, chosen)
    assert model.conv_widths == widths and widths[9] == 512 and sum(widths) == 4224 - 186
    assert model.classifier[0].in_features == widths[-1] * 49
    out = _logits(model, x)
    assert out.shape == (2, 2)
    assert torch.allclose(out, masked_logits, atol=1e-4 * float(masked_logits.abs().max()))
    assert count_macs(model, 224) < count_macs(full_vgg16(2).to("meta"), 224)


# ============================================================================ schedule
CFG = PruneConfig(step=0.25, target=0.5, epochs_per_step=1, final_epochs=1, wm_share_images=8)
N_PRUNABLE = sum(TINY_WIDTHS) - 16  # conv4_3 protected


def _concept_state(U):
    return {"U": U, "K": 4, "ablated": [0], "mode": "zero", "mean_activation": None, "layer": "relu4_3"}


def _curves_equal(c1, c2):
    def norm(v):
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, float) and math.isnan(v):
            return "nan"
        return v
    return [norm(e) for e in c1] == [norm(e) for e in c2]


def test_rate_of_prunable_and_unreachable_targets(tiny_vgg, tiny_pair):
    """``rate_of='prunable'`` counts the rate over the unprotected convs only; a target that
    cannot be reached over all filters stops before any work with a hint."""
    with pytest.warns(UserWarning, match="catastrophic"):
        cfg = PruneConfig(step=0.25, target=0.5, rate_of="prunable", epochs_per_step=0, final_epochs=0,
                          wm_share_images=0)
    res = run_pruning(tiny_vgg, tiny_pair, "l1", cfg, seed=0, verbose=False)
    assert [e["filters"] for e in res.curve] == [sum(TINY_WIDTHS) - r for r in (0, 32, 64, 64)]
    assert [e["pruned"] for e in res.curve] == [e["pruned_of_prunable"] for e in res.curve] == [0.0, 0.25, 0.5, 0.5]
    assert res.curve[-1]["pruned_of_all"] == pytest.approx(64 / 144)
    with pytest.warns(UserWarning, match="catastrophic"):
        too_far = PruneConfig(step=0.5, target=0.95, epochs_per_step=0, final_epochs=0)
    with pytest.raises(CNPError, match="cannot be reached.*rate_of='prunable'"):
        run_pruning(tiny_vgg, tiny_pair, "l1", too_far, seed=0, verbose=False)
    with pytest.raises(CNPError, match="rate_of must be one of"):
        PruneConfig(rate_of="some")


@pytest.mark.parametrize("method", ["cnp", "vanilla", "l1", "random"])
def test_run_pruning_curves(tiny_vgg, tiny_pair, random_U, method):
    original = copy.deepcopy(tiny_vgg.state_dict())
    cs = _concept_state(random_U(D)) if method == "cnp" else None
    res = run_pruning(tiny_vgg, tiny_pair, method, CFG, concept_state=cs, seed=0, verbose=False)
    assert res.method == method
    curve = res.curve
    assert [e["step"] for e in curve] == [0, 1, 2, 3]
    assert [e["stage"] for e in curve] == ["step", "step", "step", "final"]
    # rate_of='all' (the paper): 25 % steps of all 144 filters (conv4_3's 16 included, never pruned)
    assert [e["pruned"] for e in curve] == [0.0, 0.25, 0.5, 0.5]
    assert [e["filters"] for e in curve] == [sum(TINY_WIDTHS) - r for r in (0, 36, 72, 72)]
    assert [e["pruned_of_all"] for e in curve] == [0.0, 0.25, 0.5, 0.5]
    assert [e["pruned_of_prunable"] for e in curve] == [0.0, 36 / 128, 72 / 128, 72 / 128]
    assert [w for i, w in enumerate(res.model.conv_widths) if i == 9] == [16]   # conv4_3 untouched
    for key in ("acc", "val_acc", "wm_relevance_share", "wm_relevance_share_by_subgroup", "params", "macs",
                "filters"):
        assert all(key in e for e in curve), key
    params, macs = [e["params"] for e in curve], [e["macs"] for e in curve]
    assert params[0] == count_params(tiny_vgg) and macs[0] == count_macs(tiny_vgg, 32)
    assert params[0] > params[1] > params[2] == params[3]
    assert macs[0] > macs[1] > macs[2] == macs[3]
    for e in curve:
        assert set(e["acc"]) == {"overall", "c0w0", "c0w1", "c1w0", "c1w1"}
        assert 0.0 <= e["acc"]["overall"] <= 1.0 and 0.0 <= e["val_acc"]["overall"] <= 1.0
        assert 0.0 <= e["wm_relevance_share"] <= 1.0
        assert set(e["wm_relevance_share_by_subgroup"]) == {"c0w1", "c1w1"}
    # the virtual-layer accuracy is reported only while the layer exists (cnp steps)
    assert [("acc_virtual_layer" in e) for e in curve] == [method == "cnp"] * 3 + [False]
    model = res.model
    assert get_virtual_layer(model) is None
    assert model.conv_widths[9] == 16 and sum(model.conv_widths) == sum(TINY_WIDTHS) - 72
    assert min(model.conv_widths) >= 1
    assert count_params(model) == params[-1]
    assert set(res.timings) >= {"rank", "remove", "fine-tune", "evaluate"}
    # the input model is left alone
    assert all(torch.equal(v, original[k]) for k, v in tiny_vgg.state_dict().items())
    assert tiny_vgg.conv_widths == TINY_WIDTHS and get_virtual_layer(tiny_vgg) is None


def test_cnp_and_vanilla_prune_different_filters(tiny_vgg, tiny_pair, random_U):
    with pytest.warns(UserWarning, match="epochs_per_step=0"):
        cfg = PruneConfig(step=0.25, target=0.25, epochs_per_step=0, final_epochs=0, wm_share_images=0)
    cnp = run_pruning(tiny_vgg, tiny_pair, "cnp", cfg, concept_state=_concept_state(random_U(D)), verbose=False)
    van = run_pruning(tiny_vgg, tiny_pair, "vanilla", cfg, verbose=False)
    sd_c, sd_v = cnp.model.state_dict(), van.model.state_dict()
    assert cnp.model.conv_widths != van.model.conv_widths or any(
        not torch.equal(sd_c[k], sd_v[k]) for k in sd_c)
    assert math.isnan(cnp.curve[0]["wm_relevance_share"])  # disabled with wm_share_images=0
    assert all(math.isnan(v) for v in cnp.curve[0]["wm_relevance_share_by_subgroup"].values())


class _Interrupted(Exception):
    pass


def test_resume_gives_the_uninterrupted_result(tiny_vgg, tiny_pair, random_U, tmp_path, monkeypatch):
    cs = _concept_state(random_U(D))
    ref = run_pruning(tiny_vgg, tiny_pair, "cnp", CFG, concept_state=cs, seed=1, verbose=False)

    real_save = schedule._save

    def save_then_die(path, key, model, vl, curve, timings, step, done, **kw):
        real_save(path, key, model, vl, curve, timings, step, done, **kw)
        if step == 1:
            raise _Interrupted

    with monkeypatch.context() as mp:
        mp.setattr(schedule, "_save", save_then_die)
        with pytest.raises(_Interrupted):
            run_pruning(tiny_vgg, tiny_pair, "cnp", CFG, concept_state=cs, seed=1, run_dir=tmp_path, verbose=False)
    assert (tmp_path / "prune_cnp.pt").is_file()

    calls = []
    real_scores = schedule.filter_scores

    def counting(*args, **kwargs):
        calls.append(1)
        return real_scores(*args, **kwargs)

    monkeypatch.setattr(schedule, "filter_scores", counting)
    resumed = run_pruning(tiny_vgg, tiny_pair, "cnp", CFG, concept_state=cs, seed=1, run_dir=tmp_path, verbose=False)
    assert len(calls) == 1  # only step 2 was ranked again
    assert _curves_equal(resumed.curve, ref.curve)
    sd_r, sd_ref = resumed.model.state_dict(), ref.model.state_dict()
    assert list(sd_r) == list(sd_ref)
    assert all(torch.equal(sd_r[k], sd_ref[k]) for k in sd_ref)

    # a finished run is returned as it is, without any work
    again = run_pruning(tiny_vgg, tiny_pair, "cnp", CFG, concept_state=cs, seed=1, run_dir=tmp_path, verbose=False)
    assert len(calls) == 1
    assert _curves_equal(again.curve, ref.curve)
    # other inputs (another seed) do not reuse the checkpoint
    other = run_pruning(tiny_vgg, tiny_pair, "cnp", CFG, concept_state=cs, seed=2, run_dir=tmp_path, verbose=False)
    assert len(calls) == 3
    assert len(other.curve) == 4


@pytest.mark.parametrize("first", ["cnp", "vanilla"])
def test_methods_of_a_run_dir_share_the_unpruned_evaluation(tiny_vgg, tiny_pair, random_U, tmp_path, monkeypatch,
                                                            first):
    """The first method of a run directory measures the unpruned network; a later one reads its
    step-0 measurements back (no LRP pass, no validation pass) and its curve is, to the bit, the
    curve the method gives on its own."""
    cs = _concept_state(random_U(D))
    alone = {m: run_pruning(tiny_vgg, tiny_pair, m, CFG, concept_state=cs, seed=1, verbose=False)
             for m in ("cnp", "vanilla")}
    second = "vanilla" if first == "cnp" else "cnp"
    run_pruning(tiny_vgg, tiny_pair, first, CFG, concept_state=cs, seed=1, run_dir=tmp_path, verbose=False)
    assert (tmp_path / "unpruned_eval.pt").is_file()
    evaluations = []
    real = schedule._evaluate

    def recording(*args, **kwargs):
        evaluations.append(kwargs.get("measured") is not None)
        return real(*args, **kwargs)

    shares = []
    real_shares = schedule.wm_relevance_shares
    monkeypatch.setattr(schedule, "_evaluate", recording)
    monkeypatch.setattr(schedule, "wm_relevance_shares", lambda *a, **k: shares.append(1) or real_shares(*a, **k))
    res = run_pruning(tiny_vgg, tiny_pair, second, CFG, concept_state=cs, seed=1, run_dir=tmp_path, verbose=False)
    assert evaluations[0] and not any(evaluations[1:])       # step 0 read back, the other steps measured
    assert len(shares) == len(res.curve) - 1                  # no LRP pass for step 0
    assert _curves_equal(res.curve, alone[second].curve)
    assert ("acc_virtual_layer" in res.curve[0]) == (second == "cnp")
    # other inputs (another network) measure again
    other = copy.deepcopy(tiny_vgg)
    with torch.no_grad():
        other.classifier[-1].weight.mul_(-1.0)
    evaluations.clear()
    run_pruning(other, tiny_pair, "vanilla", CFG, seed=1, run_dir=tmp_path / "other", verbose=False)
    run_pruning(other, tiny_pair, "l1", CFG, seed=1, run_dir=tmp_path, verbose=False)
    assert not any(evaluations)


def test_recorded_unpruned_measurements_are_the_schedules_step_0(tiny_vgg, tiny_pair, random_U, tmp_path,
                                                                  monkeypatch):
    """What the pipeline's warm-up measures (test and validation accuracy, watermark shares of the
    same network) is what step 0 would measure, to the bit: recorded, it is read back; recorded
    for another network, it is not used."""
    from cnp.evaluate import subgroup_accuracy, wm_relevance_shares
    from cnp.runtime import set_memory_format

    net = set_memory_format(copy.deepcopy(tiny_vgg), CFG.memory_format)
    shares = wm_relevance_shares(net, tiny_pair["test"], CFG.lrp, max_images=CFG.wm_share_images)
    measured = {"acc": subgroup_accuracy(net, tiny_pair["test"]), "val_acc": subgroup_accuracy(net, tiny_pair["val"]),
                "wm_relevance_share": shares.pop("all"), "wm_relevance_share_by_subgroup": shares}
    with pytest.raises(CNPError, match="measured lacks"):
        schedule.record_unpruned_evaluation(tiny_vgg, tiny_pair, CFG, {"acc": measured["acc"]}, tmp_path)
    path = schedule.record_unpruned_evaluation(tiny_vgg, tiny_pair, CFG, measured, tmp_path)
    assert path == tmp_path / schedule.UNPRUNED_EVALUATION
    written = path.stat().st_mtime_ns
    schedule.record_unpruned_evaluation(tiny_vgg, tiny_pair, CFG, measured, tmp_path)
    assert path.stat().st_mtime_ns == written   # the same inputs: not written again
    cs = _concept_state(random_U(D))
    alone = run_pruning(tiny_vgg, tiny_pair, "cnp", CFG, concept_state=cs, seed=1, verbose=False)
    lrp_passes = []
    real_shares = schedule.wm_relevance_shares
    monkeypatch.setattr(schedule, "wm_relevance_shares", lambda *a, **k: lrp_passes.append(1) or real_shares(*a, **k))
    res = run_pruning(tiny_vgg, tiny_pair, "cnp", CFG, concept_state=cs, seed=1, run_dir=tmp_path, verbose=False)
    assert len(lrp_passes) == len(res.curve) - 1 and _curves_equal(res.curve, alone.curve)
    # measurements of another network are not taken for this one
    other = copy.deepcopy(tiny_vgg)
    with torch.no_grad():
        other.classifier[-1].weight.mul_(-1.0)
    schedule.record_unpruned_evaluation(other, tiny_pair, CFG, measured, tmp_path / "b")
    lrp_passes.clear()
    res = run_pruning(tiny_vgg, tiny_pair, "vanilla", CFG, seed=1, run_dir=tmp_path / "b", verbose=False)
    assert len(lrp_passes) == len(res.curve)


def test_schedule_input_errors(tiny_vgg, tiny_pair, random_U):
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(CNPError, match="target pruning rate"):
            PruneConfig(target=bad)
    with pytest.raises(CNPError, match="step must be"):
        PruneConfig(step=0.6, target=0.5)
    with pytest.raises(CNPError, match="step must be"):
        PruneConfig(step=0.0)
    with pytest.warns(UserWarning, match="catastrophic"):
        PruneConfig(epochs_per_step=0)
    with pytest.raises(CNPError, match="non-negative integer"):
        PruneConfig(final_epochs=-1)
    with pytest.raises(CNPError, match="aggregation"):
        PruneConfig(aggregation="mean")
    with pytest.raises(CNPError, match="unknown pruning method"):
        run_pruning(tiny_vgg, tiny_pair, "taylor", CFG, verbose=False)
    with pytest.raises(CNPError, match="needs concept_state"):
        run_pruning(tiny_vgg, tiny_pair, "cnp", CFG, verbose=False)
    with pytest.raises(CNPError, match="unknown layer name"):
        run_pruning(tiny_vgg, tiny_pair, "vanilla", dataclasses.replace(CFG, protect=("conv4_4",)),
                    verbose=False)
    with pytest.raises(CNPError, match="not a convolution"):
        run_pruning(tiny_vgg, tiny_pair, "vanilla", dataclasses.replace(CFG, protect=("fc6",)),
                    verbose=False)
    with pytest.warns(UserWarning, match="empty ablated set"):
        cs = {**_concept_state(random_U(D)), "ablated": []}
        run_pruning(tiny_vgg, tiny_pair, "cnp", dataclasses.replace(CFG, target=0.25, step=0.25),
                    concept_state=cs, verbose=False)


def test_n_steps():
    assert CFG.n_steps == 2
    assert PruneConfig().n_steps == 16          # 5 % steps up to 80 %
    assert PruneConfig(step=0.1, target=0.8).n_steps == 8
    assert PruneConfig(step=0.3, target=0.5).n_steps == 2  # the last step stops at the target


def test_cnp_requires_the_drsa_layer_to_be_protected(tiny_vgg, tiny_pair, random_U, monkeypatch):
    ranked = []
    real_scores = schedule.filter_scores
    monkeypatch.setattr(schedule, "filter_scores", lambda *a, **k: ranked.append(1) or real_scores(*a, **k))
    with pytest.raises(CNPError, match="protect"):
        run_pruning(tiny_vgg, tiny_pair, "cnp", dataclasses.replace(CFG, protect=()),
                    concept_state=_concept_state(random_U(D)), verbose=False)
    assert ranked == []
