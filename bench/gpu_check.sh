#!/usr/bin/env bash
# One prepared GPU check of the performance targets (about 6 minutes, at most ~8, on one H100/H200).
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --tiny     # the same steps at tiny sizes on the CPU (a test of this script)
#
# Runs, each under its own time limit and within one overall deadline:
#   1. the 80 %-pruned VGG-16 against the unpruned one (batch 8 and 64, fp32 and bf16)
#   2. LRP ranking throughput, cnp vs zennit's own attribution (full VGG-16, 224 px, batch 64)
#   3. one full paper run of the pruning schedule per method (cnp, vanilla)
#   4. DRSA at the paper's size (D=512 N=10000 K=4, 5000 steps, 3 restarts) vs the reference
#   5. the latency of cnp-keep's deployed correction (the pruned network with and without it)
# and prints one table (bench/summarize.py). Results go to $OUT when it is set (the device
# tool's output folder), else to bench/results/gpu-<date> (--tiny: a temporary folder).
#
# The GPU image lacks zennit and torch-pruning: carry their wheels. Once, here (the folder is
# git-ignored):
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl zennit==0.5.1 torch-pruning==1.6.1
# then call the device tool with carry [".whl"] and the command `bash bench/gpu_check.sh`.
set -u
cd "$(dirname "$0")/.."

TINY=0
if [[ "${1:-}" == "--tiny" || "${CNP_BENCH_TINY:-0}" == "1" ]]; then TINY=1; fi
STAMP=$(date +%Y-%m-%d)
if [[ -n "${OUT:-}" ]]; then
  RES="$OUT"
elif [[ $TINY == 1 ]]; then
  RES=$(mktemp -d /tmp/gpu_check_tiny.XXXXXX)
else
  RES="bench/results/gpu-$STAMP"
fi
mkdir -p "$RES"
LOG="$RES/gpu_check.log"
export PYTHONUNBUFFERED=1 CNP_PROGRESS=0

# --- Python: the image's python3 (it holds torch), else this checkout's virtualenv
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if python3 -c "import torch" >/dev/null 2>&1; then PY=python3; else PY=.venv/bin/python; fi
fi
# --- install what is missing from carried wheels
if ! "$PY" -c "import zennit, torch_pruning" >/dev/null 2>&1; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "zennit or torch-pruning is missing and no wheels were carried (.whl/); see the header of $0"; exit 1
  fi
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

if [[ $TINY == 1 ]]; then
  DEV=cpu; export OMP_NUM_THREADS=1; THREADS="--threads 1"
else
  DEV=cuda; THREADS=""
fi
START=$(date +%s)
DEADLINE=$((START + ${CNP_GPU_CHECK_BUDGET_S:-470}))

# run NAME LIMIT_S CMD...: run a step under min(LIMIT_S, time left), log it, never abort the script
run() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - $(date +%s)))
  if (( left < 15 )); then echo "=== $name: skipped (overall deadline reached)" | tee -a "$LOG"; return; fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}

{
  echo "gpu_check $STAMP tiny=$TINY python=$PY"
  "$PY" -c "import torch, os; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', 'cores', os.cpu_count(), 'load', os.getloadavg())"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv
} 2>&1 | tee -a "$LOG"

if [[ $TINY == 1 ]]; then
  run pruned_speed 120 "$PY" bench/bench_pruned_speed.py --device $DEV --quick $THREADS --out "$RES/pruned_speed.json"
  run lrp 120 "$PY" bench/bench_lrp.py --device $DEV --model reduced --batch 4 --repeats 2 --warmup 1 $THREADS --out "$RES/lrp.json"
  run full_run 120 "$PY" bench/bench_full_run.py --preset quick --device $DEV $THREADS --out "$RES/full_run.json"
  run drsa 120 "$PY" bench/bench_drsa.py --device $DEV --D 64 --N 1000 --steps 20 --restarts 2 $THREADS --out "$RES/drsa.json"
  run kept 60 "$PY" bench/bench_kept_ablation.py --device $DEV --quick $THREADS --out "$RES/kept_ablation.json"
else
  run pruned_speed 45 "$PY" bench/bench_pruned_speed.py --device $DEV --batch 8 64 --bf16 --repeats 30 --warmup 5 --out "$RES/pruned_speed.json"
  run lrp 60 "$PY" bench/bench_lrp.py --device $DEV --model full --batch 64 --repeats 8 --warmup 2 --out "$RES/lrp.json"
  run full_run 240 "$PY" bench/bench_full_run.py --preset paper --device $DEV --out "$RES/full_run.json"
  run drsa 150 "$PY" bench/bench_drsa.py --device $DEV --out "$RES/drsa.json"
  run kept 30 "$PY" bench/bench_kept_ablation.py --device $DEV --repeats 30 --out "$RES/kept_ablation.json"
fi

echo "=== summary (total $(( $(date +%s) - START )) s)" | tee -a "$LOG"
"$PY" bench/summarize.py "$RES" --md "$RES/summary.md" --json "$RES/summary.json" \
  --title "GPU check ($STAMP$([[ $TINY == 1 ]] && echo ', --tiny on the CPU'))" 2>&1 | tee -a "$LOG"
echo "results in $RES"
