"""The design choices of ``cnp-posthoc``'s last step, measured on CNP's finished networks.

``cnp-posthoc`` fits DRSA afresh on CNP's final (pruned, fine-tuned) network, re-identifies the
watermark subspace by latent analysis and keeps its ablation, with no training after it. This
script measures, per finished run of a sweep directory, what other choices of that last step
would give, on the validation and the test split (c0w1, c1w0, overall):

* ``cnp``: the network before the last step (CNP as the paper deploys it);
* ``posthoc zero``: ``cnp-posthoc`` (zero ablation of the re-identified subspace);
* ``posthoc mean``: the same subspace mean-ablated (U_k^T a replaced by its mean over the DRSA
  images, the paper's footnote 3);
* ``original U``: the subspace found before pruning, zero-ablated (no refit);
* ``posthoc zero, 2 subspaces``: the two subspaces with the highest watermark AP;
* ``posthoc zero + prior``: the output bias shifted so that the training set's predicted-positive
  rate equals its positive rate (class labels only);
* ``posthoc mean + prior``: both;
* ``posthoc zero + head epoch``: one epoch of fine-tuning of the layers after the concept layer
  on the training set, the ablation active.

Printed: one Markdown table (mean ± std over the runs); ``--out`` writes every number as JSON.

Example::

    python bench/posthoc_choices.py runs/beyond/reproduce --out bench/results/posthoc_choices.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnp.evaluate import predict_logits, subgroup_accuracy  # noqa: E402
from cnp.io import atomic_write_json  # noqa: E402
from cnp.params import FIELDS  # noqa: E402
from cnp.pipeline import (  # noqa: E402
    augmented_model,
    make_params,
    open_run,
    prune_config,
    run_ablate,
    warm_model,
)
from cnp.pruning import (
    run_pruning,  # noqa: E402
    schedule,  # noqa: E402
)
from cnp.results import load_runs  # noqa: E402
from cnp.virtual_layer import from_state, keep_ablation  # noqa: E402

SUBGROUPS = ("c0w1", "c1w0", "overall")


def _prior_shift(model: torch.nn.Module, train) -> None:
    """Shift the output bias so that the predicted-positive rate on ``train`` is its positive rate."""
    z = predict_logits(model, train.device_images("cpu"), batch_size=256, device="cpu")
    margin = (z[:, 1] - z[:, 0]).double()
    q = float(torch.quantile(margin, 1 - float((train.labels == 1).double().mean())))
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias[1] -= q / 2
        last.bias[0] += q / 2


def measure_run(run_dir: Path) -> dict:
    params = json.loads((run_dir / "params.json").read_text())
    p = make_params(**{k: v for k, v in params.items() if k in set(FIELDS) and k != "run_dir"}, run_dir=str(run_dir))
    run = open_run(p)
    abl = run_ablate(run, False)
    _m, vl0 = augmented_model(run, abl["ablated"], p.concepts.ablation_mode)
    state, cfg, data = vl0.state(), prune_config(p), run.data()
    base = run_pruning(warm_model(run), data, "cnp", cfg, concept_state=state, seed=p.run.seed,
                       run_dir=run.dir / "prune", verbose=False).model  # CNP's finished schedule, from its checkpoint

    def acc(m):
        return {split: {k: float(v) for k, v in subgroup_accuracy(m, data[split]).items() if k in SUBGROUPS}
                for split in ("val", "test")}

    def last_step(mode="zero", n=1, refit=True, prior=False, head_epochs=0):
        m = copy.deepcopy(base)
        vl = from_state(m, state)
        if mode == "mean":
            vl.fit_mean(m, data["drsa"].images)
        vl.set_ablation(list(range(n)) if refit else state["ablated"], mode)
        if refit:
            schedule._recompute_concepts(m, vl, data, cfg, p.run.seed, cfg.n_steps + 1, "cpu", False, fresh=True)
        ablated = list(vl.ablated)
        keep_ablation(m)
        if head_epochs:
            # VGG-16's convs up to the protected DRSA layer (conv4_3) stay as they are
            convs = [f"conv{b}_{j}" for b, n_ in zip(range(1, 6), (2, 2, 3, 3, 3)) for j in range(1, n_ + 1)]
            frozen = tuple(convs[: convs.index(cfg.protect[0]) + 1])
            schedule._finetune(m, data, dataclasses.replace(cfg, freeze=frozen), head_epochs, ("head", p.run.seed),
                               "cpu", use_vl=False, verbose=False)
        if prior:
            _prior_shift(m, data["train"])
        return {**acc(m), "ablated": ablated}

    return {"run": str(run_dir), "seed": p.run.seed, "cnp": acc(base),
            "posthoc zero": last_step(), "posthoc mean": last_step("mean"), "original U": last_step(refit=False),
            "posthoc zero, 2 subspaces": last_step(n=2), "posthoc zero + prior": last_step(prior=True),
            "posthoc mean + prior": last_step("mean", prior=True),
            "posthoc zero + head epoch": last_step(head_epochs=1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--label", default="carton-dugong", help="run group (default: the easy pair, no grid variant)")
    ap.add_argument("--out", help="JSON file for every number")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    runs = [r for r in load_runs(args.sweep_dir) if r.label == args.label and "cnp" in r.metrics.get("curves", {})]
    if not runs:
        sys.exit(f"no finished runs with cnp under {args.sweep_dir} (label {args.label})")
    rows = []
    for r in sorted(runs, key=lambda r: r.seed):
        rows.append(measure_run(Path(r.run_dir)))
        print(f"seed {r.seed} done", file=sys.stderr)
    choices = [k for k in rows[0] if k not in ("run", "seed")]
    print("| choice | " + " | ".join(f"{s} {k}" for s in ("val", "test") for k in SUBGROUPS) + " |")
    print("|---" * (1 + 2 * len(SUBGROUPS)) + "|")
    for c in choices:
        cells = []
        for s in ("val", "test"):
            for k in SUBGROUPS:
                v = np.array([row[c][s][k] for row in rows])
                cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}")
        print(f"| {c} | " + " | ".join(cells) + " |")
    if args.out:
        atomic_write_json(Path(args.out), {"runs": rows, "n": len(rows)})


if __name__ == "__main__":
    main()
