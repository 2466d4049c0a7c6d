"""Running a sweep's jobs: papermill per notebook, the stall watchdog, local and cluster executors."""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cnp.io import CNPError, recipe_hash
from cnp.params import BENCHMARK_DEFAULTS
from cnp.sweep.planning import Job, job_status
from cnp.sweep.presets import KERNEL, NOTEBOOK_DIR, RUN_NOTEBOOKS

# ============================================================================ execution
_PARAM_CACHE: dict[str, set[str]] = {}


def notebook_parameter_names(path: Path) -> set[str]:
    """Names assigned at the top level of a notebook's cell tagged ``parameters``."""
    import nbformat

    key = str(path)
    if key not in _PARAM_CACHE:
        nb = nbformat.read(str(path), as_version=4)
        cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
        if len(cells) != 1:
            raise CNPError(f"{path} must have exactly one code cell tagged 'parameters', found {len(cells)}")
        names = set()
        for node in ast.parse(cells[0].source).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        _PARAM_CACHE[key] = names
    return set(_PARAM_CACHE[key])


def injected_parameters(path: Path, values: Mapping[str, Any]) -> dict[str, Any]:
    """Values for a notebook: the names its parameters cell declares directly, the rest in
    ``extra`` (when the notebook declares ``extra``)."""
    declared = notebook_parameter_names(path)
    direct = {k: v for k, v in values.items() if k in declared}
    rest = {k: v for k, v in values.items() if k not in declared}
    if rest:
        if "extra" not in declared:
            raise CNPError(f"{path.name} has no 'extra' parameter for {sorted(rest)}")
        direct["extra"] = rest
    return direct


def check_kernel(kernel: str = KERNEL) -> None:
    """Raise CNPError with the fix when the Jupyter kernel is not installed."""
    from jupyter_client.kernelspec import KernelSpecManager

    if kernel not in KernelSpecManager().find_kernel_specs():
        raise CNPError(f"the Jupyter kernel {kernel!r} is not installed; run `make .venv` or "
                       f"`python -m ipykernel install --sys-prefix --name {kernel}`")


def _set_thread_env(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CNP_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("CNP_PROGRESS", "0")
    os.environ.setdefault("CNP_STATIC_WIDGETS", "1")   # no frontend; see cnp.widgets.static_widgets


def _error_line(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        return f"{ename}: {evalue}".strip().splitlines()[0]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


#: Seconds a notebook kernel may use (almost) no CPU while papermill waits on a cell before the
#: sweep calls it hung (``$CNP_KERNEL_STALL_S``; 0 disables the watchdog). Seen here three times
#: (ipykernel 7.4 once, 6.31 twice, the latter at 03's ablation widget, jupyter/nbclient#312): the
#: cell finished but papermill never got its reply; the kernel sat idle (0 CPU ticks in 20 s) and the
#: sweep waited forever. Sweep runs now show widgets statically (cnp.widgets.static_widgets); this
#: is the backstop. Every cell of notebooks 01-05 computes, so 15 minutes without CPU is no slow cell.
KERNEL_STALL_S = 900.0
STALL_CPU_FRACTION = 0.01   # "almost no CPU": under 1 % of one core over the whole window


class KernelStalled(CNPError):
    """A notebook's kernel sat idle while its cell never returned; the watchdog killed it."""


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (Linux ``/proc/<pid>/task/*/children``; empty elsewhere).
    Also used by ``bench/peak_memory.py``."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _cpu_ticks(pids: Sequence[int]) -> int:
    """User + system CPU time of ``pids`` in clock ticks (processes that are gone count 0)."""
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])   # utime, stime (fields 14 and 15 of stat)
    return total


class _StallWatchdog:
    """Kill this process's children (the notebook kernel) when, for ``stall_s`` seconds, the same
    children used less than STALL_CPU_FRACTION of a core. ``fired`` says whether it did."""

    def __init__(self, stall_s: float, poll_s: float | None = None):
        import threading

        self.stall_s, self.poll_s = stall_s, poll_s or max(0.2, min(30.0, stall_s / 4))
        self.fired, self._stop = False, threading.Event()
        self._thread = threading.Thread(target=self._watch, name="cnp-kernel-watchdog", daemon=True)

    def __enter__(self):
        if self.stall_s > 0 and Path("/proc/self/task").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        since, kids, ticks = time.monotonic(), None, 0
        while not self._stop.wait(self.poll_s):
            now_kids = sorted(descendants(os.getpid()))
            now_ticks = _cpu_ticks(now_kids)
            if now_kids != kids or now_ticks - ticks > STALL_CPU_FRACTION * tick * (time.monotonic() - since):
                since, kids, ticks = time.monotonic(), now_kids, now_ticks     # activity: restart the window
            elif now_kids and time.monotonic() - since >= self.stall_s:
                for p in now_kids:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except OSError:
                        pass
                self.fired = True
                return


class _RunParametersFilter:
    """Drops papermill's "Passed unknown parameter" warning: a run passes every run parameter
    to each notebook on purpose (``cnp.pipeline.notebook_params(globals())`` reads them all, also those its
    parameters cell does not list), so the warning says nothing wrong."""

    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith("Passed unknown parameter")


_PARAMETERS_FILTER = _RunParametersFilter()


def execute(src: Path, dst: Path, parameters: Mapping[str, Any], kernel: str = KERNEL,
            cwd: Path | None = None, stall_s: float | None = None, shared: RunKernel | None = None) -> None:
    """Execute one notebook with papermill (raises on a failing cell; ``dst`` keeps the error).

    A watchdog kills the kernel when it sits without CPU for ``stall_s`` seconds (default
    ``$CNP_KERNEL_STALL_S``, else KERNEL_STALL_S) and :class:`KernelStalled` is raised instead of
    waiting forever. With ``shared`` (a :class:`RunKernel`) the notebook runs in that kernel,
    whose namespace is cleared first; without it, papermill starts a kernel for this notebook.
    """
    import logging

    import papermill

    log = logging.getLogger("papermill")
    if _PARAMETERS_FILTER not in log.filters:
        log.addFilter(_PARAMETERS_FILTER)
    if stall_s is None:
        stall_s = float(os.environ.get("CNP_KERNEL_STALL_S", KERNEL_STALL_S))
    dst.parent.mkdir(parents=True, exist_ok=True)
    engine = {}
    if shared is not None:
        engine = {"engine_name": _SHARED_ENGINE, "km": shared.ready()}
        _register_shared_engine()
    with _StallWatchdog(stall_s) as dog:
        try:
            papermill.execute_notebook(str(src), str(dst), parameters=dict(parameters), kernel_name=kernel,
                                       progress_bar=False, log_output=False, cwd=str(cwd) if cwd else None,
                                       **engine)
        except Exception as exc:
            if dog.fired:
                raise KernelStalled(f"the kernel of {src.name} used no CPU for {stall_s:.0f} s while a cell "
                                    "was running (its reply was lost); the watchdog killed it") from exc
            raise


# ============================================================================ one kernel per run
#: Runs in a shared kernel before each notebook but the first: what a fresh kernel would give
#: (an empty namespace, execution counts from 1, no open figures), with the imported modules kept.
_RESET_CODE = """\
def _cnp_fresh_namespace():
    import gc, sys
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
    get_ipython().reset(new_session=True)
    gc.collect()
_cnp_fresh_namespace()
"""

_SHARED_ENGINE = "cnp-shared-kernel"
_shared_engine_registered = False


class RunKernel:
    """One Jupyter kernel for the notebooks of one run, started on first use.

    A fresh kernel per notebook spends its first seconds importing torch, zennit, torchvision and
    matplotlib (about 6 s of CPU on a 2-core machine; five notebooks per run). A run's notebooks
    share one kernel instead: before each notebook but the first, :meth:`ready` clears the
    namespace (IPython's ``reset(new_session=True)``), so a notebook sees only its own variables,
    and numbering starts at 1 as in a fresh kernel; the modules stay imported. Every stage seeds
    its own generators and reads its inputs from the run directory, so the results are the same
    as with a kernel per notebook (tested: identical ``metrics.json``). A kernel that died (the
    stall watchdog kills it), or one that cannot be cleared, is replaced by a fresh one.
    ``python -m cnp.sweep --kernel-per-notebook`` keeps papermill's default instead.
    """

    def __init__(self, kernel: str = KERNEL, cwd: Path | None = None, startup_timeout: float = 120.0):
        self.kernel, self.cwd, self.startup_timeout = kernel, cwd, startup_timeout
        self.km = None
        self.used = False   # has a notebook run in the current kernel
        self.starts = 0
        self.reset_failures: list[str] = []   # resets that failed (each replaced the kernel)

    def ready(self):
        """The kernel manager of a live kernel with an empty namespace."""
        from jupyter_client.manager import AsyncKernelManager
        from jupyter_core.utils import run_sync

        if self.km is not None and not run_sync(self.km.is_alive)():
            self.close()
        if self.km is not None and self.used:
            try:
                self._reset()
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot be cleared is replaced
                self.reset_failures.append(_error_line(exc))
                self.close()
        if self.km is None:
            km = AsyncKernelManager(kernel_name=self.kernel)
            run_sync(km.start_kernel)(cwd=str(self.cwd) if self.cwd else None)
            self.km, self.starts = km, self.starts + 1
        self.used = True
        return self.km

    def _reset(self) -> None:
        """Clear the namespace; raises when the kernel does not answer within ``startup_timeout``
        or the reset fails (:meth:`ready` then starts a fresh kernel, which gives the same state)."""
        kc = self.km.blocking_client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=self.startup_timeout)
            reply = kc.execute_interactive(_RESET_CODE, silent=True, store_history=False,
                                           timeout=self.startup_timeout)
        finally:
            kc.stop_channels()
        content = reply["content"]
        if content.get("status") != "ok":
            raise CNPError(f"could not clear the shared notebook kernel: "
                           f"{content.get('ename', '')}: {content.get('evalue', '')}")

    def close(self) -> None:
        """Shut the kernel down (no-op when none runs)."""
        from jupyter_core.utils import run_sync

        km, self.km = self.km, None
        if km is None:
            return
        try:
            run_sync(km.shutdown_kernel)(now=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        run_sync(km.cleanup_resources)()

    def __enter__(self) -> RunKernel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _register_shared_engine() -> None:
    """papermill engine that executes in a kernel it is given (``km=``) and leaves it running,
    closing its own client's channels afterwards (papermill's default engine would keep them,
    and one client per notebook, open until the process ends)."""
    global _shared_engine_registered
    if _shared_engine_registered:
        return
    import atexit

    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine, papermill_engines
    from papermill.utils import merge_kwargs, remove_args

    class SharedKernelEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None,
                                     stderr_file=None, start_timeout=60, execution_timeout=None, **kwargs):
            import logging

            kwargs = remove_args(["input_path", "timeout", "startup_timeout"], **kwargs)
            final = merge_kwargs(kwargs, timeout=execution_timeout, startup_timeout=start_timeout,
                                 kernel_name=kernel_name, log=logging.getLogger("papermill"),
                                 log_output=log_output, stdout_file=stdout_file, stderr_file=stderr_file)
            client = PapermillNotebookClient(nb_man, **final)
            try:
                return client.execute()
            finally:
                atexit.unregister(client._cleanup_kernel)
                if client.kc is not None:
                    client.kc.stop_channels()
                    client.kc = None

    papermill_engines.register(_SHARED_ENGINE, SharedKernelEngine)
    _shared_engine_registered = True


def _new_reset_failures(shared: RunKernel | None, reported: list[int]) -> list[str]:
    """The shared kernel's reset failures not yet printed (``reported[0]`` counts those that are)."""
    if shared is None:
        return []
    new = shared.reset_failures[reported[0]:]
    reported[0] = len(shared.reset_failures)
    return new


def run_job(job: Job, threads: int = 1, kernel: str = KERNEL, notebooks: str | Path = NOTEBOOK_DIR,
            force: bool = False, status: tuple[str, str] | None = None,
            kernel_per_notebook: bool = False) -> dict[str, Any]:
    """Run notebooks 01-05 for one job (skipped when already done). Never raises: failures are
    returned (``status='failed'``, ``error`` = the error's one line, ``notebook`` = where it is).

    ``status`` is :func:`job_status` computed by the caller; the local pool passes it so that its
    worker processes never import torch (they only drive papermill: ~0.3 GB less each). The
    notebooks share one kernel (:class:`RunKernel`) unless ``kernel_per_notebook``.
    """
    t0 = time.perf_counter()
    res = {"label": job.label, "pair": job.pair, "seed": job.seed, "variant": job.variant,
           "run_dir": job.run_dir, "status": "", "seconds": 0.0, "error": "", "notebook": ""}
    try:
        status, why = job_status(job) if status is None else status
        if status == "done" and not force:
            return {**res, "status": "skipped"}
        _set_thread_env(threads)
        run_dir = Path(job.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        values = {"smoke": False, **job.all_params(), "threads": threads}
        values["run_dir"] = str(run_dir.resolve())
        print(f"[sweep] {job.label} seed {job.seed}: start ({why or status}) -> {run_dir}", flush=True)
        with contextlib.nullcontext() if kernel_per_notebook else RunKernel(kernel, cwd=run_dir) as shared:
            reported = [0]   # how many of the shared kernel's reset failures are printed
            for name in RUN_NOTEBOOKS:
                src = Path(notebooks) / name
                dst = run_dir / name
                t1 = time.perf_counter()
                run = dict(kernel=kernel, cwd=run_dir, shared=shared)
                try:
                    try:
                        execute(src, dst, injected_parameters(src, values), **run)
                    except KernelStalled as exc:   # once: the stages it finished are reused
                        print(f"[sweep] {job.label} seed {job.seed}: {exc}; running {name} again", flush=True)
                        execute(src, dst, injected_parameters(src, values), **run)
                except Exception as exc:  # noqa: BLE001 - any failure of a run is reported, not raised
                    line = _error_line(exc)
                    print(f"[sweep] {job.label} seed {job.seed}: FAILED in {name}: {line}", flush=True)
                    return {**res, "status": "failed", "error": line, "notebook": str(dst),
                            "seconds": time.perf_counter() - t0}
                for line in _new_reset_failures(shared, reported):
                    print(f"[sweep] {job.label} seed {job.seed}: the shared kernel could not be cleared "
                          f"before {name} ({line}); it ran in a fresh kernel", flush=True)
                print(f"[sweep] {job.label} seed {job.seed}: {name} done ({time.perf_counter() - t1:.0f} s)",
                      flush=True)
        if not (run_dir / "metrics.json").exists():
            return {**res, "status": "failed", "error": "05_evaluate finished without writing metrics.json",
                    "notebook": str(run_dir / RUN_NOTEBOOKS[-1]), "seconds": time.perf_counter() - t0}
        return {**res, "status": "done", "seconds": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001
        return {**res, "status": "failed", "error": _error_line(exc), "seconds": time.perf_counter() - t0}


#: CPUs (and torch threads) per cluster job unless --cpus-per-task says otherwise: a fixed number,
#: so that a job's thread count never depends on the cores of the machine that submits it
CLUSTER_CPUS = 4


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def run_local(jobs: Sequence[Job], workers: int, threads: int, kernel: str, notebooks: Path,
              force: bool = False, kernel_per_notebook: bool = False) -> list[dict]:
    """Run jobs here: in this process (one worker) or in a process pool, with a progress bar
    over the runs (the per-notebook lines still go to the log)."""
    from cnp.runtime import progress

    bar = progress(total=len(jobs), desc="runs", unit="run", leave=True)
    if workers <= 1 or len(jobs) <= 1:
        out = []
        for j in jobs:
            out.append(run_job(j, threads, kernel, notebooks, force, kernel_per_notebook=kernel_per_notebook))
            bar.update(1)
        bar.close()
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    results: dict[int, dict] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_die_with_parent) as pool:
        futures = {pool.submit(run_job, j, threads, kernel, notebooks, force, job_status(j),
                               kernel_per_notebook): i
                   for i, j in enumerate(jobs)}
        for fut in as_completed(futures):
            bar.update(1)
            i = futures[fut]
            try:
                results[i] = fut.result()
            except Exception as exc:  # noqa: BLE001 - a worker process died
                j = jobs[i]
                results[i] = {"label": j.label, "pair": j.pair, "seed": j.seed, "variant": j.variant,
                              "run_dir": j.run_dir, "status": "failed", "seconds": 0.0,
                              "error": _error_line(exc), "notebook": ""}
    bar.close()
    return [results[i] for i in range(len(jobs))]


def run_submitit(jobs: Sequence[Job], args: argparse.Namespace, threads: int, kernel: str,
                 notebooks: Path) -> list[dict]:
    """Send one job per run through submitit's AutoExecutor and wait for them."""
    try:
        import submitit
    except ImportError:
        raise CNPError("--executor submitit needs the optional dependency submitit: "
                       "pip install -e '.[cluster]'") from None
    folder = Path(args.out) / ".submitit"
    ex = submitit.AutoExecutor(folder=str(folder), cluster=args.cluster)
    ex.update_parameters(name="cnp-sweep", timeout_min=args.timeout_min, cpus_per_task=threads,
                         gpus_per_node=args.gpus_per_node, mem_gb=args.mem_gb,
                         slurm_array_parallelism=max(1, args.workers),
                         **({"slurm_partition": args.partition} if args.partition else {}))
    n = len(jobs)
    per_nb = bool(getattr(args, "kernel_per_notebook", False))
    sub = ex.map_array(run_job, list(jobs), [threads] * n, [kernel] * n, [str(notebooks)] * n,
                       [args.force] * n, [None] * n, [per_nb] * n)
    print(f"[sweep] submitted {n} job(s) via submitit ({ex.cluster}); logs in {folder}", flush=True)
    results = []
    for j, s in zip(jobs, sub):
        try:
            results.append(s.result())
        except Exception as exc:  # noqa: BLE001 - the job itself crashed (timeout, node failure)
            results.append({"label": j.label, "pair": j.pair, "seed": j.seed, "variant": j.variant,
                            "run_dir": j.run_dir, "status": "failed", "seconds": 0.0,
                            "error": _error_line(exc), "notebook": str(folder)})
    return results



def prepare_shared(jobs: Sequence[Job], verbose: bool = True) -> None:
    """Build what the runs share (the embedded backbone) once, before the workers start
    (otherwise each worker would pretrain the same backbone at the same time). Pretraining pins its
    own thread count (:data:`cnp.pretrain.PRETRAIN_THREADS`)."""
    from cnp.pipeline import backbone_config, make_params
    from cnp.pretrain import PRETRAIN_THREADS, backbone_path, load_backbone

    seen: set[str] = set()
    for j in jobs:
        try:
            p = make_params(**{**BENCHMARK_DEFAULTS, **j.overrides, "pair": j.pair, "seed": j.seed})
        except CNPError:
            continue
        if p.data.dataset != "synthetic":
            continue
        cfg = backbone_config(p)
        key = recipe_hash(cfg.recipe())
        if key in seen:
            continue
        seen.add(key)
        if verbose and not backbone_path(cfg).exists():
            print(f"[sweep] pretraining the shared backbone once ({PRETRAIN_THREADS} threads)", flush=True)
        load_backbone(cfg, verbose=verbose)


def _die_with_parent() -> None:
    """Worker initializer: the worker is killed when the sweep process dies (Linux
    ``PR_SET_PDEATHSIG``), so a sweep killed by SIGTERM or SIGKILL leaves no orphaned worker
    writing into the run directories while a restarted sweep works there; the notebook kernels
    of a dead worker stop by themselves (ipykernel polls its parent). Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


