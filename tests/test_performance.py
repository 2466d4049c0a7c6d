"""The performance changes compute exactly what the straightforward code computes.

Timing lives in ``bench/`` (never in tests); these tests pin the *results* of the faster paths:
the vectorised global filter selection against the sequential walk, ZPlus against
AlphaBeta(1, 0), the single per-filter aggregate against both, the device copies of a split,
the copy-free content hash and the stage breakdown.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch
from zennit.rules import AlphaBeta

from cnp.data.splits import Split
from cnp.images import normalize_images
from cnp.io import CNPError, tensor_hash
from cnp.lrp import LRP, LRPConfig, make_rule
from cnp.pruning.ranking import lrp_filter_scores, normalise_per_layer, select_filters
from cnp.runtime import stage_breakdown


def _select_sequential(scores, n_remove, protected, min_keep=1, normalise=True, normalisation="sum"):
    """The selection as a plain walk over the global order (the definition)."""
    vals = normalise_per_layer(scores, normalisation) if normalise else scores
    cand = [(float(v[f]), li, f) for li, v in enumerate(vals) if li not in protected for f in range(v.numel())]
    order = sorted(range(len(cand)), key=lambda j: cand[j][0])  # Python's sort is stable
    budget = {li: int(v.numel()) - min_keep for li, v in enumerate(vals)}
    chosen: dict[int, list[int]] = {}
    for j in order:
        if sum(len(v) for v in chosen.values()) >= n_remove:
            break
        _, li, f = cand[j]
        if budget[li] > 0:
            budget[li] -= 1
            chosen.setdefault(li, []).append(f)
    if sum(len(v) for v in chosen.values()) < n_remove:
        raise CNPError("too few")
    return {li: sorted(v) for li, v in chosen.items()}


@pytest.mark.parametrize("trial", range(40))
def test_vectorised_selection_equals_the_sequential_walk(trial):
    g = torch.Generator().manual_seed(trial)
    n_layers = int(torch.randint(2, 14, (1,), generator=g))
    widths = torch.randint(1, 10, (n_layers,), generator=g).tolist()
    scores = [torch.rand(w, generator=g, dtype=torch.float64) for w in widths]
    if trial % 3 == 0:
        scores = [(s * 3).floor() for s in scores]  # many ties, all-zero layers
    protected = {0} if trial % 4 == 1 else set()
    min_keep = trial % 3
    n_remove = int(torch.randint(0, sum(widths) + 1, (1,), generator=g))
    try:
        want = _select_sequential(scores, n_remove, protected, min_keep)
    except CNPError:
        with pytest.raises(CNPError, match="filters can be removed while keeping"):
            select_filters(scores, n_remove, protected, min_keep)
        return
    got = select_filters(scores, n_remove, protected, min_keep)
    assert list(got) == list(want)  # same layers, in the order the walk first reached them
    assert {k: v.tolist() for k, v in got.items()} == want
    assert all(v.dtype == torch.long for v in got.values())


def test_alpha1beta0_rule_is_zennit_alphabeta_to_the_bit(tiny_vgg, tiny_x):
    """cnp uses zennit's ZPlus for alpha1beta0: two modified passes instead of AlphaBeta's four."""
    cfg = LRPConfig()
    rule = make_rule("alpha1beta0", cfg)
    assert len(rule.input_modifiers) == 2
    fast = LRP(tiny_vgg, cfg).attribute(tiny_x, 1, filters=True)

    import cnp.lrp as lrp_mod

    real = lrp_mod.make_rule

    def slow_rule(spec, c, device=None, bounds=None):
        if spec == "alpha1beta0":
            return AlphaBeta(alpha=1.0, beta=0.0, stabilizer=c.stabilizer, zero_params="bias")
        return real(spec, c, device, bounds)

    lrp_mod.make_rule = slow_rule
    try:
        slow = LRP(tiny_vgg, cfg).attribute(tiny_x, 1, filters=True)
    finally:
        lrp_mod.make_rule = real
    assert torch.equal(fast.input_relevance, slow.input_relevance)
    for k in slow.filter_relevance:
        assert torch.equal(fast.filter_relevance[k], slow.filter_relevance[k])
        assert torch.equal(fast.filter_relevance_abs[k], slow.filter_relevance_abs[k])


def test_single_filter_aggregate_equals_both(tiny_vgg, tiny_x):
    lrp = LRP(tiny_vgg)
    both = lrp.attribute(tiny_x, 1, filters=True)
    signed = lrp.attribute(tiny_x, 1, filters="signed")
    absolute = lrp.attribute(tiny_x, 1, filters="abs")
    assert signed.filter_relevance_abs == {} and absolute.filter_relevance == {}
    assert list(signed.filter_relevance) == list(both.filter_relevance) and len(both.filter_relevance) == 13
    for k in both.filter_relevance:
        assert torch.equal(signed.filter_relevance[k], both.filter_relevance[k])
        assert torch.equal(absolute.filter_relevance_abs[k], both.filter_relevance_abs[k])
    assert lrp.attribute(tiny_x, 1).filter_relevance == {}
    with pytest.raises(CNPError, match="filters must be"):
        lrp.attribute(tiny_x, 1, filters="both")


def _split(n=10, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split(images=torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                 labels=torch.arange(n) % 2, wm=torch.arange(n) % 3 == 0,
                 masks=torch.rand(n, size, size, generator=g) > 0.7)


@pytest.mark.parametrize("aggregation", ["abs", "abs_of_sum", "signed"])
@pytest.mark.parametrize("ranking_data", ["pos", "pos+neg"])
def test_ranking_scores_equal_a_per_batch_sum(tiny_vgg, aggregation, ranking_data):
    split = _split(9)
    data = split.positives() if ranking_data == "pos" else split
    want = [torch.zeros(w, dtype=torch.float64) for w in tiny_vgg.conv_widths]
    lrp = LRP(tiny_vgg)
    names = [n for n, m in tiny_vgg.named_modules() if isinstance(m, torch.nn.Conv2d)]
    for start in range(0, len(data), 2):
        out = lrp.attribute(normalize_images(data.images[start:start + 2]), 1, filters=True)
        for i, n in enumerate(names):
            r = out.filter_relevance[n]
            v = {"abs": out.filter_relevance_abs[n], "abs_of_sum": r.abs(), "signed": r}[aggregation]
            want[i] += v.sum(0).double()
    got = lrp_filter_scores(tiny_vgg, split, ranking_data=ranking_data, aggregation=aggregation, batch_size=2)
    assert all(torch.equal(a, b) and a.device.type == "cpu" for a, b in zip(got, want))


def test_split_device_copies_are_made_once_and_refreshed():
    split = _split()
    assert split.on_device("images", "cpu") is split.images  # the CPU needs no copy
    assert split.device_images(None) is split.images
    a = split.on_device("images", "meta")
    assert a.device.type == "meta" and a.shape == split.images.shape and a.dtype == torch.uint8
    assert split.on_device("images", "meta") is a  # kept
    assert split.on_device("masks", "meta") is not a
    split.images[0, 0, 0, 0] ^= 1  # modified in place: copied again
    b = split.on_device("images", "meta")
    assert b is not a
    split.images = split.images.clone()  # replaced: copied again
    assert split.on_device("images", "meta") is not b
    split.release_device()
    assert split._device_cache == {}
    # the cache is not part of the split's content
    other = _split()
    other.on_device("labels", "meta")
    assert "_device_cache" not in repr(other) and other.fingerprint() == _split().fingerprint()
    assert split.subset([0, 1])._device_cache == {}


def test_batches_unchanged_and_index_on_cpu():
    split = _split(11)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    order = torch.randperm(11, generator=g1)
    got = list(split.batches(4, shuffle=True, generator=g2, device="cpu", with_index=True))
    assert [len(y) for _, y, _ in got] == [4, 4, 3]
    for k, (x, y, idx) in enumerate(got):
        want = order[4 * k:4 * k + 4]
        assert torch.equal(idx, want) and idx.device.type == "cpu"
        assert torch.equal(x, normalize_images(split.images[want])) and torch.equal(y, split.labels[want])


def test_fingerprint_is_cached_until_the_content_changes():
    split = _split()
    f = split.fingerprint()
    assert split.fingerprint() == f == _split().fingerprint()
    split.labels[0] = 1 - split.labels[0]
    assert split.fingerprint() != f


def test_tensor_hash_is_the_hash_of_the_bytes():
    ts = [torch.arange(12, dtype=torch.float32).view(3, 4).t(), torch.zeros(0), torch.tensor([True, False]),
          torch.randint(0, 256, (2, 3), dtype=torch.uint8)]
    h = hashlib.sha256()
    for t in ts:
        t = t.contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    assert tensor_hash(*ts) == h.hexdigest()[:16]


def test_stage_breakdown():
    text = stage_breakdown({"warmup": 2.0, "prune:cnp": 10.0}, {"prune:cnp": {"rank": 4.0, "fine-tune": 6.0}},
                           cached={"warmup"}, title="T")
    lines = text.splitlines()
    assert lines[0] == "T"
    assert "warmup" in lines[1] and "not rerun" in lines[1]
    assert "rank" in lines[3] and "40.0 %" in lines[3]
    assert lines[-1].split()[:2] == ["total", "12.0"]


def test_accuracy_with_and_without_the_virtual_layer_in_one_pass(tiny_vgg, random_U, monkeypatch):
    """The shared-prefix evaluation computes the logits of two full evaluations (site off, on)."""
    import cnp.evaluate as ev
    from cnp.training import predict_logits
    from cnp.virtual_layer import insert_virtual_layer

    split = _split(13)
    vl = insert_virtual_layer(tiny_vgg, random_U(16), 4, layer="relu4_3", ablated=[1])
    vl.enabled = False
    want_plain = predict_logits(tiny_vgg, split.images, batch_size=5)
    vl.enabled = True
    want_vl = predict_logits(tiny_vgg, split.images, batch_size=5)
    assert not torch.equal(want_plain, want_vl)  # the ablation changes the logits
    seen = []
    real = ev._accuracy
    monkeypatch.setattr(ev, "_accuracy", lambda logits, s: seen.append(logits) or real(logits, s))
    for enabled in (True, False):
        vl.enabled = enabled
        seen.clear()
        plain, with_vl = ev.subgroup_accuracy_with_site(tiny_vgg, vl, split, batch_size=5)
        assert torch.equal(seen[0], want_plain) and torch.equal(seen[1], want_vl)
        assert plain == real(want_plain, split) and with_vl == real(want_vl, split)
        assert vl.enabled is enabled


def test_peak_memory_tool_counts_the_children(tmp_path):
    """bench/peak_memory.py sums the whole process tree: a grandchild holding ~300 MB must show
    up in the peak (a single-process measure of the parent shell would miss it), the JSON is
    written, and --bound-gb turns an excess into exit status 1."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "peak_memory.py"
    hold = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    child = f"{sys.executable} -c \"{hold}\""
    out = tmp_path / "peak.json"
    res = subprocess.run([sys.executable, str(script), "--interval", "0.1", "--out", str(out), "--",
                          "sh", "-c", f"{child} & {child}; wait"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(out.read_text())
    assert got["peak_processes"] >= 3  # sh and two python children
    assert got["peak_pss_gb"] > 0.55, got  # two children of 300 MB each, at the same time
    res = subprocess.run([sys.executable, str(script), "--interval", "0.1", "--bound-gb", "0.1", "--",
                          sys.executable, "-c", hold], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "exceeds the bound" in res.stderr


def test_compare_commits_runs_each_commit_in_its_own_worktree(tmp_path):
    """bench/compare_commits.py: the command runs alternately at both commits, each with
    ``import cnp`` resolving to its own worktree, and the ratio is A / B per pair."""
    import json
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "compare_commits.py"
    log = tmp_path / "where.txt"
    cmd = f"{sys.executable} -c \"import cnp, pathlib; open('{log}', 'a').write(str(pathlib.Path(cnp.__file__).parents[1]) + chr(10))\""
    out = tmp_path / "res.json"
    res = subprocess.run([sys.executable, str(script), "HEAD", "HEAD", "--repeats", "3", "--cmd", cmd, "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    where = log.read_text().split()
    assert len(where) == 6 and where[0] != where[1] and where[0::2] == [where[0]] * 3
    assert all("cnp-compare-" in w for w in where)
    data = json.loads(out.read_text())
    assert len(data["ratios"]) == 3 and data["ratio_a_over_b"]["min"] <= data["ratio_a_over_b"]["median"]
    assert "ratio A / B: min" in res.stdout
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_commits", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.pair_ratios([2.0, 4.0], [1.0, 4.0]) == [2.0, 1.0]
    with pytest.raises(ValueError):
        mod.pair_ratios([1.0], [])


@pytest.mark.slow
def test_gpu_check_script_runs_tiny_on_the_cpu(tmp_path):
    """bench/gpu_check.sh --tiny: every step of the prepared GPU check runs at tiny sizes on the
    CPU against the current code and ends with exit 0, and the summary table has each figure."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path)}
    res = subprocess.run(["bash", str(repo / "bench" / "gpu_check.sh"), "--tiny"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = (tmp_path / "gpu_check.log").read_text()
    for step in ("pruned_speed", "lrp", "full_run", "drsa", "kept"):
        assert f"=== {step}: exit 0 after" in log, f"{step} did not finish:\n{log[-3000:]}"
    summary = (tmp_path / "summary.md").read_text()
    for figure in ("80 %-pruned VGG-16", "LRP ranking", "full run [quick]", "DRSA", "cnp-keep correction"):
        assert figure in summary, figure


def test_same_metrics_finds_every_changed_number_and_ignores_timings(tmp_path):
    """bench/same_metrics.py: identical numbers pass (seconds and parameters may differ); one
    changed accuracy, a missing run or a missing value fail, naming the value."""
    import importlib.util
    import json

    script = Path(__file__).resolve().parents[1] / "bench" / "same_metrics.py"
    spec = importlib.util.spec_from_file_location("same_metrics", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = {"params": {"K": 8}, "timings_s": {"warmup": 1.0}, "compute": {"torch": "x"},
         "curves": {"cnp": [{"acc": {"c0w1": 0.5, "overall": 0.8}, "pruned": 0.1}]}, "drsa": {"ablated": [3]}}
    for side, changes in (("a", {}), ("b", {"timings_s": {"warmup": 9.0}, "params": {"K": 8, "d_k": 16}})):
        (tmp_path / side / "p" / "seed0").mkdir(parents=True)
        (tmp_path / side / "p" / "seed0" / "metrics.json").write_text(json.dumps({**m, **changes}))
    assert mod.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    res = mod.compare(tmp_path / "a", tmp_path / "b")
    assert res["values"] == 4 and res["differences"] == []
    changed = json.loads(json.dumps(m))
    changed["curves"]["cnp"][0]["acc"]["c0w1"] = 0.5000001
    del changed["drsa"]["ablated"]
    (tmp_path / "b" / "p" / "seed0" / "metrics.json").write_text(json.dumps(changed))
    (tmp_path / "a" / "p" / "seed1").mkdir()
    (tmp_path / "a" / "p" / "seed1" / "metrics.json").write_text(json.dumps(m))
    res = mod.compare(tmp_path / "a", tmp_path / "b")
    assert {d["value"] for d in res["differences"]} == {"curves.cnp[0].acc.c0w1", "drsa.ablated[0]"}
    assert res["only_a"] == ["p/seed1/metrics.json"]
    assert mod.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1


def test_efficiency_bench_counts_macs_and_rates_against_the_gemm(tmp_path):
    """bench/bench_efficiency.py --quick: the pruned models have the removed share of filters, a
    training step counts 3 x the forward MACs minus the first conv's input gradient, every rate is
    measured against the GEMM of the same run; bad shares are refused."""
    import importlib.util
    import json

    from cnp.models import count_macs

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_efficiency.py"
    spec = importlib.util.spec_from_file_location("bench_efficiency", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    full, half = mod.reduced_vgg(0.0), mod.reduced_vgg(0.5)
    assert half.conv_widths == [max(1, round(w / 2)) for w in full.conv_widths]
    first = full.convs[0]
    assert mod.training_macs(full, 48) == 3 * count_macs(full, 48) - 48 * 48 * 3 * first.out_channels * 9
    res = mod.main(["--quick", "--pruned", "0.5", "--out", str(tmp_path / "eff.json")])
    assert json.loads((tmp_path / "eff.json").read_text()) == json.loads(json.dumps(res))
    rows = {r["what"]: r for r in res["rows"]}
    assert set(rows) == {"gemm", "train unpruned", "infer unpruned", "train 50% removed", "infer 50% removed"}
    assert rows["gemm"]["share_of_gemm"] == 1.0 and rows["gemm"]["macs"] == 256 ** 3
    assert rows["train 50% removed"]["macs"] == mod.training_macs(half, 48) * 8
    assert rows["infer unpruned"]["macs"] == count_macs(full, 48) * 16
    sched = res["schedule"]
    assert sched["fine-tunes"]["levels"] == [0.5, 0.5] and sched["evaluations"]["levels"] == [0.0, 0.5, 0.5]
    assert sched["fine-tunes"]["seconds_per_batch"] == pytest.approx(2 * rows["train 50% removed"]["median_s"])
    peak = rows["gemm"]["gmac_per_s"] * 1e9
    assert sched["evaluations"]["seconds_at_gemm_rate"] == pytest.approx(
        (rows["infer unpruned"]["macs"] + 2 * rows["infer 50% removed"]["macs"]) / peak)
    for r in rows.values():
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["share_of_gemm"] == pytest.approx(r["gmac_per_s"] / rows["gemm"]["gmac_per_s"])
    with pytest.raises(SystemExit) as exc:
        mod.main(["--quick", "--pruned", "1.0"])
    assert exc.value.code == 2


def test_long_test_modules_exist_and_go_first(request):
    """``LONG_MODULES`` names real test modules, and the collection puts them first, in that order."""
    from conftest import LONG_MODULES

    here = Path(__file__).parent
    assert all((here / f"{name}.py").is_file() for name in LONG_MODULES), LONG_MODULES
    order = [item.path.stem for item in request.session.items]
    present = [name for name in LONG_MODULES if name in order]
    firsts = [order.index(name) for name in present]
    assert firsts == sorted(firsts)
    if present and len(present) < len(set(order)):  # a run with other modules: the long ones lead
        last_long = max(i for i, name in enumerate(order) if name in LONG_MODULES)
        assert all(name in LONG_MODULES for name in order[:last_long + 1])


def test_make_test_keeps_each_long_module_on_one_worker(tmp_path):
    """The distribution ``make test`` asks pytest-xdist for keeps every long module on one worker
    with the installed pytest and pytest-xdist (so a module's fixtures are built once). Checked by
    running it, with ``tests/conftest.py``'s scheduler hook, on four generated modules of six tests
    each, two of them named long: pytest 9.2 silently broke ``--dist loadgroup``'s ``xdist_group``
    marks this way (pytest-xdist 3.8 writes the group into a node id field that pytest 9.2 no
    longer reads, and the tests were spread as if unmarked)."""
    import os
    import re
    import subprocess

    pytest.importorskip("xdist")
    here = Path(__file__).resolve().parent
    makefile = (here.parent / "Makefile").read_text()
    (dist,) = set(re.findall(r"--dist (\w+)", makefile))
    log = tmp_path / "workers.log"
    names = ("test_a", "test_b", "test_c", "test_d")
    for name in names:
        (tmp_path / f"{name}.py").write_text(
            "import os, pytest, time\n"
            "@pytest.mark.parametrize('i', range(6))\n"
            "def test_one(i):\n"
            "    time.sleep(0.05)\n"
            f"    with open({str(log)!r}, 'a') as f:\n"
            f"        f.write('{name} ' + os.environ['PYTEST_XDIST_WORKER'] + '\\n')\n")
    (tmp_path / "conftest.py").write_text(   # the suite's hooks, with two of these modules named long
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('suite_conftest', {str(here / 'conftest.py')!r})\n"
        "suite = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(suite)\n"
        "suite.LONG_MODULES = ('test_a', 'test_b')\n"
        "pytest_collection_modifyitems = suite.pytest_collection_modifyitems\n"
        "pytest_xdist_make_scheduler = suite.pytest_xdist_make_scheduler\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", dist, "-p", "no:cacheprovider",
                          str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line.split() for line in log.read_text().splitlines()]
    assert len(rows) == 24
    workers = {name: {w for n, w in rows if n == name} for name in names}
    assert len(workers["test_a"]) == 1 and len(workers["test_b"]) == 1, f"a long module was split: {workers}"
    assert len(set().union(*workers.values())) == 2   # and both workers were used


def test_long_modules_scheduler_units(monkeypatch):
    """The scheduler's units: a long module is one unit (its path), any other test is its own."""
    pytest.importorskip("xdist")
    from types import SimpleNamespace

    from conftest import long_modules_scheduler
    from xdist.scheduler import LoadScopeScheduling

    monkeypatch.setattr(LoadScopeScheduling, "__init__", lambda self, config, log=None: None)
    config = SimpleNamespace(option=SimpleNamespace(loadscopereorder=True))
    sched = long_modules_scheduler(config, None, ("test_sweep",))
    assert config.option.loadscopereorder is False   # units go out in the collection order
    assert sched._split_scope("tests/test_sweep.py::test_x[1]") == "tests/test_sweep.py"
    assert sched._split_scope("tests/test_sweep.py::Cls::test_y") == "tests/test_sweep.py"
    assert sched._split_scope("tests/test_rules.py::test_z[2]") == "tests/test_rules.py::test_z[2]"
    assert sched._split_scope("tests/test_sweep_more.py::t") == "tests/test_sweep_more.py::t"
