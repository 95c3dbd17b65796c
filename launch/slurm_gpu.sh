#!/usr/bin/env bash
# GPU clusters with SLURM: one dks_jax process per node, using all of that node's GPUs.
# Run `launch/slurm_gpu.sh --help` for usage.
set -euo pipefail

SCRIPT_DIR=$(CDPATH='' cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$SCRIPT_DIR/lib.sh"

usage() {
  cat <<EOF
Usage: $PROG [options] CONFIG WORKDIR [overrides...]

Writes an sbatch script that starts 'python -m dks_jax.main --config=CONFIG --workdir=WORKDIR
[overrides]' once on every node (srun, one task per node, all the node's GPUs), and submits it.
dks_jax.main calls jax.distributed.initialize(), which reads the job's layout from SLURM.
CONFIG is relative to the repository root; WORKDIR must be visible from every node (a shared
file system or gs://); overrides are passed unchanged, e.g. --config.batch_size=2048
(put them after '--' if one of them looks like an option of this script).

Options (flag, or the environment variable in brackets)
  --nodes N             nodes [DKS_NODES] (default: 1)
  --gpus-per-node G     GPUs per node [DKS_GPUS_PER_NODE] (default: 8)
  --cpus-per-task C     CPU cores for each node's process (default: all cores of the node)
  --partition P         [DKS_PARTITION]     --account A   [DKS_ACCOUNT]
  --qos Q               [DKS_QOS]           --time T      time limit, e.g. 2-00:00:00 [DKS_TIME]
  --job-name NAME       [DKS_JOB_NAME] (default: dks_jax-<config file name>)
  --mem M               memory per node [DKS_MEM] (default: 0, all of it)
  --no-exclusive        share the nodes (default: whole nodes, --exclusive)
  --requeue             let SLURM requeue the job after a preemption or node failure; the
                        trainer resumes from the latest checkpoint in WORKDIR
  --signal-grace S      send SIGTERM S seconds before the time limit, so the trainer saves a
                        checkpoint and exits (default: 120; 0 disables)
  --sbatch-flag FLAG    extra #SBATCH line (repeatable), e.g. --sbatch-flag=--constraint=a100
  --python PY           Python with dks_jax and jax[cuda] installed [DKS_PYTHON] (default: python3)
  --setup 'COMMANDS'    shell commands run first in the job, as written (e.g. 'module load
                        cuda/12.4; source ~/venvs/dks/bin/activate') [DKS_SETUP]
  --env KEY=VALUE       environment variable for the training processes (repeatable)
  --repo DIR            repository root, the job's working directory [DKS_REPO] (default: this one)
  --log-dir DIR         job and per-node logs [DKS_LOG_DIR] (default: <repo>/logs/slurm):
                        <job-name>-<job id>.out and <job-name>-<job id>.node<N>.log
  --dry-run             print the sbatch script instead of submitting it
  -h, --help            this help

Example
  $PROG --nodes 4 --partition gpu --time 3-00:00:00 --requeue \\
    configs/imagenet_resnet50.py /shared/runs/r50 --config.batch_size=4096
EOF
}

# Settings: environment first, flags override (lib.sh: REPO, ENVS, DRY_RUN, POSITIONAL).
NODES=${DKS_NODES:-1}
GPUS=${DKS_GPUS_PER_NODE:-8}
CPUS=''
PARTITION=${DKS_PARTITION:-}
ACCOUNT=${DKS_ACCOUNT:-}
QOS=${DKS_QOS:-}
TIME=${DKS_TIME:-}
JOB_NAME=${DKS_JOB_NAME:-}
MEM=${DKS_MEM:-0}
PYTHON=${DKS_PYTHON:-python3}
SETUP=${DKS_SETUP:-}
LOG_DIR=${DKS_LOG_DIR:-}
EXCLUSIVE=1 REQUEUE=0 GRACE=120
SBATCH_FLAGS=()

# Options of this script (lib.sh's parse_args does --repo --env --log-dir --dry-run --help).
VALUE_OPTS=(--nodes --gpus-per-node --cpus-per-task --partition --account --qos --time --job-name
  --mem --signal-grace --sbatch-flag --python --setup)
RAW_VALUE_OPTS=(--sbatch-flag) # its value is an sbatch flag: --sbatch-flag --constraint=a100
FLAG_OPTS=(--no-exclusive --requeue)
set_option() {
  case $1 in
    --nodes) NODES=$2 ;;
    --gpus-per-node) GPUS=$2 ;;
    --cpus-per-task) CPUS=$2 ;;
    --partition) PARTITION=$2 ;;
    --account) ACCOUNT=$2 ;;
    --qos) QOS=$2 ;;
    --time) TIME=$2 ;;
    --job-name) JOB_NAME=$2 ;;
    --mem) MEM=$2 ;;
    --signal-grace) GRACE=$2 ;;
    --sbatch-flag) SBATCH_FLAGS+=("$2") ;;
    --python) PYTHON=$2 ;;
    --setup) SETUP=$2 ;;
  esac
}
set_flag() {
  case $1 in
    --no-exclusive) EXCLUSIVE=0 ;;
    --requeue) REQUEUE=1 ;;
  esac
}
parse_args "$@"

run_args \
  "missing CONFIG and WORKDIR, e.g. $PROG --nodes 2 configs/imagenet_resnet50.py /shared/runs/r50"
check_overrides
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive whole number, not '$NODES'"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive whole number, not '$GPUS'"
[[ -z $CPUS || $CPUS =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-task must be a positive whole number"
[[ $GRACE =~ ^[0-9]+$ ]] || die "--signal-grace must be a whole number of seconds, not '$GRACE'"
check_envs
JOB_NAME=${JOB_NAME:-dks_jax-$CONFIG_NAME}
LOG_DIR=${LOG_DIR:-$REPO/logs/slurm}
# #SBATCH lines are split on white space: their values must have none.
for var in JOB_NAME PARTITION ACCOUNT QOS TIME MEM LOG_DIR; do
  [[ ${!var} != *[[:space:]]* ]] || die "${var} must not contain white space: '${!var}'"
done
if [[ ${#SBATCH_FLAGS[@]} -gt 0 ]]; then
  for f in "${SBATCH_FLAGS[@]}"; do
    [[ $f == -?* && $f != *[[:space:]]* ]] || die "--sbatch-flag expects one flag such as --constraint=a100, got '$f'"
  done
fi

# ---------------------------------------------------------------------------------------------
device_ids=0
for ((i = 1; i < GPUS; i++)); do device_ids+=,$i; done
srun_cpus="--cpus-per-task=\"\$SLURM_CPUS_ON_NODE\""
[[ -z $CPUS ]] || srun_cpus=--cpus-per-task=$CPUS

script="#!/bin/bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS"
[[ -z $CPUS ]] || script+="
#SBATCH --cpus-per-task=$CPUS"
[[ $EXCLUSIVE == 0 ]] || script+="
#SBATCH --exclusive"
script+="
#SBATCH --mem=$MEM"
[[ -z $PARTITION ]] || script+="
#SBATCH --partition=$PARTITION"
[[ -z $ACCOUNT ]] || script+="
#SBATCH --account=$ACCOUNT"
[[ -z $QOS ]] || script+="
#SBATCH --qos=$QOS"
[[ -z $TIME ]] || script+="
#SBATCH --time=$TIME"
[[ $GRACE == 0 ]] || script+="
#SBATCH --signal=TERM@$GRACE"
[[ $REQUEUE == 0 ]] || script+="
#SBATCH --requeue"
script+="
#SBATCH --open-mode=append
#SBATCH --output=$LOG_DIR/%x-%j.out"
if [[ ${#SBATCH_FLAGS[@]} -gt 0 ]]; then
  for f in "${SBATCH_FLAGS[@]}"; do script+="
#SBATCH $f"; done
fi
script+="
# Written by launch/slurm_gpu.sh: dks_jax on $NODES node(s) x $GPUS GPUs, one process per node.
set -eo pipefail
cd $(shquote "$REPO")"
[[ -z $SETUP ]] || script+="
$SETUP"
script+="
set -u
export PYTHONUNBUFFERED=1
# dks_jax.main calls jax.distributed.initialize(), which reads the layout from SLURM's variables.
export DKS_DISTRIBUTED=1
# One process per node sees all the node's GPUs (SLURM auto-detection alone would give it one).
export JAX_LOCAL_DEVICE_IDS=\${JAX_LOCAL_DEVICE_IDS:-$device_ids}"
script+=$(export_lines)
script+="
echo \"dks_jax: job \$SLURM_JOB_ID on \$SLURM_JOB_NUM_NODES node(s): \$SLURM_JOB_NODELIST\"
# --kill-on-bad-exit: one failing node ends the whole job at once (fail-fast).
srun --nodes=$NODES --ntasks-per-node=1 $srun_cpus --kill-on-bad-exit=1 \\
  --output=$(shquote "$LOG_DIR/%x-%j.node%n.log") --open-mode=append \\
  $(quote_words "$PYTHON" -m dks_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  ${OVERRIDES[@]+"${OVERRIDES[@]}"})"

if [[ $DRY_RUN == 1 ]]; then
  printf '%s\n' "$script"
  printf '# submit with: sbatch --parsable <this script>\n' >&2
  exit 0
fi

command -v sbatch >/dev/null 2>&1 || die "sbatch not found on PATH: run this on a SLURM login node"
mkdir -p "$LOG_DIR"
file=$LOG_DIR/$JOB_NAME-$(utc_stamp).sbatch
printf '%s\n' "$script" >"$file"
printf '+ sbatch --parsable %s\n' "$(shquote "$file")" >&2
job=$(sbatch --parsable "$file")
job=${job%%;*}
note "submitted job $job; logs: $LOG_DIR/$JOB_NAME-$job.out and .node<N>.log"
printf '%s\n' "$job"
