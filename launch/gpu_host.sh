#!/usr/bin/env bash
# One GPU host: one dks_jax process using all (or the chosen) GPUs of this machine.
# Run `launch/gpu_host.sh --help` for usage.
set -euo pipefail

SCRIPT_DIR=$(CDPATH='' cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$SCRIPT_DIR/lib.sh"

usage() {
  cat <<EOF
Usage: $PROG [options] CONFIG WORKDIR [overrides...]

Runs 'python -m dks_jax.main --config=CONFIG --workdir=WORKDIR [overrides]' in the repository
root as one process that uses every visible GPU (the global batch is split over them), and keeps
a copy of its output in a log file. CONFIG is relative to the repository root; WORKDIR is a local
path or gs://; overrides are passed unchanged, e.g. --config.batch_size=512 (put them after '--'
if one of them looks like an option of this script). Run it again with the same WORKDIR to resume.

Options (flag, or the environment variable in brackets)
  --gpus LIST      GPUs to use, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES; default: all)
  --python PY      Python with dks_jax and jax[cuda] installed [DKS_PYTHON] (default: python3)
  --env KEY=VALUE  environment variable for the training process (repeatable)
  --repo DIR       repository root, the working directory [DKS_REPO] (default: this one)
  --log-dir DIR    where the log goes [DKS_LOG_DIR] (default: <repo>/logs/gpu_host)
  --run-id ID      log file name, DIR/<ID>.log [DKS_RUN_ID] (default: <config name>-<UTC time>)
  --dry-run        print the command instead of running it
  -h, --help       this help
EOF
}

# Settings: environment first, flags override (lib.sh: REPO, ENVS, DRY_RUN, POSITIONAL).
GPUS=''
PYTHON=${DKS_PYTHON:-python3}
LOG_DIR=${DKS_LOG_DIR:-}
RUN_ID=${DKS_RUN_ID:-}

# Options of this script (lib.sh's parse_args does --repo --env --log-dir --dry-run --help).
VALUE_OPTS=(--gpus --python --run-id)
FLAG_OPTS=()
set_option() {
  case $1 in
    --gpus) GPUS=$2 ;;
    --python) PYTHON=$2 ;;
    --run-id) RUN_ID=$2 ;;
  esac
}
parse_args "$@"

run_args "missing CONFIG and WORKDIR, e.g. $PROG configs/cifar100_resnet32.py workdirs/r32"
check_overrides
gpus_re='^[0-9]+(,[0-9]+)*$' # (regexes with parentheses in variables: bash 3.2 reads them the same)
[[ -z $GPUS || $GPUS =~ $gpus_re ]] || die "--gpus expects a list such as 0,1,2,3, not '$GPUS'"
check_envs
RUN_ID=${RUN_ID:-$CONFIG_NAME-$(utc_stamp)}
check_run_id
LOG_DIR=${LOG_DIR:-$REPO/logs/gpu_host}
LOG=$LOG_DIR/$RUN_ID.log

cmd=(env PYTHONUNBUFFERED=1)
[[ -z $GPUS ]] || cmd+=("CUDA_VISIBLE_DEVICES=$GPUS")
cmd+=(${ENVS[@]+"${ENVS[@]}"} "$PYTHON" -m dks_jax.main --config="$CONFIG" --workdir="$WORKDIR"
  ${OVERRIDES[@]+"${OVERRIDES[@]}"})

if [[ $DRY_RUN == 1 ]]; then
  printf 'set -o pipefail; cd %s && mkdir -p %s && %s 2>&1 | tee -a %s\n' "$(shquote "$REPO")" \
    "$(shquote "$LOG_DIR")" "$(quote_words "${cmd[@]}")" "$(shquote "$LOG")"
  exit 0
fi
cd "$REPO"
mkdir -p "$LOG_DIR"
printf '+ %s\n' "$(quote_words "${cmd[@]}")" >&2
note "log: $LOG"
"${cmd[@]}" 2>&1 | tee -a "$LOG"
