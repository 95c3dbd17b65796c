#!/usr/bin/env bash
# One GPU host: one dks_jax process using all (or the chosen) GPUs of this machine.
# Run `launch/gpu_host.sh --help` for usage.
set -euo pipefail

PROG=${0##*/}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

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

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

# POSIX single quoting, like Python's shlex.quote: the result is one word in any sh-like shell.
shquote() {
  local s=$1 q="'\\''" re='^[A-Za-z0-9_@%+=:,./-]+$'
  if [[ $s =~ $re ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/$q}"
  fi
}

# Arguments as shell words (--flag=VALUE keeps --flag= outside the quotes, for readability).
quote_words() {
  local out='' a re='^(--[A-Za-z0-9_.-]+=)(.*)$'
  for a in "$@"; do
    if [[ $a =~ $re ]]; then
      a=${BASH_REMATCH[1]}$(shquote "${BASH_REMATCH[2]}")
    else
      a=$(shquote "$a")
    fi
    out+=${out:+ }$a
  done
  printf '%s' "$out"
}

GPUS=''
PYTHON=${DKS_PYTHON:-python3}
REPO=${DKS_REPO:-$(cd "$SCRIPT_DIR/.." && pwd)}
LOG_DIR=${DKS_LOG_DIR:-}
RUN_ID=${DKS_RUN_ID:-}
DRY_RUN=0
ENVS=()
POSITIONAL=()

while [[ $# -gt 0 ]]; do
  arg=$1
  val=''
  has_val=0
  if [[ $arg == --*=* ]]; then
    val=${arg#*=}
    arg=${arg%%=*}
    has_val=1
  fi
  case $arg in
    --gpus | --python | --env | --repo | --log-dir | --run-id)
      if [[ $has_val == 0 ]]; then
        # A VALUE that looks like an option means the value was forgotten.
        [[ $# -ge 2 && $2 != --* ]] || die "option $arg needs a value"
        val=$2
        shift
      fi
      case $arg in
        --gpus) GPUS=$val ;;
        --python) PYTHON=$val ;;
        --env) ENVS+=("$val") ;;
        --repo) REPO=$val ;;
        --log-dir) LOG_DIR=$val ;;
        --run-id) RUN_ID=$val ;;
      esac
      shift
      continue
      ;;
  esac
  [[ $has_val == 0 || ($arg != --dry-run && $arg != --help) ]] || die "option $arg takes no value"
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      POSITIONAL+=("$@")
      break
      ;;
    -*)
      # After CONFIG WORKDIR, unknown flags are overrides for dks_jax.main.
      [[ ${#POSITIONAL[@]} -ge 2 ]] || die "unknown option: $1"
      POSITIONAL+=("$1")
      ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done

[[ ${#POSITIONAL[@]} -ge 2 ]] ||
  die "missing CONFIG and WORKDIR, e.g. $PROG configs/cifar100_resnet32.py workdirs/r32"
CONFIG=${POSITIONAL[0]}
WORKDIR=${POSITIONAL[1]}
OVERRIDES=("${POSITIONAL[@]:2}")
[[ -n $CONFIG && -n $WORKDIR ]] || die "CONFIG and WORKDIR must not be empty"
[[ $CONFIG == /* || -f $REPO/${CONFIG%%:*} ]] ||
  die "config file not found: $REPO/${CONFIG%%:*} (CONFIG is relative to the repository root)"
if [[ ${#OVERRIDES[@]} -gt 0 ]]; then
  for o in "${OVERRIDES[@]}"; do
    [[ $o == --?* ]] || die "override '$o' is not a flag: write overrides as --config.field=value"
  done
fi
gpus_re='^[0-9]+(,[0-9]+)*$' # (regexes with parentheses in variables: bash 3.2 reads them the same)
[[ -z $GPUS || $GPUS =~ $gpus_re ]] || die "--gpus expects a list such as 0,1,2,3, not '$GPUS'"
if [[ ${#ENVS[@]} -gt 0 ]]; then
  for kv in "${ENVS[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got '$kv'"
  done
fi
if [[ -z $RUN_ID ]]; then
  RUN_ID=${CONFIG%%:*}
  RUN_ID=${RUN_ID##*/}
  RUN_ID=${RUN_ID%.py}-$(date -u +%Y%m%d-%H%M%S)
fi
[[ $RUN_ID =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "bad --run-id '$RUN_ID' (letters, digits, . _ -)"
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
printf '%s: log: %s\n' "$PROG" "$LOG" >&2
"${cmd[@]}" 2>&1 | tee -a "$LOG"
