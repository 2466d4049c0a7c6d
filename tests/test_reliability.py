"""Reliability guarantees, on smoke settings (docs/guarantees.md lists them).

* Interruption: a pipeline run, a pruning schedule and a DRSA fit killed with SIGKILL at a
  moment drawn from a seeded RNG (while work is in progress) and restarted end with the
  uninterrupted results, redo no finished stage or step, and leave no file a later stage would
  read half-written; a corrupt or truncated stage file is detected and rebuilt, with a message.
* Caches: pair data and the backbone carry a hash of recipe and contents; stale or corrupt
  cache files are rebuilt with a message (and the rebuild gives the same bytes).
* Determinism: the same (pair, seed, parameters) twice on the CPU gives byte-identical
  metrics.json apart from ``timings_s``.
* Offline: the smoke run makes no network connection (a ``sitecustomize`` refuses and records
  every attempt; where possible it also runs in a network namespace without interfaces).
* Resources: peak RSS of a smoke run under a bound; an unwritable run directory or a full disk
  fails with one clear line and leaves the finished run intact.
* Bad parameters: one line, before any work, through make_params, run_all, the sweep command
  line and a papermill-executed notebook.

Runs happen in subprocesses (so they can be killed) with one fresh ``CNP_CACHE`` for the whole test run; the
first (reference) run builds the pair data and the backbone there, offline.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from netguard import guard_env, netns_prefix, refused

from cnp.io import CNPError, safe_torch_load, sha256_file

REPO = Path(__file__).resolve().parents[1]
RUN = "run"  # relative run_dir: every run executes in its own folder, so params.run.run_dir is equal
CPU = {"smoke": True, "threads": 1, "device": "cpu"}  # every run: smoke sizes, one thread, the CPU
SMOKE_RSS_BOUND_MB = 1500  # a smoke run peaks at ~1.1-1.2 GB (0.5 GB of it is importing torch); see docs

RUN_SCRIPT = r"""
import json, re, socket, sys
print("INTERFACES", sorted(name for _, name in socket.if_nameindex()), flush=True)
from cnp.io import CNPError
from cnp.pipeline import run_all
try:
    run_all(verbose=True, **json.loads(sys.argv[1]))
except CNPError as exc:
    print(f"CNPError: {exc}", flush=True)
    sys.exit(3)
# VmHWM: this process's own peak. ru_maxrss is not used: Linux keeps it across fork + exec, so a
# child of a large pytest process reported the parent's size (2.9 GB in CI) instead of its own.
print("PEAK_RSS_KB", re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1), flush=True)
"""


# ============================================================================ helpers
@pytest.fixture(scope="session")
def rel(tmp_path_factory):
    """Environment of the subprocess runs: fresh cache, one thread, network refused (and, where
    unprivileged namespaces work, a network namespace without interfaces)."""
    root = tmp_path_factory.mktemp("reliability")
    env = {**os.environ, "CNP_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "CNP_THREADS": "1", "CNP_PROGRESS": "0", "PYTHONHASHSEED": "0"}
    env.pop("CNP_SMOKE", None)
    env, log = guard_env(env, root / "netguard", allow_loopback=False)
    return SimpleNamespace(root=root, cache=root / "cache", env=env, netlog=log, netns=netns_prefix())


def run_cmd(rel, netns: bool = True, **overrides) -> list[str]:
    args = json.dumps({**CPU, "run_dir": RUN, **overrides})
    return [*((rel.netns or ()) if netns else ()), sys.executable, "-c", RUN_SCRIPT, args]


def folder(rel, name: str) -> Path:
    d = rel.root / name
    d.mkdir()
    return d


def run_to_end(rel, where: Path, **overrides) -> str:
    res = subprocess.run(run_cmd(rel, **overrides), cwd=where, env=rel.env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert refused(rel.netlog) == [], "a run tried to use the network"
    return res.stdout


def peak_rss_mb(stdout: str) -> float:
    return int(re.search(r"PEAK_RSS_KB (\d+)", stdout).group(1)) / 1024


_TIMINGS = re.compile(rb'\n  "timings_s": \{\n.*?\n  \}', re.S)


def metrics_without_timings(run_dir: Path) -> bytes:
    """metrics.json as written, with its ``timings_s`` block cut out (nothing else changed)."""
    data = (run_dir / "metrics.json").read_bytes()
    cut, n = _TIMINGS.subn(b"", data)
    assert n == 1 and b"timings_s" not in cut and b'"seconds"' not in cut
    return cut


def check_every_file_loads(run_dir: Path) -> None:
    """No file a stage would read is truncated: every JSON parses, every checkpoint loads.
    (A killed atomic write may leave a hidden ``.<name>.*.tmp``; nothing reads those.)"""
    for f in run_dir.rglob("*"):
        if not f.is_file() or f.name.startswith("."):
            continue
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".pt":
            safe_torch_load(f)


def snapshot(run_dir: Path) -> dict[str, tuple[int, str]]:
    """mtime and SHA-256 of every (non-hidden) file, relative path -> (mtime_ns, sha)."""
    return {str(f.relative_to(run_dir)): (f.stat().st_mtime_ns, sha256_file(f))
            for f in sorted(run_dir.rglob("*")) if f.is_file() and not f.name.startswith(".")}


def kill_after(proc: subprocess.Popen, marker, delay: float, what: str) -> str:
    """Wait for ``marker`` (a path that must exist, or a function that must return True: the
    work has reached a known point), then ``delay`` seconds, then SIGKILL the process group;
    the process must still have been working. Returns its output."""
    ready = marker if callable(marker) else marker.exists
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"{what} ended before its work started:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{what} never started"
        time.sleep(0.02)
    time.sleep(delay)
    still_running = proc.poll() is None
    if still_running:
        os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    assert still_running, f"{what} finished before the kill at {delay:.2f} s; widen the window:\n{out}"
    assert proc.returncode == -signal.SIGKILL
    return out


def popen(cmd, cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.fixture(scope="session")
def reference(rel):
    """One uninterrupted smoke run with a fresh cache (pair data and backbone built here), offline."""
    where = folder(rel, "reference")
    out = run_to_end(rel, where)
    assert "pretraining the embedded backbone" in out  # the cache really was built in this run
    return SimpleNamespace(dir=where / RUN, out=out, metrics=json.loads((where / RUN / "metrics.json").read_text()))


@pytest.fixture(scope="session")
def second(rel, reference):
    """The same run again in a fresh run directory (the cache is warm now)."""
    where = folder(rel, "again")
    out = run_to_end(rel, where)
    return SimpleNamespace(dir=where / RUN, out=out, metrics=json.loads((where / RUN / "metrics.json").read_text()))


# ============================================================================ determinism, offline, memory
def test_same_seed_gives_byte_identical_metrics(reference, second):
    """Determinism: a second run of the same (pair, seed, parameters) in a fresh run directory
    writes the same metrics.json bytes apart from timings_s; the models are bit-identical."""
    assert metrics_without_timings(second.dir) == metrics_without_timings(reference.dir)
    for f in ("warmup/model.pt", "augment/concepts.pt", "prune/prune_cnp.pt", "prune/prune_vanilla.pt"):
        a, b = safe_torch_load(second.dir / f), safe_torch_load(reference.dir / f)
        sa, sb = a.get("state_dict", a), b.get("state_dict", b)
        for k, v in sa.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, sb[k]), f"{f}: {k} differs between two runs"
    # resources: a cheap guard on the peak memory of both runs (the full run is measured in docs)
    for o in (reference.out, second.out):
        assert peak_rss_mb(o) < SMOKE_RSS_BOUND_MB, f"smoke run peaked at {peak_rss_mb(o):.0f} MB"


def test_smoke_run_makes_no_network_connection(rel, reference):
    """Offline: the reference run (which generated the data and pretrained the backbone) tried
    no connection at all; in a network namespace it saw no interface but loopback."""
    assert refused(rel.netlog) == []
    if rel.netns is not None:
        assert "INTERFACES ['lo']" in reference.out
    else:  # pragma: no cover - depends on the machine
        pytest.skip("no unprivileged network namespace here; only the socket-level guard was checked")


def test_network_guard_refuses_and_records(rel, tmp_path):
    """The guard the offline tests rely on really refuses and records a connection."""
    env, log = guard_env(rel.env, tmp_path / "g", allow_loopback=False)
    code = ("import socket\ntry:\n    socket.create_connection(('192.0.2.1', 80), timeout=1)\n"
            "except OSError as e:\n    print('refused', e.errno)\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert f"refused {errno.ENETUNREACH}" in res.stdout and len(refused(log)) == 1


# ============================================================================ interruption
def test_pipeline_killed_twice_at_random_moments_resumes_identically(rel, reference, second):
    """A smoke run killed (SIGKILL) twice at random moments and restarted: same metrics.json as
    the uninterrupted run, no finished stage or pruning step redone, no truncated file."""
    rng = random.Random(8)
    t = second.metrics["timings_s"]  # seconds per stage of a warm-cache run
    where = folder(rel, "killed")
    run = where / RUN

    def pruning_checkpoint_written_since(t0: int):
        return lambda: any(f.stat().st_mtime_ns > t0 for f in (run / "prune").glob("prune_*.pt"))

    # kill 1: after the warm-up, at a random moment in augment, ablate or the first half of the
    # CNP schedule; kill 2 (restarted run): after its first pruning checkpoint, at a random
    # moment in the rest of the CNP schedule or the vanilla one
    delays = [rng.uniform(0, t["augment"] + t["ablate"] + 0.5 * t["prune:cnp"]),
              rng.uniform(0.1, 0.6) * t["prune:vanilla"]]
    finished: dict[str, tuple[int, str]] = {}
    for attempt, delay in enumerate(delays):
        if attempt == 0:
            def ready():
                return (run / "warmup" / "summary.json").exists()
        else:
            ready = pruning_checkpoint_written_since(time.time_ns())
        proc = popen(run_cmd(rel), where, rel.env)
        kill_after(proc, ready, delay, f"run attempt {attempt}")
        check_every_file_loads(run)
        assert not (run / "metrics.json").exists()
        # what is finished now: stages with a summary (written last, atomically) and their files
        snap = snapshot(run)
        for stage in ("warmup", "augment", "ablate", "prune"):
            summary = run / stage / "summary.json"
            if summary.exists():
                s = json.loads(summary.read_text())
                for rel_path in [f"{stage}/summary.json", *s["files"]]:
                    finished.setdefault(rel_path, snap[rel_path])
        resumed_ckpt: dict[str, int] = {}
        for m in ("cnp", "vanilla"):  # a schedule interrupted between steps resumes after its last one
            ckpt = run / "prune" / f"prune_{m}.pt"
            if ckpt.exists():
                blob = safe_torch_load(ckpt)
                if not blob["done"]:
                    resumed_ckpt[m] = int(blob["step"])
    out = run_to_end(rel, where)
    assert metrics_without_timings(run) == metrics_without_timings(reference.dir)
    now = snapshot(run)
    # prune/summary.json is rewritten after each method (progress); everything else is final
    redone = [f for f, v in finished.items() if f != "prune/summary.json" and now[f] != v]
    assert not redone, f"finished work was redone: {redone}"
    for m, step in resumed_ckpt.items():
        if f"prune/prune_{m}.pt" not in finished:
            assert f"resuming prune_{m}.pt after step {step}" in out
    assert finished, "the kills came before any stage finished; the window is too early"
    check_every_file_loads(run)


BUILD_PRUNE = r"""
import torch
from cnp.data.synthetic import PairConfig, make_pair
from cnp.drsa import random_orthogonal
from cnp.models import VGG, block_widths_to_conv_widths
from cnp.pruning import PruneConfig

def build():
    torch.manual_seed(0)
    model = VGG(block_widths_to_conv_widths((8, 8, 16, 16, 16)), num_classes=2, hidden=16, pool_size=1,
                dropout=0.0).eval()
    data = make_pair(PairConfig(pair="carton-dugong", seed=0, image_size=32, n_train_per_class=24, n_drsa=8,
                                n_rank=12, n_val_per_subgroup=3, n_test_per_subgroup=4))
    concept = {"U": random_orthogonal(16, seed=3)[0].float(), "K": 4, "ablated": [1], "mode": "zero",
               "mean_activation": None, "layer": "relu4_3"}
    cfg = PruneConfig(step=0.1, target=0.8, epochs_per_step=1, final_epochs=1, batch_size=8, wm_share_images=2)
    return model, data, concept, cfg
"""

PRUNE_SCRIPT = BUILD_PRUNE + r"""
import json, sys
from pathlib import Path
torch.set_num_threads(1)
import cnp.pruning.schedule as sch
from cnp.io import tensor_hash
run_dir = Path(sys.argv[1])
original = sch._finetune
def logged(model, data, cfg, epochs, seed_parts, *args, **kwargs):  # records every fine-tune started
    with open(run_dir / "finetunes.log", "a") as fh:
        fh.write(f"{seed_parts[0]} {seed_parts[-1]}\n")
    return original(model, data, cfg, epochs, seed_parts, *args, **kwargs)
sch._finetune = logged
model, data, concept, cfg = build()
(run_dir / "started").write_text("")
res = sch.run_pruning(model, data, "cnp", cfg, concept_state=concept, seed=1, run_dir=run_dir, verbose=True)
(run_dir / "result.json").write_text(json.dumps({"curve": res.curve, "weights": tensor_hash(
    *[v for _, v in sorted(res.model.state_dict().items())])}, sort_keys=True))
"""


def test_pruning_schedule_killed_at_random_moment_resumes_identically(rel, tmp_path):
    """run_pruning killed mid-schedule: the restart resumes after the last checkpointed step,
    fine-tunes each later step once, and ends with the uninterrupted curve and weights."""
    from cnp.io import tensor_hash
    from cnp.pruning import run_pruning

    ns: dict = {}
    exec(BUILD_PRUNE, ns)
    model, data, concept, cfg = ns["build"]()
    ref = run_pruning(model, data, "cnp", cfg, concept_state=concept, seed=1, verbose=False)
    ref_weights = tensor_hash(*[v for _, v in sorted(ref.model.state_dict().items())])

    run_dir = tmp_path / "prune"
    run_dir.mkdir()
    cmd = [sys.executable, "-c", PRUNE_SCRIPT, str(run_dir)]
    # kill as soon as the fine-tune of step r + 1 has started (so step r is checkpointed), r drawn
    # at random inside the schedule: a progress marker, not a wall-clock delay, so a fast or slow
    # machine kills at the same kind of moment
    r = random.Random(4).randint(1, cfg.n_steps - 2)
    log = run_dir / "finetunes.log"

    def reached() -> bool:
        return log.exists() and len(log.read_text().splitlines()) >= r + 1

    kill_after(popen(cmd, tmp_path, rel.env), reached, 0.0, "the pruning schedule")
    ckpt = run_dir / "prune_cnp.pt"
    blob = safe_torch_load(ckpt)  # complete, never truncated
    k = int(blob["step"])
    assert not blob["done"] and 1 <= k < cfg.n_steps, f"killed at step {k}: outside the schedule"
    first = (run_dir / "finetunes.log").read_text().splitlines()
    assert first[:k] == [f"step {s}" for s in range(1, k + 1)]

    res = subprocess.run(cmd, cwd=tmp_path, env=rel.env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resuming prune_cnp.pt after step {k}" in res.stdout
    second = (run_dir / "finetunes.log").read_text().splitlines()[len(first):]
    assert second == [f"step {s}" for s in range(k + 1, cfg.n_steps + 1)] + ["final 1"], "a step was redone"
    got = json.loads((run_dir / "result.json").read_text())
    assert json.dumps(got["curve"], sort_keys=True) == json.dumps(ref.curve, sort_keys=True)
    assert got["weights"] == ref_weights


DRSA_SCRIPT = r"""
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from cnp import drsa
from cnp.io import atomic_torch_save
out = Path(sys.argv[1])
g = torch.Generator().manual_seed(0)
A, C = torch.rand(400, 32, generator=g), torch.randn(400, 32, generator=g)
(out / "started").write_text("")
r = drsa.fit(A, C, K=4, steps=int(sys.argv[2]), restarts=2, seed=0, progress=False,
             checkpoint=out / "drsa.pt", checkpoint_every=50)
atomic_torch_save(out / "result.pt", {"U": r.U, "history": r.restart_history, "resumed_from": r.resumed_from})
"""


def test_drsa_fit_killed_at_random_moment_resumes_identically(rel, tmp_path):
    """drsa.fit killed mid-fit: the checkpoint on disk is complete, the restart starts at its
    step (no finished step redone) and ends with the uninterrupted U and history."""
    from cnp import drsa

    steps = 8000
    cmd = [sys.executable, "-c", DRSA_SCRIPT, str(tmp_path), str(steps)]
    # kill a random short moment after the first checkpoint appeared (a progress marker; the fit
    # has thousands of steps left then on any machine)
    delay = random.Random(2).uniform(0.0, 0.2)
    kill_after(popen(cmd, tmp_path, rel.env), tmp_path / "drsa.pt", delay, "the DRSA fit")
    state = safe_torch_load(tmp_path / "drsa.pt")
    k = int(state["step"])
    assert 0 < k < steps and k % 50 == 0
    res = subprocess.run(cmd, cwd=tmp_path, env=rel.env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    got = safe_torch_load(tmp_path / "result.pt")
    assert got["resumed_from"] == k
    g = torch.Generator().manual_seed(0)
    A, C = torch.rand(400, 32, generator=g), torch.randn(400, 32, generator=g)
    ref = drsa.fit(A, C, K=4, steps=steps, restarts=2, seed=0, progress=False)
    assert torch.equal(got["U"], ref.U) and torch.equal(got["history"], ref.restart_history)


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage\xff" * 7)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("target, damage, message, redone", [
    ("warmup/summary.json", _garbage, "warmup: .*summary.json is unreadable",
     ("warmup", "augment", "ablate", "prune")),
    ("augment/concepts.pt", _truncate, r"augment: augment/concepts.pt does not match the SHA-256",
     ("augment", "ablate", "prune")),
    ("prune/prune_cnp.pt", _garbage, r"prune: prune/prune_cnp.pt does not match the SHA-256", ("prune",)),
    ("ablate/heatmaps.pt", Path.unlink, r"ablate: ablate/heatmaps.pt is missing", ("ablate", "prune")),
])
def test_corrupt_stage_file_is_detected_and_rebuilt(rel, reference, tmp_path, monkeypatch, capsys,
                                                    target, damage, message, redone):
    """A stage file damaged after the run (garbage, truncated, deleted) is not trusted: the
    stage says so in one line and runs again (with the stages after it), the others are kept,
    and the results equal the undamaged run's."""
    from cnp.pipeline import run_all

    shutil.copytree(reference.dir, tmp_path / RUN)
    before = snapshot(tmp_path / RUN)
    damage(tmp_path / RUN / target)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CNP_CACHE", str(rel.cache))
    run_all(**CPU, run_dir=RUN, verbose=True)
    out = capsys.readouterr().out
    assert re.search(message + ".*re-running the stage", out), out
    after = snapshot(tmp_path / RUN)
    for stage in ("warmup", "augment", "ablate", "prune"):
        changed = after[f"{stage}/summary.json"][0] != before[f"{stage}/summary.json"][0]
        assert changed == (stage in redone), f"{stage}: rerun={changed}, expected {stage in redone}"
    assert metrics_without_timings(tmp_path / RUN) == metrics_without_timings(reference.dir)
    check_every_file_loads(tmp_path / RUN)


# ============================================================================ caches
def test_pair_data_cache_stale_or_corrupt_is_rebuilt(tmp_path, monkeypatch, capsys):
    """The pair-data cache file (named by the recipe hash, holding the recipe and a content
    hash per split) is rebuilt with a message when corrupt, truncated, tampered or stale."""
    from cnp.data.synthetic import load_pair, make_pair
    from cnp.data.synthetic import pair_config as synthetic_config
    from cnp.pipeline import make_params

    monkeypatch.setenv("CNP_CACHE", str(tmp_path))
    cfg = synthetic_config(make_params(smoke=True))
    fresh = make_pair(cfg)
    fingerprints = {k: s.fingerprint() for k, s in fresh.splits.items()}
    load_pair(cfg)
    (path,) = (f for f in (tmp_path / "pairs").iterdir() if not f.name.startswith("."))  # not the build lock
    good = path.read_bytes()

    def tamper(p):  # valid file, one pixel changed, the recorded content hash kept
        blob = safe_torch_load(p)
        blob["splits"]["test"]["images"][0, 0, 0, 0] ^= 1
        torch.save(blob, p)

    def stale(p):  # a valid cache file of another recipe under this name
        other = make_pair(dataclasses.replace(cfg, seed=cfg.seed + 1))
        other.save(p)

    for damage, msg in [(_garbage, "is corrupt"), (_truncate, "is corrupt"), (tamper, "content hash mismatch"),
                        (stale, "is stale")]:
        damage(path)
        data = load_pair(cfg)
        out = capsys.readouterr().out
        assert f"cached pair data {path.name}" in out and msg in out and "rebuilding" in out, out
        assert {k: s.fingerprint() for k, s in data.splits.items()} == fingerprints
        assert path.read_bytes() == good  # rebuilt byte for byte
    load_pair(cfg)
    assert capsys.readouterr().out == ""  # a good cache file is used silently


def test_backbone_cache_stale_or_corrupt_is_rebuilt(tmp_path, monkeypatch, capsys):
    """The backbone cache file (named by the recipe hash, holding the recipe and a weights
    hash) is rebuilt with a message when corrupt, truncated, tampered or stale; the rebuild is
    deterministic (same weights hash)."""
    from cnp.pipeline import backbone_config, make_params
    from cnp.pretrain import _weights_hash, backbone_path, load_backbone

    monkeypatch.setenv("CNP_CACHE", str(tmp_path))
    base = backbone_config(make_params(smoke=True))  # the smoke recipe, made tinier still
    cfg = dataclasses.replace(base, epochs=1, corpus=dataclasses.replace(base.corpus, n_per_class=6, n_val_per_class=4))
    model, _ = load_backbone(cfg, verbose=False)
    weights = _weights_hash(model)
    path = backbone_path(cfg)

    def tamper(p):
        blob = safe_torch_load(p)
        blob["state_dict"]["features.0.weight"][0, 0, 0, 0] += 1.0
        torch.save(blob, p)

    def stale(p):
        blob = safe_torch_load(p)
        blob["extra"]["recipe"]["epochs"] = 99
        torch.save(blob, p)

    for damage, msg in [(_garbage, "could not be read"), (_truncate, "could not be read"),
                        (tamper, "weights hash ok: False"), (stale, "recipe ok: False")]:
        damage(path)
        model, _ = load_backbone(cfg, verbose=True)
        out = capsys.readouterr().out
        assert f"cached backbone {path.name}" in out and msg in out and "rebuilding" in out, out
        assert _weights_hash(model) == weights
        assert _weights_hash(load_backbone(cfg, verbose=False)[0]) == weights  # the rebuilt file is good
    load_backbone(cfg, verbose=True)
    assert "backbone" not in capsys.readouterr().out  # a good cache file is used silently


_CONCURRENT_BUILDER = """
import json, sys, time
from pathlib import Path
from cnp.io import atomic_write_json, load_or_build

path, log = Path(sys.argv[1]), Path(sys.argv[2])

def build():
    with open(log, "a") as fh:
        fh.write("built\\n")
    time.sleep(1.0)  # long enough for the other process to arrive while this one builds
    return {"value": 42}

obj = load_or_build(path, build, what="test entry", save=atomic_write_json,
                    load=lambda p: json.loads(p.read_text()), verbose=False)
print(obj["value"])
"""


def test_concurrent_processes_build_a_cache_entry_once(tmp_path):
    """Two processes that miss the same cache entry at the same time: one builds it, the other
    waits on the entry's lock and reads the first one's file (the sweep's workers, parallel test
    workers and two open notebooks share the cache this way)."""
    entry, log = tmp_path / "cache" / "entry.json", tmp_path / "builds.log"
    cmd = [sys.executable, "-c", _CONCURRENT_BUILDER, str(entry), str(log)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == ["42", "42"]
    assert log.read_text().count("built") == 1, log.read_text()
    assert json.loads(entry.read_text()) == {"value": 42}
    assert sorted(f.name for f in entry.parent.iterdir()) == [".entry.json.lock", "entry.json"]


# ============================================================================ resources
def test_unwritable_run_dir_fails_clearly_and_keeps_the_finished_run(rel, reference, tmp_path):
    """A finished run whose directory became read-only, run again with a changed parameter:
    one clear line, exit status 3 (the script's CNPError), and every file unchanged."""
    run = tmp_path / RUN
    shutil.copytree(reference.dir, run)
    before = snapshot(run)
    cmd = run_cmd(rel, netns=False, target=0.6)  # (as root of a user namespace it could write anyway)
    if os.geteuid() != 0:
        for d in [run, *[p for p in run.rglob("*") if p.is_dir()]]:
            d.chmod(0o555)
    else:  # root writes anywhere: make it a read-only bind mount in a private mount namespace
        if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
            pytest.skip("running as root without unprivileged mount namespaces")
        cmd = ["unshare", "-rm", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"',
               str(run), *run_cmd(rel, netns=False, target=0.6)]
    try:
        res = subprocess.run(cmd, cwd=tmp_path, env=rel.env, capture_output=True, text=True, timeout=300)
    finally:
        for d in [run, *[p for p in run.rglob("*") if p.is_dir()]]:
            d.chmod(0o755)
    assert res.returncode == 3, res.stdout + res.stderr
    line = [x for x in res.stdout.splitlines() if x.startswith("CNPError")]
    assert len(line) == 1 and "is not writable" in line[0] and "Traceback" not in res.stderr, res.stdout
    assert snapshot(run) == before


def test_full_disk_fails_clearly_and_keeps_the_finished_run(rel, reference, tmp_path, monkeypatch):
    """The disk fills up (ENOSPC from the write's fsync) while a finished run is redone with a
    changed parameter: one clear line, no partial or temporary file, the earlier metrics.json
    and checkpoints intact; with space again the run finishes, keeping the unaffected stages."""
    from cnp.pipeline import run_all

    run = tmp_path / RUN
    shutil.copytree(reference.dir, run)
    before = snapshot(run)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CNP_CACHE", str(rel.cache))
    real_fsync, calls = os.fsync, []

    def full_after_first(fd):  # params.json still fits, the first pruning checkpoint does not
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_after_first)
    with pytest.raises(CNPError, match=r"^the disk is full while writing .*prune_cnp.pt; nothing was overwritten"):
        run_all(**CPU, run_dir=RUN, target=0.6, verbose=False)
    monkeypatch.setattr(os, "fsync", real_fsync)
    after = snapshot(run)
    assert not list(run.rglob(".*.tmp"))
    assert {k: v for k, v in after.items() if k != "params.json"} == \
        {k: v for k, v in before.items() if k != "params.json"}
    run_all(**CPU, run_dir=RUN, target=0.6, verbose=False)
    final = snapshot(run)
    for stage in ("warmup", "augment", "ablate"):  # these do not depend on the target: kept
        assert final[f"{stage}/summary.json"] == before[f"{stage}/summary.json"]
    assert json.loads((run / "metrics.json").read_text())["params"]["target"] == 0.6


TMPFS_SCRIPT = r"""
set -e
mnt=$1; python=$3
mount -t tmpfs -o size=48m tmpfs "$mnt"
cp -a "$2" "$mnt/run"
shift 3
"$python" -c 'import os, sys
st = os.statvfs(sys.argv[1])
with open(os.path.join(sys.argv[1], "filler"), "wb") as fh:
    fh.write(bytes(st.f_bavail * st.f_frsize - 96 * 1024))' "$mnt"
cd "$mnt" && sha256sum run/metrics.json run/prune/*.pt > before.sha
set +e
"$@"
echo "EXIT $?"
sha256sum -c --quiet before.sha && echo "INTACT"
ls -a run/prune
"""


def test_real_full_disk_on_a_tiny_tmpfs(rel, reference, tmp_path):
    """The same on a real full file system (a tmpfs in a private mount namespace): the kernel's
    ENOSPC becomes one clear line and the finished run's files stay intact."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no unprivileged mount namespace for a tmpfs here")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = ["unshare", "-rm", "sh", "-c", TMPFS_SCRIPT, "sh", str(mnt), str(reference.dir), sys.executable,
           sys.executable, "-c", RUN_SCRIPT, json.dumps({**CPU, "run_dir": RUN, "target": 0.6})]
    res = subprocess.run(cmd, cwd=tmp_path, env=rel.env, capture_output=True, text=True, timeout=300)
    out = res.stdout
    assert "EXIT 3" in out and "INTACT" in out, out + res.stderr
    line = [x for x in out.splitlines() if x.startswith("CNPError")]
    assert len(line) == 1 and "the disk is full while writing" in line[0], out
    assert ".tmp" not in out.split("INTACT")[1]  # no temporary file left in run/prune


# ============================================================================ bad parameters
@pytest.mark.parametrize("overrides, pattern", [
    ({"stpe": 0.1}, r"unknown parameter 'stpe' \(did you mean 'step'\?\)"),
    ({"K": "four"}, r"parameter K='four' has the wrong type: expected int"),
    ({"target": "high"}, r"parameter target='high' has the wrong type: expected float"),
    ({"K": 3}, r"K \* d_k must equal D = 128 at conv4_3: K=3"),
    ({"K": 4, "d_k": 16}, r"unknown parameter 'd_k'"),
    ({"dataset": "imagenet", "imagenet_root": "/x", "K": 3}, r"K \* d_k must equal D = 512"),
    ({"layer": "conv5_1", "K": 3}, r"K \* d_k must equal D = 128 at conv5_1"),
    ({"methods": "cnp,prune_all"}, r"unknown method 'prune_all'; methods are cnp, vanilla, l1, random"),
    ({"target": 1.0}, r"target pruning rate must be in \(0, 1\), got 1.0"),
    ({"target": 0}, r"target pruning rate must be in \(0, 1\), got 0"),
    ({"target": -0.2}, r"target pruning rate must be in \(0, 1\)"),
    ({"layer": "fc6"}, r"layer must be a conv layer"),
    ({"subspace_method": "pca"}, r"subspace_method must be 'drsa', 'prca' or 'oracle', got 'pca'"),
])
def test_bad_parameter_is_one_line_before_any_work(tmp_path, overrides, pattern):
    from cnp.pipeline import make_params, run_all

    with pytest.raises(CNPError, match=pattern) as info:
        make_params(**overrides)
    assert "\n" not in str(info.value)
    with pytest.raises(CNPError, match=pattern):
        run_all(**CPU, run_dir=str(tmp_path / "r"), **overrides)
    assert not (tmp_path / "r").exists()  # nothing started
    make_params(K=8)  # K * d_k = D is fine


def test_imagenet_weights_missing_says_how_to_supply_them(tmp_path, monkeypatch):
    """The ImageNet path without weights stops at the start (before decoding any image) with
    where to download the file and how to pass it; it never downloads on its own."""
    from cnp.pipeline import run_all

    (tmp_path / "inet" / "train").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    kw = {"dataset": "imagenet", "imagenet_root": str(tmp_path / "inet"), **CPU,
          "run_dir": str(tmp_path / "r")}
    with pytest.raises(CNPError, match=r"none is cached at .*vgg16-397923af.pth.*pass weights_path=<file>"):
        run_all(**kw)
    with pytest.raises(CNPError, match=r"weights file .*nope.pth does not exist. Download https://download"):
        run_all(**kw, weights_path=str(tmp_path / "nope.pth"))
    with pytest.raises(CNPError, match=r"no train/ folder"):
        run_all(**{**kw, "imagenet_root": str(tmp_path)})
    assert not (tmp_path / "r").exists()


def test_sweep_command_line_bad_parameter_exit_code_2(rel, tmp_path, capsys):
    """The sweep command line: a bad name or value stops it before anything runs, exit code 2,
    one line on stderr, no traceback."""
    from cnp import sweep

    cmd = [sys.executable, "-m", "cnp.sweep", "--pairs", "carton-dugong", "--seeds", "0", "--out",
           str(tmp_path / "out"), "-p", "bad=1"]
    res = subprocess.run(cmd, cwd=REPO, env=rel.env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == ["error: -p 'bad=1': unknown parameter 'bad'"]
    for args, pattern in [(["-p", "K=3"], "K * d_k must equal D = 128"),
                          (["-p", "target=1.5"], "target pruning rate must be in (0, 1)"),
                          (["-p", "methods=cnp,foo"], "unknown method 'foo'"),
                          (["-p", "K=four"], "has the wrong type"),
                          (["-g", "K=4,6"], "K * d_k must equal D = 128 at conv4_3: K=6")]:
        assert sweep.main(["--pairs", "carton-dugong", "--seeds", "0", "--out", str(tmp_path / "out"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and pattern in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("parameters, pattern", [
    ({"K": 3}, r"K \* d_k must equal D = 128"),
    ({"stpe": 0.1}, r"unknown parameter 'stpe' \(did you mean 'step'\?\)"),
])
def test_notebook_bad_parameter_stops_in_the_first_cells(rel, tmp_path, monkeypatch, parameters, pattern):
    """A bad value or an unknown name injected by papermill stops notebook 01 in the cell right
    after the parameters, with a CNPError naming the problem (one line); nothing is written."""
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from cnp.sweep import KERNEL, NOTEBOOK_DIR, check_kernel

    check_kernel()
    for k, v in rel.env.items():
        if k.startswith(("CNP_", "OMP_", "PYTHON")):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("CNP_NETGUARD_LOOPBACK", "1")  # the kernel talks to papermill over localhost
    out = tmp_path / "01.ipynb"
    with pytest.raises(PapermillExecutionError) as info:
        papermill.execute_notebook(str(NOTEBOOK_DIR / "01_warmup.ipynb"), str(out), kernel_name=KERNEL,
                                   parameters={**parameters, "smoke": True, "run_dir": str(tmp_path / "r")},
                                   progress_bar=False, execution_timeout=300)
    assert info.value.ename == "CNPError" and re.search(pattern, info.value.evalue)
    assert "\n" not in info.value.evalue
    nb = nbformat.read(out, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tags = [c.metadata.get("tags", []) for c in code]
    failing = next(i for i, c in enumerate(code) if any(o.output_type == "error" for o in c.outputs))
    assert "parameters" in tags[failing - 2] and "injected-parameters" in tags[failing - 1]
    assert not (tmp_path / "r").exists()
    assert refused(rel.netlog) == []


def test_stage_keys_follow_the_parameters_each_stage_uses():
    """A stage's cache key changes with every parameter that stage (or an earlier one) uses and
    with no later-stage parameter: ``wm_share_images`` reaches the ablate stage (its shares, and
    K' for ablate='mask:<part>') and the prune stage, not the warm-up or DRSA (a changed count
    re-measures the warm-up's shares); the schedule's ``step`` only reaches prune and evaluate;
    the ablated set's parameters only ablate and later; ``heatmap_images`` and ``methods`` none."""
    from cnp.params import FIELDS
    from cnp.pipeline import _stage_key, make_params

    base = make_params(pair="carton-dugong", seed=0, smoke=True)
    later = {
        "wm_share_images": (base.report.wm_share_images + 1, ("ablate", "prune", "evaluate")),
        "step": (0.2, ("prune", "evaluate")),
        "rr_lambda": (3.0, ("prune", "evaluate")),
        "recompute_drsa": (True, ("prune", "evaluate")),
        "ap_threshold": (0.5, ("ablate", "prune", "evaluate")),
        "drsa_steps": (7, ("augment", "ablate", "prune", "evaluate")),
        "warmup_epochs": (3, STAGES_ALL),
        "wm_text": ("SAMPLE", STAGES_ALL),
        "seed": (1, STAGES_ALL),
        "heatmap_images": (5, ()),
        "methods": ("cnp", ()),
        "threads": (1, ()),
    }
    for name, (value, stages) in later.items():
        other = make_params(**{"pair": "carton-dugong", "seed": 0, "smoke": True, name: value})
        for stage in STAGES_ALL:
            assert (_stage_key(other, stage) != _stage_key(base, stage)) == (stage in stages), (name, stage)
    # every numeric or boolean parameter but the threads reaches the evaluate key
    flat = base.to_dict()
    for name in FIELDS:
        value = flat[name]
        alt = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v / 2}.get(type(value))
        if alt is None or name in ("threads", "heatmap_images", "allow_download"):
            continue
        try:
            changed = base.replace(**{name: alt(value)})
        except Exception:  # noqa: BLE001 - a value the validation refuses (e.g. K=9)
            continue
        assert _stage_key(changed, "evaluate") != _stage_key(base, "evaluate"), name


STAGES_ALL = ("warmup", "augment", "ablate", "prune", "evaluate")


def test_a_changed_share_count_remeasures_the_warmup_without_retraining(tmp_path):
    """wm_share_images is a measurement size: changing it re-measures the warm-up's shares on the
    saved model (same model file), keeps DRSA, and re-runs the ablate stage (keyed on it)."""
    from cnp.pipeline import open_run, run_ablate, run_warmup

    kw = dict(CPU, run_dir=str(tmp_path / "r"))
    run = open_run(**kw)
    first = run_ablate(run, verbose=False)
    warm = json.loads((tmp_path / "r" / "warmup" / "summary.json").read_text())
    aug = (tmp_path / "r" / "augment" / "summary.json").read_bytes()
    model = (tmp_path / "r" / "warmup" / "model.pt").stat().st_mtime_ns
    run2 = open_run(**kw, wm_share_images=run.params.report.wm_share_images + 5)
    w2 = run_warmup(run2, verbose=False)
    assert w2["wm_share_images"] == warm["wm_share_images"] + 5
    assert w2["acc"] == warm["acc"] and w2["loss_history"] == warm["loss_history"]
    assert (tmp_path / "r" / "warmup" / "model.pt").stat().st_mtime_ns == model   # not retrained
    run_ablate(run2, verbose=False)
    assert (tmp_path / "r" / "augment" / "summary.json").read_bytes() == aug       # DRSA kept
    second = json.loads((tmp_path / "r" / "ablate" / "summary.json").read_text())
    assert second["key"] != first["key"]
