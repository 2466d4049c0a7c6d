"""Sweeps: planning, the resume check, the notebooks' parameter cells, and a real two-run sweep
through papermill that is killed mid-run, restarted, and must neither redo nor lose anything."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from netguard import guard_env, refused

from cnp import sweep
from cnp.io import CNPError
from cnp.params import FIELDS, Params, type_name
from cnp.pipeline import notebook_params

REPO = Path(__file__).resolve().parents[1]
NB_DIR = REPO / "notebooks"
ALL_NOTEBOOKS = (*sweep.RUN_NOTEBOOKS, sweep.FIGURES_NOTEBOOK)


# ============================================================================ planning
def test_parse_values_and_assignments():
    assert sweep.parse_value("0.1") == 0.1 and sweep.parse_value("true") is True
    assert sweep.parse_value("True") is True and sweep.parse_value("[1, 2]") == [1, 2]
    assert sweep.parse_value("cnp,vanilla") == "cnp,vanilla" and sweep.parse_value("pos+neg") == "pos+neg"
    assert sweep.parse_assignments(["step=0.1", "methods=cnp,l1", "smoke=1"]) == \
        {"step": 0.1, "methods": "cnp,l1", "smoke": 1}
    with pytest.raises(CNPError, match="did you mean 'step'"):
        sweep.parse_assignments(["stpe=0.1"])
    with pytest.raises(CNPError, match="name=value"):
        sweep.parse_assignments(["step"])
    with pytest.raises(CNPError, match="--seeds"):
        sweep.parse_assignments(["seed=3"])
    assert sweep.parse_grid(["K=4,8,16", "ranking_data=pos,pos+neg"]) == \
        {"K": [4, 8, 16], "ranking_data": ["pos", "pos+neg"]}


def test_table1_grid_product_and_one_at_a_time():
    full = sweep.expand_grid(sweep.TABLE1_GRID)
    assert len(full) == 3 * 3 * 4 * 2 * 2
    oat = sweep.expand_grid(sweep.TABLE1_GRID, "one-at-a-time", sweep.TABLE1_SELECTED)
    assert len(oat) == 1 + 2 + 2 + 3 + 1 + 1 and oat[0] == sweep.TABLE1_SELECTED
    names = {sweep.variant_name(p) for p in full}
    assert len(names) == len(full)  # every grid point has its own directory
    assert sweep.variant_name({"K": 8, "ranking_data": "pos+neg", "step": 0.1}) == "K-8_rank-pos-neg_step-0.1"
    with pytest.raises(CNPError, match="grid mode"):
        sweep.expand_grid({"K": [4]}, "random")


def test_plan_layout(tmp_path):
    jobs = sweep.plan(["carton-dugong", "crate-packet"], [0, 1], tmp_path, {"step": 0.1})
    assert [(j.pair, j.seed) for j in jobs] == [("carton-dugong", 0), ("carton-dugong", 1),
                                                 ("crate-packet", 0), ("crate-packet", 1)]
    assert jobs[1].run_dir == str(tmp_path / "carton-dugong" / "seed1") and jobs[1].overrides == {"step": 0.1}
    grid = sweep.plan(["basketball"], [0], tmp_path, {}, {"K": [4, 8], "lrp_variant": ["gamma"]})
    assert [Path(j.run_dir).relative_to(tmp_path).as_posix() for j in grid] == \
        ["basketball/K-4_lrp-gamma/seed0", "basketball/K-8_lrp-gamma/seed0"]
    assert grid[1].overrides == {"K": 8, "lrp_variant": "gamma"} and grid[1].label == "basketball/K-8_lrp-gamma"
    per_pair = sweep.plan(["basketball", "carton-dugong"], [0], tmp_path, {"step": 0.1, "ablate": "auto"},
                          pair_params={"basketball": {"ablate": "3"}})
    assert per_pair[0].overrides == {"step": 0.1, "ablate": "3"} and per_pair[1].overrides["ablate"] == "auto"
    with pytest.raises(CNPError, match="no pairs"):
        sweep.plan([], [0], tmp_path)


def test_resume_check_compares_parameters(tmp_path):
    job = sweep.plan(["carton-dugong"], [0], tmp_path, {"smoke": True})[0]
    assert sweep.job_status(job) == ("todo", "no metrics.json")
    p = sweep.resolved_params(job).to_dict()     # what a run of the notebooks records
    run = Path(job.run_dir)
    run.mkdir(parents=True)
    # run_dir, device and threads do not change results: still the same run
    (run / "metrics.json").write_text(json.dumps({"params": {**p, "run_dir": "/elsewhere", "threads": 7}}))
    assert sweep.job_status(job) == ("done", "")
    (run / "metrics.json").write_text(json.dumps({"params": {**p, "step": 0.3}}))
    assert sweep.job_status(job)[0] == "todo"
    (run / "metrics.json").write_text("{trunc")
    assert sweep.job_status(job) == ("todo", "metrics.json unreadable")
    bad = sweep.plan(["nosuchpair"], [0], tmp_path)[0]
    status, why = sweep.job_status(bad)
    assert status == "invalid" and "unknown pair" in why


def test_cli_dry_run_and_usage_errors(tmp_path, capsys):
    assert sweep.main(["--preset", "table1", "--pairs", "carton-dugong", "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "144 run(s)" in out and "carton-dugong/K-16_lrp-gamma_ep-10_rank-pos-neg_step-0.1" in out
    assert sweep.main(["--preset", "reproduce", "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    n_runs = sum(len(sweep.REPRODUCE_PAIR_SEEDS.get(pair, sweep.REPRODUCE_SEEDS))
                 for pair in sweep.PRESETS["reproduce"]["pairs"])
    assert f"{n_runs} run(s)" in out and "basketball" in out
    # the no-shortcut control lands beside the reproduce runs under its own label, trained with
    # the watermark equally frequent in both classes, and is recognised as a control by cnp.claims
    assert sweep.main(["--preset", "control", "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 run(s)" in out and "carton-dugong/wm_rate_pos-0.475_wm_rate_neg-0.475" in out
    p = sweep.PRESETS["control"]
    jobs = sweep.plan(p["pairs"], p["seeds"], tmp_path, p["params"], p["grid"], p["grid_mode"])
    assert {j.overrides["wm_rate_pos"] for j in jobs} == {j.overrides["wm_rate_neg"] for j in jobs} == {0.475}
    assert all(j.overrides[k] == v for j in jobs for k, v in sweep.REPRODUCE_PARAMS.items())
    # the evidence preset: its parts go to their own sub-directories, claims seeds as stated
    assert sweep.main(["--preset", "evidence", "--out", str(tmp_path / "ev"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "60 run(s)" in out
    ev = tmp_path / "ev"
    for sub, label, seed in (("reproduce", "carton-dugong", 9), ("reproduce", "crate-packet", 4),
                             ("reproduce", "carton-dugong/wm_rate_pos-0.475_wm_rate_neg-0.475", 4),
                             ("full", "carton-dugong", 4), ("styles", "carton-dugong/wm_text-SAMPLE", 4)):
        assert f"{ev / sub / label.split('/')[0]}" in out and f"seed{seed}" in out, (sub, label)
    assert f"{ev / 'styles' / 'carton-dugong' / 'wm_text-SAMPLE'}" in out
    assert f"{ev / 'reproduce' / 'carton-dugong' / 'seed9'}" in out and f"{ev / 'full' / 'carton-dugong' / 'seed4'}" in out
    assert f"{ev / 'full' / 'carton-dugong' / 'seed5'}" not in out
    # command-line values reach every part
    assert sweep.main(["--preset", "evidence", "--out", str(ev), "--seeds", "0", "--dry-run"]) == 0
    assert "11 run(s)" in capsys.readouterr().out    # easy, control, 2 variants, full, hard, 5 styles
    assert sweep.main(["--pairs", "carton-dugong", "--seeds", "0", "-p", "stpe=1", "--dry-run"]) == 2
    assert "unknown parameter 'stpe'" in capsys.readouterr().err
    assert sweep.main(["--seeds", "0", "--dry-run"]) == 2


def test_summary_rows_read_metrics(tmp_path):
    from test_figures import make_metrics

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(make_metrics()))
    results = [{"label": "carton-dugong", "seed": 0, "status": "done", "seconds": 12.0, "run_dir": str(tmp_path / "a")},
               {"label": "x", "seed": 1, "status": "failed", "seconds": 1.0, "run_dir": str(tmp_path / "b")}]
    rows, cols = sweep.summary_rows(results)
    assert cols == ["run", "seed", "status", "time_s", "cnp overall", "cnp c0w1", "vanilla overall", "vanilla c0w1"]
    assert rows[0]["cnp c0w1"] and rows[1]["cnp c0w1"] == ""
    assert sweep.format_table(rows, cols).splitlines()[0].startswith("run")


# ============================================================================ notebooks
def _parameters_cell(name: str):
    nb = nbformat.read(NB_DIR / name, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    return nb, cells


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_notebooks_are_stripped_with_one_parameters_cell(name):
    nb, cells = _parameters_cell(name)
    assert len(cells) == 1 and cells[0].cell_type == "code"
    assert nb.metadata["kernelspec"]["name"] == "cnp"
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{name}: commit notebooks without outputs"


def test_run_notebooks_share_their_parameters_and_defaults(monkeypatch):
    sources = {n: _parameters_cell(n)[1][0].source for n in sweep.RUN_NOTEBOOKS}
    assert len(set(sources.values())) == 1, "notebooks 01-05 must have identical parameters cells"
    monkeypatch.delenv("CNP_SMOKE", raising=False)
    ns: dict = {}
    exec(sources[sweep.RUN_NOTEBOOKS[0]], ns)
    declared = sweep.notebook_parameter_names(NB_DIR / sweep.RUN_NOTEBOOKS[0])
    known = set(FIELDS)
    assert declared - known == {"extra"}
    from cnp.params import BENCHMARK_DEFAULTS

    defaults = Params().to_dict()
    for name in declared - {"extra"}:
        if ns[name] is not None and name not in ("run_dir", "methods"):
            want = BENCHMARK_DEFAULTS.get(name, defaults[name])
            assert ns[name] == want, f"parameters cell default of {name} != Params / benchmark default"
    assert tuple(ns["methods"].split(",")) == tuple(defaults["methods"]) and ns["smoke"] is False
    assert {"step", "target", "epochs_per_step"} <= {k for k in declared if ns[k] is None}  # smoke sizes apply
    assert sweep.notebook_parameter_names(NB_DIR / sweep.FIGURES_NOTEBOOK) == {"sweep_dir", "figures_dir"}


def test_notebook_params_resolves_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("CNP_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("CNP_THREADS", "1")
    ns = {"pair": "crate-packet", "seed": 2, "step": None, "smoke": True, "run_dir": "", "threads": 0,
          "extra": {"drsa_steps": 7}, "unrelated": 1}
    p = notebook_params(ns)
    assert p.pruning.step == 0.4 and p.concepts.drsa_steps == 7 and p.run.threads == 1  # smoke size, extra, $CNP_THREADS
    assert p.run_path == tmp_path / "runs" / "smoke" / "crate-packet" / "seed2"
    assert notebook_params({"pair": "basketball"}).run_path == tmp_path / "runs" / "basketball" / "seed0"
    with pytest.raises(CNPError, match="target"):
        notebook_params({"target": 1.5})
    with pytest.raises(CNPError, match="extra"):
        notebook_params({"extra": [1]})


def test_injected_parameters_put_the_rest_in_extra():
    nb = NB_DIR / sweep.RUN_NOTEBOOKS[0]
    got = sweep.injected_parameters(nb, {"pair": "basketball", "step": 0.1, "drsa_steps": 9})
    assert got == {"pair": "basketball", "step": 0.1, "extra": {"drsa_steps": 9}}
    with pytest.raises(CNPError, match="no 'extra'"):
        sweep.injected_parameters(NB_DIR / sweep.FIGURES_NOTEBOOK, {"pair": "x"})


# ============================================================================ end to end
@pytest.fixture(scope="module")
def sweep_env(tmp_path_factory):
    """Environment of the sweep subprocesses: a fresh cache for this module, one thread, and no
    network but loopback (papermill's kernels talk over localhost): see ``netguard``."""
    sweep.check_kernel()  # fails with the fix (make .venv) when the 'cnp' kernel is missing
    cache = tmp_path_factory.mktemp("cnp_cache")
    env = {**os.environ, "CNP_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "CNP_THREADS": "1", "CNP_PROGRESS": "0", "PYTHONHASHSEED": "0"}
    env.pop("CNP_SMOKE", None)
    env, _log = guard_env(env, tmp_path_factory.mktemp("netguard"), allow_loopback=True)
    return env


def _network_attempts(env) -> list[str]:
    return refused(Path(env["CNP_NETGUARD_LOG"]))


def _cmd(out: Path, figs: Path, pairs, *extra) -> list[str]:
    return [sys.executable, "-m", "cnp.sweep", "--pairs", *pairs, "--seeds", "0", "1", "-p", "smoke=1",
            "--workers", "1", "--threads", "1", "--out", str(out), "--figures", str(figs), *extra]


def _mtimes(paths) -> dict[str, int]:
    paths = [Path(p) for p in paths]
    return {str(p): p.stat().st_mtime_ns for p in paths if p.is_file()}


@pytest.mark.slow
def test_sweep_killed_mid_run_resumes_without_redoing_work(tmp_path, sweep_env):
    out, figs = tmp_path / "sweep", tmp_path / "figs"
    run0, run1 = out / "carton-dugong" / "seed0", out / "carton-dugong" / "seed1"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_cmd(out, figs, ["carton-dugong"]), cwd=REPO, env=sweep_env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    # kill it (the whole process group, SIGKILL) once run 0 is finished and run 1 has finished a stage
    marker = run1 / "warmup" / "summary.json"
    deadline = time.monotonic() + 300
    try:
        while not ((run0 / "metrics.json").exists() and marker.exists()):
            assert proc.poll() is None, "the sweep ended before it could be killed:\n" + (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "the sweep made no progress"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    time.sleep(2.5)  # an orphaned kernel notices its parent is gone (ipykernel polls every second)
    assert not (run1 / "metrics.json").exists()
    before = _mtimes(run0.rglob("*"))
    before_run1 = _mtimes([marker, run1 / "warmup" / "model.pt"])
    assert len(before) > 10 and len(before_run1) == 2

    # a restart with a bad input stops before any run starts: nothing is touched
    res = subprocess.run(_cmd(out, figs, ["nosuchpair", "carton-dugong"]), cwd=REPO, env=sweep_env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "unknown pair 'nosuchpair'" in res.stderr and not (out / "nosuchpair").exists()
    assert _mtimes(before_run1) == before_run1 and _mtimes(before) == before
    # the restart proper resumes
    res = subprocess.run(_cmd(out, figs, ["carton-dugong"]), cwd=REPO, env=sweep_env,
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    # nothing finished was redone, nothing was lost
    assert _mtimes(before_run1) == before_run1 and _mtimes(before) == before
    rows = {line.split()[0] + line.split()[1]: line for line in res.stdout.splitlines()
            if line.startswith("carton-dugong ")}
    assert "skipped" in rows["carton-dugong0"] and " done " in rows["carton-dugong1"]
    metrics = json.loads((run1 / "metrics.json").read_text())
    assert metrics["seed"] == 1 and {"cnp", "vanilla"} <= set(metrics["curves"])
    for name in sweep.RUN_NOTEBOOKS:
        nb = nbformat.read(run1 / name, as_version=4)
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert (out / sweep.FIGURES_NOTEBOOK).exists()
    for f in ("fig2_subspaces_carton-dugong", "fig3_accuracy_carton-dugong"):
        assert (figs / f"{f}.png").stat().st_size > 0 and (figs / f"{f}.pdf").stat().st_size > 0
    assert "seeds | " in (figs / "table_summary.md").read_text()

    # the same sweep again: everything is up to date
    done = _mtimes([run0 / "metrics.json", run1 / "metrics.json"])
    res = subprocess.run(_cmd(out, figs, ["carton-dugong"], "--no-figures"), cwd=REPO, env=sweep_env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 skipped (up to date), 0 failed" in res.stdout and _mtimes(done) == done

    # the runs above shared one kernel per run (sweep.RunKernel); a kernel per notebook gives the
    # same run to the bit (only the run directory and the stage timings differ)
    fresh = tmp_path / "per-notebook"
    res = subprocess.run(_cmd(fresh, figs, ["carton-dugong"], "--seeds", "0", "--no-figures",
                              "--kernel-per-notebook"), cwd=REPO, env=sweep_env, capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr

    def comparable(run_dir):
        m = json.loads((run_dir / "metrics.json").read_text())
        del m["timings_s"], m["params"]["run_dir"]
        return m

    assert comparable(fresh / "carton-dugong" / "seed0") == comparable(run0)
    # offline: the whole sweep (its kernels included) tried no address but loopback
    assert _network_attempts(sweep_env) == []


def _fake_done(job) -> None:
    """Write a metrics.json that makes ``job`` up to date (no pipeline needed)."""
    d = Path(job.run_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps({"params": sweep.resolved_params(job).to_dict(), "curves": {}}))


def test_process_pool_workers(tmp_path):
    jobs = sweep.plan(["carton-dugong", "crate-packet"], [0], tmp_path, {"smoke": True})
    for j in jobs:
        _fake_done(j)
    res = sweep.run_local(jobs, workers=2, threads=1, kernel=sweep.KERNEL, notebooks=NB_DIR)
    assert [(r["label"], r["status"]) for r in res] == [("carton-dugong", "skipped"), ("crate-packet", "skipped")]


@pytest.mark.slow
def test_submitit_local_executor(tmp_path, sweep_env):
    pytest.importorskip("submitit")
    out = tmp_path / "sweep"
    _fake_done(sweep.plan(["carton-dugong"], [0], out, {"smoke": 1})[0])
    cmd = [sys.executable, "-m", "cnp.sweep", "--pairs", "carton-dugong", "crate-packet", "--seeds", "0", "-p",
           "smoke=1", "-p", "dataset=imagenet", "-p", f"imagenet_root={tmp_path / 'missing'}", "--threads", "1",
           "--out", str(out), "--no-figures", "--executor", "submitit", "--cluster", "local"]
    _fake_done(sweep.plan(["carton-dugong"], [0], out, {"smoke": 1, "dataset": "imagenet",
                                                        "imagenet_root": str(tmp_path / "missing")})[0])
    res = subprocess.run(cmd, cwd=REPO, env=sweep_env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "1 skipped (up to date), 1 failed" in res.stdout and "FAILED crate-packet" in res.stdout
    assert (out / "crate-packet" / "seed0" / "01_warmup.ipynb").exists() and any((out / ".submitit").iterdir())


def test_notebook_parameter_defaults_match_params():
    """The parameters cells repeat the defaults of cnp.pipeline.Params (or say None = default),
    except the embedded benchmark's method settings, which they take from cnp.params."""
    import ast
    import json
    from pathlib import Path

    from cnp.params import BENCHMARK_DEFAULTS
    from cnp.pipeline import Params

    defaults = {name: default for name, (_s, _t, default) in FIELDS.items()} | BENCHMARK_DEFAULTS
    assert BENCHMARK_DEFAULTS["K"] != Params().concepts.K                  # the paper's K = 4 stays the Params default
    run_specific = {"run_dir", "threads", "smoke", "methods", "device"}
    nb_dir = Path(__file__).resolve().parents[1] / "notebooks"
    checked = 0
    for path in sorted(nb_dir.glob("0[1-5]_*.ipynb")):
        nb = json.loads(path.read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        for node in ast.parse("".join(cell["source"])).body:
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            if isinstance(target, ast.Name) and node.value is not None:
                name = target.id
                if name in defaults and name not in run_specific and isinstance(node.value, ast.Constant):
                    value = node.value.value
                    if value is not None:
                        assert value == defaults[name], f"{path.name}: {name} = {value!r}, Params has {defaults[name]!r}"
                        checked += 1
    assert checked >= 5 * 10


def test_workers_die_with_a_killed_sweep(tmp_path):
    """A sweep process killed alone (SIGKILL to its pid, not its group) takes its pool workers with
    it (PR_SET_PDEATHSIG), so no orphan keeps writing into run directories."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    code = r"""
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from cnp.sweep.runner import _die_with_parent
def work(_):
    time.sleep(120)
if __name__ == "__main__":
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent) as pool:
        futs = [pool.submit(work, i) for i in range(2)]
        time.sleep(0.5)
        pids = list(pool._processes)
        while len(pids) < 2:
            time.sleep(0.1)
            pids = list(pool._processes)
        print(*pids, flush=True)
        time.sleep(120)
"""
    script = tmp_path / "pool.py"
    script.write_text(code)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(1.0)  # the workers have run their initializer (they are in work())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [p for p in pids if _alive(p)]
            time.sleep(0.1)
        assert not alive, f"workers {alive} outlived the killed sweep"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_sweep_module_does_not_import_torch():
    """The local pool's workers only drive papermill: importing cnp.sweep (what a spawned worker
    does) must not import torch (~0.3 GB of private memory per worker)."""
    code = "import sys, cnp.sweep; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def _one_cell_notebook(path: Path, code: str) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": sweep.KERNEL, "display_name": sweep.KERNEL, "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="the watchdog reads /proc (Linux)")
def test_idle_kernel_is_killed_and_reported(tmp_path):
    """A kernel that sits without CPU while its cell never returns (as when papermill loses the
    cell's reply) is killed after ``stall_s`` and reported as KernelStalled, instead of a wait
    without end. Here the cell sleeps 300 s; the watchdog gives up after 3 s."""
    src = _one_cell_notebook(tmp_path / "idle.ipynb", "import time\ntime.sleep(300)")
    t0 = time.monotonic()
    with pytest.raises(sweep.KernelStalled, match=r"idle.ipynb used no CPU for 3 s"):
        sweep.execute(src, tmp_path / "out.ipynb", {}, stall_s=3)
    assert time.monotonic() - t0 < 120


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="the watchdog reads /proc (Linux)")
def test_busy_kernel_is_not_killed(tmp_path):
    """A cell that computes for longer than ``stall_s`` is left alone: CPU use restarts the window."""
    src = _one_cell_notebook(tmp_path / "busy.ipynb",
                             "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 8:\n    pass\nprint('done')")
    sweep.execute(src, tmp_path / "out.ipynb", {}, stall_s=2)
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert "done" in out.cells[0].outputs[0]["text"]


def test_shared_kernel_runs_each_notebook_in_a_clean_namespace(tmp_path):
    """A run's notebooks share one kernel process, but each starts as in a fresh kernel: the
    previous notebook's variables are gone, execution counts start at 1, the modules it imported
    stay imported."""
    first = _one_cell_notebook(tmp_path / "a.ipynb", "import os, sys, json\nx = 41\nprint(os.getpid())")
    second = _one_cell_notebook(tmp_path / "b.ipynb", "import os, sys\nprint(os.getpid(), 'x' in dir(), "
                                "'json' in dir(), 'json' in sys.modules, os.getcwd())")
    with sweep.RunKernel(cwd=tmp_path) as shared:
        sweep.execute(first, tmp_path / "a.out.ipynb", {}, shared=shared)
        sweep.execute(second, tmp_path / "b.out.ipynb", {}, shared=shared)
        assert shared.starts == 1
    a = nbformat.read(tmp_path / "a.out.ipynb", as_version=4).cells[0]
    b = nbformat.read(tmp_path / "b.out.ipynb", as_version=4).cells[0]
    pid = a.outputs[0]["text"].split()[0]
    assert b.outputs[0]["text"].split() == [pid, "False", "False", "True", str(tmp_path)]
    assert a.execution_count == b.execution_count == 1
    assert shared.km is None  # closed with the block


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="the watchdog reads /proc (Linux)")
def test_shared_kernel_is_restarted_after_the_watchdog_kills_it(tmp_path):
    """A stalled notebook in the shared kernel is reported as in a kernel of its own; the next
    notebook gets a new kernel."""
    idle = _one_cell_notebook(tmp_path / "idle.ipynb", "import time\ntime.sleep(300)")
    after = _one_cell_notebook(tmp_path / "after.ipynb", "print('alive')")
    with sweep.RunKernel(cwd=tmp_path) as shared:
        with pytest.raises(sweep.KernelStalled, match=r"idle.ipynb used no CPU for 3 s"):
            sweep.execute(idle, tmp_path / "idle.out.ipynb", {}, stall_s=3, shared=shared)
        sweep.execute(after, tmp_path / "after.out.ipynb", {}, shared=shared)
        assert shared.starts == 2
    assert "alive" in nbformat.read(tmp_path / "after.out.ipynb", as_version=4).cells[0].outputs[0]["text"]


def test_shared_kernel_that_cannot_be_cleared_is_replaced(tmp_path):
    """When clearing the namespace fails, the next notebook runs in a fresh kernel (the same
    state a cleared one would give) instead of failing the run; the failure is recorded."""
    breaks = _one_cell_notebook(tmp_path / "breaks.ipynb",
                                "import os\nx = 1\nget_ipython().reset = lambda **kw: 1 / 0\nprint(os.getpid())")
    after = _one_cell_notebook(tmp_path / "after.ipynb", "import os\nprint(os.getpid(), 'x' in dir())")
    with sweep.RunKernel(cwd=tmp_path) as shared:
        sweep.execute(breaks, tmp_path / "breaks.out.ipynb", {}, shared=shared)
        sweep.execute(after, tmp_path / "after.out.ipynb", {}, shared=shared)
        assert shared.starts == 2
        assert len(shared.reset_failures) == 1 and "ZeroDivisionError" in shared.reset_failures[0]
    first = nbformat.read(tmp_path / "breaks.out.ipynb", as_version=4).cells[0].outputs[0]["text"].split()
    second = nbformat.read(tmp_path / "after.out.ipynb", as_version=4).cells[0].outputs[0]["text"].split()
    assert second[0] != first[0] and second[1] == "False"


def test_run_job_reruns_a_stalled_notebook_once(tmp_path, monkeypatch, capsys):
    """run_job runs a notebook whose kernel stalled once more (its finished stages are reused), and
    reports a failure when it stalls again."""
    job = sweep.plan(["carton-dugong"], [0], tmp_path, {"smoke": True})[0]
    calls = []

    def fake_execute(src, dst, parameters, kernel=sweep.KERNEL, cwd=None, stall_s=None, shared=None):
        calls.append(src.name)
        if src.name == "03_ablate.ipynb" and calls.count(src.name) <= stalls:
            raise sweep.KernelStalled(f"the kernel of {src.name} used no CPU for 900 s")
        if src.name == sweep.RUN_NOTEBOOKS[-1]:
            (Path(job.run_dir) / "metrics.json").write_text("{}")

    monkeypatch.setattr(sweep.runner, "execute", fake_execute)   # where run_job looks it up
    monkeypatch.setattr(os, "environ", dict(os.environ))   # run_job sets thread and widget variables
    stalls = 1
    res = sweep.run_job(job, status=("run", "test"))
    assert res["status"] == "done", res
    assert calls.count("03_ablate.ipynb") == 2 and calls[-1] == sweep.RUN_NOTEBOOKS[-1]
    assert "used no CPU for 900 s; running 03_ablate.ipynb again" in capsys.readouterr().out
    calls.clear()
    stalls = 2
    res = sweep.run_job(job, status=("run", "test"))
    assert res["status"] == "failed" and "03_ablate" in res["notebook"] and "KernelStalled" in res["error"]
    assert calls.count("03_ablate.ipynb") == 2 and sweep.RUN_NOTEBOOKS[-1] not in calls


def test_run_job_reports_a_shared_kernel_that_was_replaced(tmp_path, monkeypatch, capsys):
    """A shared kernel that could not be cleared (RunKernel replaced it) is said in the sweep's log,
    once, with the notebook that ran in the fresh kernel."""
    job = sweep.plan(["carton-dugong"], [0], tmp_path, {"smoke": True})[0]
    seen = []

    def fake_execute(src, dst, parameters, kernel=sweep.KERNEL, cwd=None, stall_s=None, shared=None):
        seen.append(shared)
        if src.name == "03_ablate.ipynb":
            shared.reset_failures.append("ZeroDivisionError: division by zero")
        if src.name == sweep.RUN_NOTEBOOKS[-1]:
            (Path(job.run_dir) / "metrics.json").write_text("{}")

    monkeypatch.setattr(sweep.runner, "execute", fake_execute)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    assert sweep.run_job(job, status=("run", "test"))["status"] == "done"
    out = capsys.readouterr().out
    assert out.count("could not be cleared") == 1
    assert ("could not be cleared before 03_ablate.ipynb (ZeroDivisionError: division by zero); "
            "it ran in a fresh kernel") in out
    assert len({id(s) for s in seen}) == 1 and isinstance(seen[0], sweep.RunKernel)
    # a kernel per notebook: no shared kernel, nothing to report
    seen.clear()
    monkeypatch.setattr(sweep.runner, "execute",
                        lambda src, dst, parameters, shared=None, **kw: seen.append(shared) or
                        (Path(job.run_dir) / "metrics.json").write_text("{}"))
    assert sweep.run_job(job, status=("run", "test"), kernel_per_notebook=True)["status"] == "done"
    assert seen == [None] * len(sweep.RUN_NOTEBOOKS) and "could not be cleared" not in capsys.readouterr().out


def test_expected_key_matches_what_the_notebooks_resolve(monkeypatch, tmp_path):
    """The resume check expects the parameters the notebooks will resolve: the parameters cell's
    values (the benchmark's settings where they differ from Params) under the injected ones; else
    a finished run would look stale and be redone."""
    monkeypatch.delenv("CNP_SMOKE", raising=False)
    monkeypatch.delenv("CNP_THREADS", raising=False)
    source = _parameters_cell(sweep.RUN_NOTEBOOKS[0])[1][0].source
    for overrides in ({}, {"smoke": True}, {"K": 4, "rate_of": "all"}, {"step": 0.1}):
        job = sweep.plan(["carton-dugong"], [1], tmp_path, overrides)[0]
        ns: dict = {}
        exec(source, ns)
        ns.update(job.all_params())             # what papermill injects after the cell
        assert sweep.params_key(notebook_params(ns).to_dict()) == sweep.expected_key(job), overrides


def test_a_failing_run_keeps_its_notebook_and_the_others_go_on(tmp_path):
    """A run that passes validation but fails while it runs (here: an ImageNet folder that does not
    exist) keeps its executed notebook with the error in it; the other runs are not affected."""
    missing = str(tmp_path / "no-imagenet")
    jobs = sweep.plan(["carton-dugong", "crate-packet"], [0], tmp_path / "sweep",
                      {"smoke": True, "dataset": "imagenet", "imagenet_root": missing})
    _fake_done(jobs[0])
    res = sweep.run_local(jobs, workers=1, threads=1, kernel=sweep.KERNEL, notebooks=NB_DIR)
    assert [r["status"] for r in res] == ["skipped", "failed"]
    assert "01_warmup" in res[1]["notebook"] and "CNPError" in res[1]["error"]
    nb = nbformat.read(Path(jobs[1].run_dir) / "01_warmup.ipynb", as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors and errors[0].ename == "CNPError"


def test_bad_input_stops_the_sweep_before_any_run(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep.main(["--pairs", "carton-dugong", "nosuchpair", "--seeds", "0", "--out", str(out)]) == 2
    assert "unknown pair 'nosuchpair'" in capsys.readouterr().err and not out.exists()
    assert sweep.main(["--pairs", "carton-dugong", "--seeds", "0", "--cluster", "slurm", "--out", str(out)]) == 2
    assert "needs --executor submitit" in capsys.readouterr().err


def test_list_params_and_version(capsys):

    from cnp.params import PARAM_HELP

    assert set(PARAM_HELP) == set(FIELDS)      # every parameter has its line
    assert sweep.main(["--list-params"]) == 0
    text = capsys.readouterr().out
    for name in FIELDS:
        assert f"\n{name} " in text
    assert "rr_lambda" in text and re.search(r"\nK +concepts +int +8 ", text)   # the benchmark's K
    with pytest.raises(SystemExit):
        sweep.main(["--version"])
    import cnp

    assert capsys.readouterr().out.strip() == f"cnp {cnp.__version__}"
    helptext = sweep.build_parser().format_help()
    assert all(f"  {k} " in helptext for k in sweep.PRESETS) and "about 15 min on 2 cores" in helptext


def test_parameters_cells_declare_their_types():
    """papermill --help-notebook shows each parameter's type: every assignment of a parameters
    cell is annotated, with the type of the Params field (or ``T | None`` for "the default")."""
    import ast

    import nbformat


    hints = {name: typ for name, (_s, typ, _d) in FIELDS.items()}
    for name in (*sweep.RUN_NOTEBOOKS, sweep.FIGURES_NOTEBOOK):
        nb = nbformat.read(NB_DIR / name, as_version=4)
        (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.Import):
                continue
            assert isinstance(node, ast.AnnAssign), f"{name}: {ast.unparse(node)} has no type annotation"
            ann, var = ast.unparse(node.annotation), node.target.id
            if var in hints and var != "methods":
                want = type_name(hints[var]).replace(" or None", "")
                assert ann in (want, f"{want} | None"), f"{name}: {var}: {ann} (Params says {want})"


@pytest.mark.parametrize("module", ["cnp.sweep", "cnp.claims", "cnp.data", "cnp.notebooks"])
def test_help_texts_hold_no_raw_markup(module):
    """--help is read in a terminal: no reStructuredText markup (``code``, :func:) in it."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
    for markup in ("``", ":func:", ":class:", ":mod:"):
        assert markup not in out.stdout, f"{module} --help holds {markup!r}"
