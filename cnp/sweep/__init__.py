"""Sweeps: run notebooks 01-05 per (pair, seed) with papermill, then 06 over everything.

Usage
-----
::

    python -m cnp.sweep --pairs carton-dugong crate-packet --seeds 0 1 2 \\
        [-p name=value ...] [-g name=v1,v2 ...] [--workers N] [--out DIR] [--figures DIR] \\
        [--preset NAME] [--executor local|submitit] [--dry-run]

* Every run executes ``notebooks/01_warmup`` ... ``05_evaluate`` with papermill (kernel
  ``cnp``; the checkout's ``notebooks/``, or the installed package's copies, see
  :mod:`cnp.resources`; ``--notebooks DIR`` runs others, e.g. edited copies from
  ``cnp-notebooks DIR``); the values are injected into the cell tagged ``parameters`` and the executed
  notebooks are saved in the run directory ``DIR/<pair>/seed<k>/`` (with a grid:
  ``DIR/<pair>/<variant>/seed<k>/``, the variant naming the grid values). Then
  ``06_figures`` runs over everything in ``DIR`` and writes the figures (``--figures``,
  default ``DIR/figures``); its executed copy is ``DIR/06_figures.ipynb``. A run's five
  notebooks share one kernel, its namespace cleared before each (:class:`RunKernel`; the torch
  and zennit imports are paid once per run, not five times); ``--kernel-per-notebook`` starts
  a fresh kernel for each instead, with the same results.
* ``-p name=value`` sets any :class:`cnp.pipeline.Params` field for every run (values are
  parsed as JSON / Python literals, else kept as strings: ``-p step=0.1 -p smoke=1
  -p methods=cnp,vanilla,l1``). An unknown name or a bad value (wrong type, K * d_k != D, ...)
  stops the sweep before it starts, with one line and exit code 2.
* ``-g name=v1,v2`` adds a grid axis (``-g K=4,8,16``): the runs are the product of all axes.
* Resumable: a run whose ``metrics.json`` exists for the same parameters (everything except
  ``run_dir``, ``device`` and ``threads``) is skipped; an interrupted run resumes stage by stage
  (each stage of :mod:`cnp.pipeline` skips itself when its outputs exist for the same
  parameters). Kill the sweep at any time and start the same command again.
* A failing run keeps its executed notebook, with the error in it, and the other runs go on.
  The end prints a summary table (per run and method: overall and c0w1 accuracy at the target
  rate, time) and the failures; the exit code is 1 if any run (or 06) failed.
* ``--workers N`` runs N runs at once in separate processes (``concurrent.futures``); each
  run uses ``threads = cores // N`` torch threads (``--threads`` or ``$CNP_THREADS`` override
  it: on a machine whose cores are shared with other work, 1 thread per run avoids the heavy
  slow-down of oversubscribed OpenMP threads).

Presets (``--preset``; ``--pairs``, ``--seeds``, ``-p`` and ``-g`` given on the command line win):

``reproduce``   the default sweep of ``make reproduce``: carton-dugong (easy), crate-packet
                (hard), basketball (Figure 1 demo), seeds and budget settings in
                :data:`REPRODUCE_PARAMS` (reduced from the full fidelity to fit 15 minutes on
                2 cores; the reasons are beside it).
``full``        the full-fidelity settings (the ``Params`` defaults), 5 seeds, with the l1 and
                random baselines.
``styles``      claim 6: held-out watermark styles and mean ablation, one axis at a time.
``control``     the no-shortcut control of the easy pair (the watermark equally frequent in
                both classes), the reference for claims 3 and 4; run it into the reproduce
                directory and ``cnp.claims`` reports it in its own row::

                    python -m cnp.sweep --preset control --out runs/reproduce

``evidence``    the claims as statistical tests (``cnp.claims``): the easy pair on 10 seeds, the
                hard pair on 5 and the no-shortcut control on 5 at the ``reproduce`` settings
                (``DIR/reproduce``), Yeom et al.'s ranking rule and a frozen conv4_3 on 5 seeds
                each (``DIR/variants``), the easy pair on 5 seeds at full fidelity (``DIR/full``) and
                the held-out styles on 5 seeds each (``DIR/styles``); figures per part in
                ``--figures``/<part>.
``smoke``       one tiny run (``smoke=True``): checks the machinery in about a minute.
``table1``      the paper's Table 1 search space as a full grid: K in 4, 8, 16 (``d_k = D / K``,
                so ``K * d_k = D``), LRP variant epsilon / alpha1beta0 / gamma, fine-tuning
                epochs per step 0, 2, 5, 10, ranking data pos / pos+neg, step 0.05 / 0.1
                (144 configurations per pair and seed: hours on a GPU)::

                    python -m cnp.sweep --preset table1 --out runs/table1 --figures figures/table1

``table1-oat``  the same values one at a time around the selected ones (10 configurations).

The cluster path: ``--executor submitit`` sends one job per run through submitit (optional
dependency: ``pip install -e '.[cluster]'``), then runs 06 locally::

    python -m cnp.sweep --preset reproduce --executor submitit --cluster slurm \\
        --partition gpu --gpus-per-node 1 --cpus-per-task 8 --timeout-min 240 --workers 16

``--cluster slurm`` submits a SLURM job array (``--workers`` = array parallelism),
``--cluster local`` runs the jobs as local processes through submitit's LocalExecutor (it starts
them all at once), ``--cluster debug`` runs them in this process. Logs go to ``DIR/.submitit``.

The notebooks' parameter cells resolve defaults with :func:`cnp.pipeline.notebook_params`.

Modules: :mod:`cnp.sweep.presets` (the named sweeps), :mod:`cnp.sweep.planning` (the notebooks'
parameters, jobs, the resume check), :mod:`cnp.sweep.runner` (papermill, the stall watchdog, the
local and cluster executors) and :mod:`cnp.sweep.cli` (``python -m cnp.sweep``); their public
names are importable from ``cnp.sweep`` as well.
"""

from __future__ import annotations

from cnp.resources import default_figures_dir, default_run_dir, default_runs_root  # noqa: F401
from cnp.sweep.cli import (  # noqa: F401
    build_parser,
    format_table,
    list_params,
    main,
    plan_preset,
    summary_rows,
)
from cnp.sweep.planning import (  # noqa: F401
    Job,
    check_overrides,
    expand_grid,
    expected_key,
    job_status,
    params_key,
    parse_assignments,
    parse_grid,
    parse_value,
    plan,
    resolved_params,
    variant_name,
)
from cnp.sweep.presets import (  # noqa: F401
    CONTROL_GRID,
    EVIDENCE_PARTS,
    EVIDENCE_SEEDS,
    FIGURES_NOTEBOOK,
    FULL_PARAMS,
    FULL_SEEDS,
    KERNEL,
    NOTEBOOK_DIR,
    PRESETS,
    REPO_ROOT,
    REPRODUCE_PAIR_PARAMS,
    REPRODUCE_PAIR_SEEDS,
    REPRODUCE_PARAMS,
    REPRODUCE_SEEDS,
    RESULT_INDEPENDENT,
    RUN_NOTEBOOKS,
    SHORT_NAMES,
    STYLES_GRID,
    STYLES_SELECTED,
    TABLE1_GRID,
    TABLE1_SELECTED,
    VARIANTS_GRID,
    VARIANTS_SELECTED,
)
from cnp.sweep.runner import (  # noqa: F401
    CLUSTER_CPUS,
    KERNEL_STALL_S,
    STALL_CPU_FRACTION,
    KernelStalled,
    RunKernel,
    _set_thread_env,
    available_cores,
    check_kernel,
    descendants,
    execute,
    injected_parameters,
    notebook_parameter_names,
    prepare_shared,
    run_job,
    run_local,
    run_submitit,
)

__all__ = ["CLUSTER_CPUS", "CONTROL_GRID", "EVIDENCE_PARTS", "EVIDENCE_SEEDS", "FIGURES_NOTEBOOK", "FULL_PARAMS", "FULL_SEEDS", "Job", "KERNEL", "KERNEL_STALL_S", "KernelStalled", "NOTEBOOK_DIR", "PRESETS", "REPO_ROOT", "REPRODUCE_PAIR_PARAMS", "REPRODUCE_PAIR_SEEDS", "REPRODUCE_PARAMS", "REPRODUCE_SEEDS", "RESULT_INDEPENDENT", "RUN_NOTEBOOKS", "RunKernel", "SHORT_NAMES", "STALL_CPU_FRACTION", "STYLES_GRID", "STYLES_SELECTED", "TABLE1_GRID", "TABLE1_SELECTED", "VARIANTS_GRID", "VARIANTS_SELECTED", "available_cores", "build_parser", "check_kernel", "check_overrides", "default_figures_dir", "default_run_dir", "default_runs_root", "descendants", "execute", "expand_grid", "expected_key", "format_table", "injected_parameters", "job_status", "list_params", "main", "notebook_parameter_names", "params_key", "parse_assignments", "parse_grid", "parse_value", "plan", "plan_preset", "prepare_shared", "resolved_params", "run_job", "run_local", "run_submitit", "summary_rows", "variant_name"]
