"""Where the watermark lives in the pruned networks: inside the ablated subspaces, or re-encoded.

For every finished run under the given sweep directories and every pruning method in it, the
final pruned network (``prune/prune_<method>.pt``) is measured on the test split:

* ``c0w1``: accuracy on the OOD subgroup as deployed (what ``metrics.json`` reports);
* ``c0w1 +proj``: the same network with the run's ablated subspaces U_K' projected out after the
  DRSA layer (a :class:`cnp.virtual_layer.KeptAblation` attached for the measurement; for
  ``cnp-keep`` it is there already, so this column is the deployed one and ``c0w1 -proj`` switches
  it off). If projecting U_K' out of a pruned network restores c0w1, the shortcut still runs
  through the subspace DRSA found before pruning; if not, fine-tuning re-encoded it elsewhere;
* ``grad share``: the mean share of the logit margin's gradient at the DRSA layer that lies in
  U_K' on the c0w1 images (:class:`cnp.pruning.ConceptPenalty`'s quantity; the watermark-free
  direction would give about r / D).

Printed: one Markdown table, mean ± std over seeds per method.

Example::

    python bench/diagnose_reencoding.py runs/beyond/reproduce --out bench/results/reencoding.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnp.evaluate import subgroup_accuracy  # noqa: E402
from cnp.images import normalize_images  # noqa: E402
from cnp.io import atomic_write_json, safe_torch_load  # noqa: E402
from cnp.lrp import attach_site  # noqa: E402
from cnp.models import vgg_from_arch  # noqa: E402
from cnp.params import FIELDS  # noqa: E402
from cnp.pipeline import Run, make_params  # noqa: E402
from cnp.pruning import ConceptPenalty  # noqa: E402
from cnp.results import load_runs  # noqa: E402
from cnp.virtual_layer import KeptAblation, get_kept_ablation, kept_from_state  # noqa: E402


def measure_run(run_dir: Path) -> dict[str, dict[str, float]]:
    params = json.loads((run_dir / "params.json").read_text())
    known = set(FIELDS)
    p = make_params(**{k: v for k, v in params.items() if k in known and k != "run_dir"}, run_dir=str(run_dir))
    run = Run(p)
    data = run.data()
    concepts = safe_torch_load(run_dir / "augment" / "concepts.pt")
    ablated = json.loads((run_dir / "ablate" / "summary.json").read_text())["ablated"]
    K, U = int(concepts["K"]), concepts["U"].float()
    d_k = U.shape[0] // K
    W = torch.cat([U[:, k * d_k:(k + 1) * d_k] for k in ablated], dim=1)
    test = data["test"]
    c0w1 = test.subgroup_index("c0w1")
    x = normalize_images(test.images[c0w1])
    out = {}
    for ckpt in sorted((run_dir / "prune").glob("prune_*.pt")):
        method = ckpt.stem[len("prune_"):]
        blob = safe_torch_load(ckpt)
        if not blob.get("done"):
            continue
        model = vgg_from_arch(blob["arch"])
        model.load_state_dict(blob["state_dict"])
        model.eval()
        if blob.get("kept") is not None:
            kept_from_state(model, blob["kept"])
        site = get_kept_ablation(model) or attach_site(model, concepts["layer"], KeptAblation(W))
        deployed_has_proj = blob.get("kept") is not None
        site.enabled = deployed_has_proj
        acc = subgroup_accuracy(model, test)["c0w1"]
        site.enabled = not deployed_has_proj
        other = subgroup_accuracy(model, test)["c0w1"]
        site.enabled = deployed_has_proj
        share = ConceptPenalty(W, concepts["layer"])(model, x)[1].item()
        out[method] = {"c0w1": acc, "c0w1 +proj" if not deployed_has_proj else "c0w1 -proj": other,
                       "grad share": share}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dirs", nargs="+")
    ap.add_argument("--label", default=None, help="only this run group (default: every group)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    per_run = {}
    for d in args.sweep_dirs:
        for r in load_runs(d, verbose=False):
            if args.label and r.label != args.label:
                continue
            if r.metrics.get("params", {}).get("wm_rate_pos") == r.metrics.get("params", {}).get("wm_rate_neg"):
                continue  # a no-shortcut control
            per_run[str(r.run_dir)] = {"label": r.label, "seed": r.seed, "methods": measure_run(Path(r.run_dir))}
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    for v in per_run.values():
        for m, vals in v["methods"].items():
            agg = rows.setdefault((v["label"], m), {})
            for k, x in vals.items():
                agg.setdefault(k, []).append(x)
    cols = ["c0w1", "c0w1 +proj", "c0w1 -proj", "grad share"]
    print("| group | method | seeds | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for (label, m), agg in sorted(rows.items()):
        n = len(agg["c0w1"])
        cells = [f"{np.mean(agg[c]):.3f} ± {np.std(agg[c], ddof=1) if n > 1 else 0:.3f}" if c in agg else "" for c in cols]
        print(f"| {label} | {m} | {n} | " + " | ".join(cells) + " |")
    if args.out:
        atomic_write_json(args.out, {"runs": per_run})
    return per_run


if __name__ == "__main__":
    main()
