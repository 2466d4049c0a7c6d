#!/usr/bin/env bash
# The CPU benchmarks, and one table of their figures next to the targets.
#
#   bash bench/run_cpu.sh                 # about 10 minutes on 2 cores
#   bash bench/run_cpu.sh --embedded      # + CNP and vanilla runs of the embedded default (reduced VGG-16, 48 px)
#   THREADS=1 bash bench/run_cpu.sh       # torch threads (default 2, what the CPU targets assume)
#
# Writes bench/results/cpu-<date>/*.json, bench/results/cpu-<date>.md (machine: CPU model,
# cores, torch, load average before and after; the load matters: the figures are
# latencies on a machine that may be shared) and the log bench/results/cpu-<date>/run.log.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
THREADS="${THREADS:-2}"
STAMP=$(date +%Y-%m-%d)
RES="bench/results/cpu-$STAMP"
mkdir -p "$RES"
LOG="$RES/run.log"
export PYTHONUNBUFFERED=1 CNP_PROGRESS=0 OMP_NUM_THREADS="$THREADS"
EMBEDDED=0
[[ "${1:-}" == "--embedded" ]] && EMBEDDED=1

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
{
  echo "run_cpu $STAMP threads=$THREADS"
  lscpu | grep -E "Model name|^CPU\(s\)|Thread\(s\) per core"
  "$PY" -c "import torch; print('torch', torch.__version__)"
  echo "load average before: $LOAD_BEFORE"
  ps -eo pid,pcpu,etime,comm --sort=-pcpu | head -6
} 2>&1 | tee "$LOG"

step() {
  echo "=== $*" | tee -a "$LOG"
  local t0=$(date +%s)
  "$@" 2>&1 | tee -a "$LOG"
  echo "=== exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s, load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$LOG"
}

step "$PY" bench/bench_pruned_speed.py --threads "$THREADS" --batch 8 --out "$RES/pruned_speed.json"
step "$PY" bench/bench_lrp.py --threads "$THREADS" --model reduced --batch 16 --out "$RES/lrp_reduced.json"
step "$PY" bench/bench_lrp.py --threads "$THREADS" --model full --batch 4 --repeats 3 --warmup 1 --out "$RES/lrp_full.json"
step "$PY" bench/bench_drsa.py --quick --threads "$THREADS" --device cpu --out "$RES/drsa_quick.json"
step "$PY" bench/bench_full_run.py --preset quick --threads "$THREADS" --device cpu --out "$RES/full_run_quick.json"
if [[ $EMBEDDED == 1 ]]; then
  step "$PY" bench/bench_full_run.py --preset embedded --threads "$THREADS" --device cpu \
    --out "$RES/full_run_embedded.json"
fi

LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
"$PY" bench/summarize.py "$RES" --md "bench/results/cpu-$STAMP.md" --json "$RES/summary.json" \
  --title "CPU benchmarks ($STAMP, $THREADS torch threads)" \
  --notes "Load average (1, 5, 15 min) before: $LOAD_BEFORE; after: $LOAD_AFTER. Log: $LOG." 2>&1 | tee -a "$LOG"
