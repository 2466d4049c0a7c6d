"""Check that performance changes leave the CPU numbers bit-for-bit unchanged.

Runs a small, fully deterministic slice of everything the performance work touches on the CPU
(LRP attributions with per-filter relevance and contexts, the LRP ranking, the global filter
selection, one fine-tuning epoch, the subgroup evaluation, and a whole CNP + vanilla pruning
schedule on a small VGG) and either saves the results or compares them with saved ones
(``torch.equal`` on every tensor, ``==`` on every number).

Usage (about 20 s on one core)::

    python bench/check_identity.py --save /tmp/before.pt     # on the old code
    python bench/check_identity.py --compare /tmp/before.pt  # on the new code: exit 1 on any change
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnp.data.synthetic import PairConfig, make_pair  # noqa: E402
from cnp.drsa import random_orthogonal  # noqa: E402
from cnp.evaluate import subgroup_accuracy, wm_relevance_share  # noqa: E402
from cnp.images import normalize_images  # noqa: E402
from cnp.lrp import LRP, LRPConfig, contexts  # noqa: E402
from cnp.models import VGG, block_widths_to_conv_widths  # noqa: E402
from cnp.pruning import PruneConfig, run_pruning  # noqa: E402
from cnp.pruning.ranking import lrp_filter_scores, select_filters  # noqa: E402
from cnp.training import make_optimizer, predict_logits, train_epoch  # noqa: E402


def small_vgg(seed: int = 0) -> VGG:
    torch.manual_seed(seed)
    m = VGG(block_widths_to_conv_widths((8, 16, 16, 32, 32)), num_classes=2, hidden=32, pool_size=1, dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d | torch.nn.Linear):
                mod.weight.normal_(0.0, (2.0 / mod.weight[0].numel()) ** 0.5, generator=g)
                mod.bias.normal_(0.0, 0.01, generator=g)
    return m.eval()


def collect() -> dict:
    torch.set_num_threads(1)
    out: dict = {}
    data = make_pair(PairConfig(pair="carton-dugong", seed=0, image_size=32, n_train_per_class=24,
                                n_drsa=8, n_rank=20, n_val_per_subgroup=3, n_test_per_subgroup=6))
    model = small_vgg()
    x = normalize_images(data["rank"].images[:6])
    for variant in ("alpha1beta0", "epsilon", "gamma"):
        att = LRP(model, LRPConfig(variant=variant)).attribute(x, 1, filters=True, layers=("relu4_3",))
        out[f"lrp/{variant}/input"] = att.input_relevance
        out[f"lrp/{variant}/logits"] = att.logits
        for k, v in att.filter_relevance.items():
            out[f"lrp/{variant}/filter/{k}"] = v
        for k, v in att.filter_relevance_abs.items():
            out[f"lrp/{variant}/filter_abs/{k}"] = v
        for k, v in att.layer_relevance.items():
            out[f"lrp/{variant}/layer/{k}"] = v
    a, c, _ = contexts(model, x, "relu4_3")
    out["contexts/a"], out["contexts/c"] = a, c
    for agg in ("abs", "abs_of_sum", "signed"):
        for i, v in enumerate(lrp_filter_scores(model, data["rank"], aggregation=agg, batch_size=7)):
            out[f"rank/{agg}/{i}"] = v
    g = torch.Generator().manual_seed(5)
    for trial in range(20):
        widths = torch.randint(1, 40, (13,), generator=g).tolist()
        scores = [torch.rand(w, generator=g, dtype=torch.float64) for w in widths]
        if trial % 3 == 0:  # ties
            scores = [(s * 4).floor() for s in scores]
        if trial % 5 == 1:  # an all-zero layer
            scores[3] = torch.zeros_like(scores[3])
        protected = {9} if trial % 2 else {0, 9}
        n_max = sum(w - 1 for i, w in enumerate(widths) if i not in protected)
        n = int(torch.randint(0, n_max + 1, (1,), generator=g))
        sel = select_filters(scores, n, protected, min_keep=1 + trial % 2)
        for k, v in sel.items():
            out[f"select/{trial}/{k}"] = v
    m2 = small_vgg(1)
    opt = make_optimizer(m2.parameters(), "sgd", 1e-2)
    losses = [train_epoch(m2, data["train"], opt, torch.Generator().manual_seed(e), 8, verbose=False)
              for e in range(2)]
    out["train/losses"] = torch.tensor(losses, dtype=torch.float64)
    for k, v in m2.state_dict().items():
        out[f"train/state/{k}"] = v
    out["eval/logits"] = predict_logits(m2, data["test"].images, batch_size=5)
    out["eval/acc"] = subgroup_accuracy(m2, data["test"], batch_size=5)
    out["eval/wm_share"] = wm_relevance_share(m2, data["test"], batch_size=5)
    U = random_orthogonal(32, seed=3)[0].float()
    cs = {"U": U, "K": 4, "ablated": [1], "mode": "zero", "mean_activation": None, "layer": "relu4_3"}
    cfg = PruneConfig(step=0.2, target=0.6, epochs_per_step=1, final_epochs=1, batch_size=8,
                      wm_share_images=8)
    for method in ("cnp", "vanilla"):
        res = run_pruning(small_vgg(2), data, method, cfg, concept_state=cs if method == "cnp" else None,
                          seed=0, verbose=False)
        out[f"prune/{method}/curve"] = res.curve
        for k, v in res.model.state_dict().items():
            out[f"prune/{method}/state/{k}"] = v
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", type=Path)
    g.add_argument("--compare", type=Path)
    args = p.parse_args(argv)
    res = collect()
    if args.save:
        torch.save(res, args.save)
        print(f"saved {len(res)} results to {args.save}")
        return 0
    ref = torch.load(args.compare, weights_only=False)
    bad = sorted(set(ref) ^ set(res)) + [k for k in ref if k in res and not _same(ref[k], res[k])]
    print(f"{len(ref) - len(bad)} of {len(ref)} results identical")
    for k in bad[:30]:
        print(f"  DIFFERS: {k}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
