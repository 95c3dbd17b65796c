#!/usr/bin/env bash
# The CPU evidence study (protocol: README.md beside this script). Trains every run not finished
# yet, seed by seed (seed k of every config before seed k+1), then writes the tables and curves.
#
#   make study                 # or: DATA_DIR=../shared/data results/cpu_study/run.sh
#
# Resumable: a run with runs/<config>/seed<k>/result.json is done and skipped (those files are
# committed), an interrupted run resumes from its checkpoint (kept out of git). With COMMIT=1 each
# finished run's small files, the tables and the curves are committed as the run lands.
#
# JOBS=N trains N runs at once, each worker pinned to one CPU core (on a 2-core machine two
# one-core runs train about 1.3x as many images per second as one run on both cores). A worker
# takes the next unfinished run in the order above that no other worker holds (a lock file per
# run), so the runs start in the same order; the training itself is the same.
set -euo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-../shared/data}
COMMIT=${COMMIT:-0}
STUDY=results/cpu_study
RUNS=$STUDY/runs
SEEDS=(0 1 2 3 4)
# The comparison first (clean: baseline, DS, DKS; 50% label noise: baseline, DKS), then DHM.
PHASES=("baseline ds dks baseline,0.5 dks,0.5" "dhm")

all_specs() {
  local out=() phase preset
  for phase in "${PHASES[@]}"; do
    for preset in $phase; do out+=("configs/cpu_study.py:$preset"); done
  done
  local IFS=,
  echo "${out[*]}"
}

tables() {
  "$PY" -m dks_jax.tools.sweep --table_only --configs="$(all_specs)" --workdir="$RUNS" \
    --results_dir=results --name=cpu_study > /dev/null
  "$PY" -m dks_jax.tools.curves --workdir="$RUNS" --out="$STUDY" > /dev/null
}

commit() {  # commit only these paths (other staged work stays staged); retry while git is busy
  local message=$1; shift
  git add -f -- "$@"  # run folders are git-ignored until a run has finished
  for _ in 1 2 3 4 5 6; do
    if git commit --quiet -m "$message" -- "$@"; then return 0; fi
    sleep 10
  done
  echo "run.sh: could not commit $*" >&2
}

JOBS=${JOBS:-1}
WORKER=${WORKER:-0}
mkdir -p "$RUNS"
if [[ $WORKER == 0 && $JOBS -gt 1 ]]; then
  cores=$(nproc)
  workers=()
  for ((j = 0; j < JOBS; j++)); do
    WORKER=1 taskset -c $((j % cores)) "$SELF" &
    workers+=($!)
    sleep 1  # the workers start one after the other
  done
  failed=0
  for pid in "${workers[@]}"; do wait "$pid" || failed=1; done
  tables
  if ((failed)); then echo "a worker stopped on a failed run: see $RUNS/sweep.log"; exit 1; fi
  echo "$(date '+%F %T') all workers finished: results/cpu_study.md"
  exit 0
fi

for phase in "${PHASES[@]}"; do
  for seed in "${SEEDS[@]}"; do
    for preset in $phase; do
      name="cpu_study-${preset//,/-}"
      run="$RUNS/$name/seed$seed"
      [[ -f $run/result.json ]] && continue
      mkdir -p "$RUNS/$name"
      exec {claim}> "$run.lock"
      if ! flock -n "$claim"; then exec {claim}>&-; continue; fi  # another worker trains it
      [[ -f $run/result.json ]] && { exec {claim}>&-; continue; }
      echo "$(date '+%F %T') $name seed $seed: training"
      nice -n 10 "$PY" -m dks_jax.tools.sweep --configs="configs/cpu_study.py:$preset" --seeds="$seed-$seed" \
        --workdir="$RUNS" --results_dir="$RUNS/.tables" "--config.data_dir=$DATA_DIR" \
        >> "$RUNS/sweep.log" 2>&1
      [[ -f $run/result.json ]] || { echo "$name seed $seed did not finish: see $RUNS/sweep.log"; exit 1; }
      exec {shared}> "$RUNS/.tables.lock"
      flock "$shared"  # one worker at a time writes the tables and commits
      tables
      top1=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['metrics']['eval_top1/C1'])" "$run/result.json")
      echo "$(date '+%F %T') $name seed $seed: C1 top-1 $top1%"
      if [[ $COMMIT == 1 ]]; then
        commit "cpu study: $name seed $seed, C1 top-1 $top1%" \
          "$run/result.json" "$run/metrics.jsonl" "$run/config.json" \
          results/cpu_study.csv results/cpu_study.md "$STUDY"/curves-*.png "$STUDY"/curves.md
      fi
      exec {shared}>&- {claim}>&-
    done
  done
done
if [[ $WORKER == 0 ]]; then
  tables
  echo "$(date '+%F %T') all runs finished: results/cpu_study.md"
fi
