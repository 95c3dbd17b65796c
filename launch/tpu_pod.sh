#!/usr/bin/env bash
# Cloud TPU VM slices and pods: create, set up, run, stop and delete dks_jax training on every worker.
# Run `launch/tpu_pod.sh --help` for usage. Runs on the machine you launch from (bash 3.2+, gcloud).
set -euo pipefail

SCRIPT_DIR=$(CDPATH='' cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$SCRIPT_DIR/lib.sh"

usage() {
  cat <<EOF
Usage: $PROG [options] SUBCOMMAND [options] [arguments]

Subcommands
  create                          create the TPU VM (or a queued resource with --queued)
  setup                           install dks_jax and jax[tpu] on every worker
  run CONFIG WORKDIR [overrides]  start 'python -m dks_jax.main' on every worker, stream the
                                  workers' output (prefixed [worker N]), keep per-worker logs,
                                  and stop every worker as soon as one fails (fail-fast)
  logs [RUN_ID]                   follow the latest (or RUN_ID's) log of every worker
  stop                            end training processes on every worker, clear /tmp/libtpu_lockfile
  delete                          delete the TPU VM (or the queued resource)

  CONFIG is relative to the repository root (the working directory on the workers), optionally
  with ':preset'; WORKDIR is a gs:// path shared by all workers; overrides are flags passed to
  dks_jax.main unchanged, e.g. --config.batch_size=1024 '--config.note=two words'
  (put them after '--' if one of them looks like an option of this script).

Options (flag, or the environment variable in brackets)
  --name NAME              TPU name [TPU_NAME] (required)
  --zone ZONE              zone, e.g. us-central2-b [TPU_ZONE] (default: gcloud's compute/zone)
  --project PROJECT        Google Cloud project [TPU_PROJECT] (default: gcloud's core/project)
  --accelerator-type TYPE  e.g. v4-32, v5p-64, v5litepod-16, v6e-16 [TPU_ACCELERATOR_TYPE]
  --runtime-version V      TPU software version [TPU_RUNTIME_VERSION] (default from the type:
                           v2/v3/v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
                           v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
  --spot                   Spot capacity (preemptible, cheaper) [TPU_SPOT=1]
  --reserved               use the project's reservation [TPU_RESERVED=1]
  --queued                 go through a queued resource (create/delete) [TPU_QUEUED=1]
  --valid-until D          queued resource: give up after duration D, e.g. 6h [TPU_VALID_UNTIL]
  --wait                   create --queued: wait until the resource is ACTIVE
  --create-flag FLAG       extra flag for the gcloud create command (repeatable),
                           e.g. --create-flag=--network=my-net
  --internal-ip            reach the workers by internal IP (launching from a GCE VM)
  --repo DIR               local checkout to ship with setup [DKS_REPO] (default: this one)
  --git URL                setup: 'git clone URL' on the workers instead of shipping the
                           checkout [TPU_GIT_URL]; --ref REF checks out REF [TPU_GIT_REF]
  --wheel PATH             setup: install this wheel (local file or gs://) instead of the
                           checkout; configs/ is still shipped [TPU_WHEEL]
  --extras LIST            package extras to install [TPU_EXTRAS] (default: tf)
  --jax-spec SPEC          jax requirement [TPU_JAX_SPEC] (default: 'jax[tpu]')
  --python-version V       Python of the workers' venv, installed by uv [TPU_PYTHON_VERSION]
                           (default: 3.12; jax needs 3.11 or newer)
  --no-verify              setup: skip the final device count check on every worker
  --remote-dir DIR         on the workers, relative to \$HOME [TPU_REMOTE_DIR] (default: dks_jax)
  --venv DIR               venv on the workers, relative to \$HOME [TPU_VENV] (default: dks_venv)
  --remote-log-dir DIR     logs on the workers, relative to \$HOME [TPU_REMOTE_LOG_DIR]
                           (default: dks_logs; <RUN_ID>.log and latest.log)
  --log-dir DIR            local per-worker logs [TPU_LOG_DIR] (default: <repo>/logs/tpu;
                           run writes DIR/<RUN_ID>/worker-<N>.log)
  --run-id ID              name of this run's logs [DKS_RUN_ID] (default: NAME-<UTC time>)
  --env KEY=VALUE          environment variable for the training processes (repeatable)
  --allow-local-workdir    accept a WORKDIR that is not on gs:// (single-host TPU VMs only)
  --detach                 run: start training and return; follow it later with 'logs'
  --grace SECONDS          stop: wait this long after SIGTERM before SIGKILL (default: 30)
  --force                  stop: also kill any other process holding the TPU devices (sudo)
  --yes                    delete: do not ask for confirmation
  --dry-run                print the exact commands instead of running them
  -h, --help               this help

Example
  export TPU_NAME=dks-v4-32 TPU_ZONE=us-central2-b TPU_ACCELERATOR_TYPE=v4-32
  $PROG create --spot && $PROG setup
  $PROG run configs/imagenet_resnet18.py gs://my-bucket/dks/r18 --config.batch_size=1024
EOF
}

# A here-document delimiter, $1 or $1_N, that is not a line of the text $2.
delimiter() {
  local d=$1 n=0
  while [[ $'\n'$2$'\n' == *$'\n'$d$'\n'* ]]; do
    n=$((n + 1))
    d=$1_$n
  done
  printf '%s' "$d"
}

# A command as bash reads it back exactly; a multi-line --flag=SCRIPT is shown verbatim in a
# quoted here-document: --flag="$(cat <<'DELIM' ... DELIM)".
print_cmd() {
  local out='' a re='^(--[A-Za-z0-9_.-]+=)(.*)$' flag value d
  for a in "$@"; do
    # (a trailing newline would not survive "$(...)": such a value is quoted the plain way)
    if [[ $a == *$'\n'* && $a != *$'\n' && $a =~ $re ]]; then
      flag=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
      d=$(delimiter DKS_SCRIPT "$value")
      a="$flag\"\$(cat <<'$d'"$'\n'"$value"$'\n'"$d"$'\n'")\""
    else
      a=$(quote_words "$a")
    fi
    out+=${out:+ }$a
  done
  printf '%s' "$out"
}

# Short form for the log of a real run: a multi-line argument becomes <N-line script>.
summary_cmd() {
  local out='' a n
  for a in "$@"; do
    if [[ $a == *$'\n'* ]]; then
      n=$(printf '%s\n' "$a" | wc -l)
      a="${a%%=*}=<${n// /}-line script, see --dry-run>"
    else
      a=$(quote_words "$a")
    fi
    out+=${out:+ }$a
  done
  printf '%s' "$out"
}

# Run a command; under --dry-run print it instead (bash reads the printed text back as the same
# command; the scripts given to the workers are shown as they are).
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(print_cmd "$@")"
  else
    printf '+ %s\n' "$(summary_cmd "$@")" >&2
    "$@"
  fi
}

comment() { if [[ $DRY_RUN == 1 ]]; then printf '# %s\n' "$*"; else note "$*"; fi; }

# ---------------------------------------------------------------------------------------------
# Settings: environment first, flags override (lib.sh: REPO, ENVS, DRY_RUN, POSITIONAL).
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
ACCEL=${TPU_ACCELERATOR_TYPE:-}
RUNTIME=${TPU_RUNTIME_VERSION:-}
SPOT=${TPU_SPOT:-0}
RESERVED=${TPU_RESERVED:-0}
QUEUED=${TPU_QUEUED:-0}
VALID_UNTIL=${TPU_VALID_UNTIL:-}
GIT_URL=${TPU_GIT_URL:-}
GIT_REF=${TPU_GIT_REF:-}
WHEEL=${TPU_WHEEL:-}
EXTRAS=${TPU_EXTRAS-tf}
JAX_SPEC=${TPU_JAX_SPEC:-jax[tpu]}
PY_VERSION=${TPU_PYTHON_VERSION:-3.12}
REMOTE_DIR=${TPU_REMOTE_DIR:-dks_jax}
VENV=${TPU_VENV:-dks_venv}
REMOTE_LOGS=${TPU_REMOTE_LOG_DIR:-dks_logs}
LOG_DIR=${TPU_LOG_DIR:-}
RUN_ID=${DKS_RUN_ID:-}
WAIT=0 VERIFY=1 INTERNAL_IP=0 ALLOW_LOCAL=0 DETACH=0 GRACE=30 FORCE=0 YES=0
CREATE_FLAGS=()
SUBCOMMAND=''

# Options of this script (lib.sh's parse_args does --repo --env --log-dir --dry-run --help).
VALUE_OPTS=(--name --zone --project --accelerator-type --runtime-version --valid-until --create-flag
  --git --ref --wheel --extras --jax-spec --python-version --remote-dir --venv --remote-log-dir
  --run-id --grace)
# A flag for gcloud create is given as --create-flag=--network=NET or --create-flag --network=NET.
RAW_VALUE_OPTS=(--create-flag)
FLAG_OPTS=(--spot --reserved --queued --wait --no-verify --internal-ip --allow-local-workdir
  --detach --force --yes)
set_option() {
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator-type) ACCEL=$2 ;;
    --runtime-version) RUNTIME=$2 ;;
    --valid-until) VALID_UNTIL=$2 ;;
    --create-flag) CREATE_FLAGS+=("$2") ;;
    --git) GIT_URL=$2 ;;
    --ref) GIT_REF=$2 ;;
    --wheel) WHEEL=$2 ;;
    --extras) EXTRAS=$2 ;;
    --jax-spec) JAX_SPEC=$2 ;;
    --python-version) PY_VERSION=$2 ;;
    --remote-dir) REMOTE_DIR=$2 ;;
    --venv) VENV=$2 ;;
    --remote-log-dir) REMOTE_LOGS=$2 ;;
    --run-id) RUN_ID=$2 ;;
    --grace) GRACE=$2 ;;
  esac
}
set_flag() {
  case $1 in
    --spot) SPOT=1 ;;
    --reserved) RESERVED=1 ;;
    --queued) QUEUED=1 ;;
    --wait) WAIT=1 ;;
    --no-verify) VERIFY=0 ;;
    --internal-ip) INTERNAL_IP=1 ;;
    --allow-local-workdir) ALLOW_LOCAL=1 ;;
    --detach) DETACH=1 ;;
    --force) FORCE=1 ;;
    --yes) YES=1 ;;
  esac
}
# The first argument is the subcommand; after 'run CONFIG WORKDIR', unknown flags are overrides
# for dks_jax.main.
add_argument() { if [[ -z $SUBCOMMAND ]]; then SUBCOMMAND=$1; else POSITIONAL+=("$1"); fi; }
is_override() { [[ $SUBCOMMAND == run && ${#POSITIONAL[@]} -ge 2 ]]; }
parse_args "$@"

# ---------------------------------------------------------------------------------------------
# Validation and derived settings.
[[ -n $SUBCOMMAND ]] || die "missing SUBCOMMAND (create, setup, run, logs, stop or delete)"
case $SUBCOMMAND in
  create | setup | run | logs | stop | delete) ;;
  *) die "unknown subcommand '$SUBCOMMAND' (expected create, setup, run, logs, stop or delete)" ;;
esac
[[ -n $NAME ]] || die "no TPU name: pass --name NAME or set TPU_NAME"
name_re='^[a-z]([-a-z0-9]*[a-z0-9])?$' # (in a variable: bash 3.2 reads it the same way)
[[ $NAME =~ $name_re ]] ||
  die "bad TPU name '$NAME': lowercase letters, digits and hyphens, starting with a letter"
for flag in SPOT RESERVED QUEUED; do
  [[ ${!flag} == 0 || ${!flag} == 1 ]] || die "TPU_$flag must be 0 or 1, not '${!flag}'"
done
[[ $GRACE =~ ^[0-9]+$ ]] || die "--grace must be a whole number of seconds, not '$GRACE'"
for dir_var in REMOTE_DIR VENV REMOTE_LOGS; do
  [[ ${!dir_var} =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*$ && ${!dir_var} != *..* ]] ||
    die "bad ${dir_var} '${!dir_var}': a path relative to the workers' \$HOME (letters, digits, _ . / -)"
done
check_envs
LOG_DIR=${LOG_DIR:-$REPO/logs/tpu}

GC_LOC=()
[[ -z $ZONE ]] || GC_LOC+=("--zone=$ZONE")
[[ -z $PROJECT ]] || GC_LOC+=("--project=$PROJECT")
SSH_OPTS=()
[[ $INTERNAL_IP == 0 ]] || SSH_OPTS+=(--internal-ip)
# Empty arrays expand to nothing under 'set -u' on bash 3.2 (macOS) only in this form.
LOC_SSH=(${GC_LOC[@]+"${GC_LOC[@]}"} ${SSH_OPTS[@]+"${SSH_OPTS[@]}"})
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" --worker=all ${LOC_SSH[@]+"${LOC_SSH[@]}"})

if [[ $DRY_RUN == 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk)"
fi

# Lines of POSIX sh shared by the scripts run on the workers: worker number and path helper.
# shellcheck disable=SC2016  # expanded on the workers, not here
REMOTE_PRELUDE='cd "$HOME"
abs() { case $1 in /*) printf "%s\n" "$1" ;; *) printf "%s/%s\n" "$HOME" "$1" ;; esac; }
w=${DKS_WORKER_ID:-}
if [ -z "$w" ]; then
  w=$(curl -sf -m 5 -H "Metadata-Flavor: Google" http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || true)
fi
case $w in "" | *[!0-9]*) w=$(hostname | sed -n "s/.*-w-\([0-9][0-9]*\)$/\1/p") ;; esac
w=${w:-0}'

# The training processes, as 'ps' shows them: '<venv>/bin/python -m dks_jax.main ...'.
TRAIN_PATTERN='^[^ ]*python[0-9.]* -m dks_jax[.]main( |$)'

default_runtime() {
  case $ACCEL in
    v2-* | v3-* | v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) die "no default runtime version for accelerator type '$ACCEL': pass --runtime-version" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
cmd_create() {
  [[ ${#POSITIONAL[@]} -eq 0 ]] || die "create takes no arguments (got: ${POSITIONAL[*]})"
  [[ -n $ZONE ]] || die "create needs a zone: pass --zone ZONE or set TPU_ZONE"
  [[ -n $ACCEL ]] ||
    die "create needs --accelerator-type (or TPU_ACCELERATOR_TYPE), e.g. v4-32, v5p-64, v5litepod-16"
  [[ -n $RUNTIME ]] || default_runtime
  [[ $SPOT == 0 || $RESERVED == 0 ]] || die "--spot and --reserved exclude each other"
  local cmd
  if [[ $QUEUED == 1 ]]; then
    cmd=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" ${GC_LOC[@]+"${GC_LOC[@]}"}
      --accelerator-type="$ACCEL" --runtime-version="$RUNTIME")
    [[ -z $VALID_UNTIL ]] || cmd+=(--valid-until-duration="$VALID_UNTIL")
  else
    [[ -z $VALID_UNTIL ]] || die "--valid-until needs --queued"
    cmd=(gcloud compute tpus tpu-vm create "$NAME" ${GC_LOC[@]+"${GC_LOC[@]}"}
      --accelerator-type="$ACCEL" --version="$RUNTIME")
  fi
  [[ $SPOT == 0 ]] || cmd+=(--spot)
  [[ $RESERVED == 0 ]] || cmd+=(--reserved)
  cmd+=(${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"})
  run "${cmd[@]}"
  if [[ $QUEUED == 1 ]]; then
    local describe=(gcloud compute tpus queued-resources describe "$NAME" ${GC_LOC[@]+"${GC_LOC[@]}"}
      --format='value(state.state)')
    if [[ $WAIT == 0 || $DRY_RUN == 1 ]]; then
      comment "the TPU exists once this prints ACTIVE (create --wait polls it): $(quote_words "${describe[@]}")"
      return
    fi
    local state=''
    while :; do
      state=$("${describe[@]}")
      note "queued resource $NAME: $state"
      case $state in
        ACTIVE) return ;;
        FAILED | SUSPENDED | SUSPENDING) die "queued resource $NAME is $state" ;;
      esac
      sleep 60
    done
  fi
}

cmd_delete() {
  [[ ${#POSITIONAL[@]} -eq 0 ]] || die "delete takes no arguments (got: ${POSITIONAL[*]})"
  local cmd
  if [[ $QUEUED == 1 ]]; then
    cmd=(gcloud compute tpus queued-resources delete "$NAME" ${GC_LOC[@]+"${GC_LOC[@]}"} --force)
  else
    cmd=(gcloud compute tpus tpu-vm delete "$NAME" ${GC_LOC[@]+"${GC_LOC[@]}"})
  fi
  [[ $YES == 0 ]] || cmd+=(--quiet)
  run "${cmd[@]}"
}

cmd_setup() {
  [[ ${#POSITIONAL[@]} -eq 0 ]] || die "setup takes no arguments (got: ${POSITIONAL[*]})"
  [[ -z $GIT_URL || -z $WHEEL ]] || die "--git and --wheel exclude each other"
  [[ -z $GIT_REF || -n $GIT_URL ]] || die "--ref needs --git URL"
  [[ $EXTRAS =~ ^[A-Za-z0-9_,-]*$ ]] || die "bad --extras '$EXTRAS' (comma-separated names)"
  local wheel_name=${WHEEL##*/}
  [[ -z $WHEEL || $wheel_name == *.whl ]] || die "--wheel expects a .whl file, got '$WHEEL'"
  local extras=${EXTRAS:+[$EXTRAS]} fetch install tarball='' what
  local sh
  sh="set -eu
$REMOTE_PRELUDE
D=\$(abs $(shquote "$REMOTE_DIR"))
V=\$(abs $(shquote "$VENV"))
export PATH=\"\$HOME/.local/bin:\$PATH\"
echo \"[worker \$w] installing into \$V\""

  if [[ -n $GIT_URL ]]; then
    fetch="rm -rf \"\$D\"
git clone --quiet $(shquote "$GIT_URL") \"\$D\""
    [[ -z $GIT_REF ]] || fetch+="
git -C \"\$D\" checkout --quiet $(shquote "$GIT_REF")"
    install="-e \"\$D\"$(shquote "$extras")"
  else
    git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 ||
      die "$REPO is not a git checkout: pass --repo DIR, --git URL or --wheel PATH"
    local rev
    rev=$(git -C "$REPO" rev-parse --short HEAD)
    if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no) ]]; then
      note "warning: $REPO has uncommitted changes; setup ships the last commit ($rev) only"
    fi
    tarball=${TMPDIR:-/tmp}/dks_jax-$rev.tar.gz
    what=(HEAD)
    [[ -z $WHEEL ]] || what=(HEAD configs)
    fetch="rm -rf \"\$D\"
mkdir -p \"\$D\"
tar -xzf dks_jax.tar.gz -C \"\$D\"
rm -f dks_jax.tar.gz"
    install="-e \"\$D\"$(shquote "$extras")"
  fi
  if [[ -n $WHEEL ]]; then
    if [[ $WHEEL == gs://* ]]; then
      fetch+="
gcloud storage cp $(shquote "$WHEEL") \"\$HOME\"/$(shquote "$wheel_name")"
    elif [[ ! -f $WHEEL && $DRY_RUN == 0 ]]; then
      die "wheel not found: $WHEEL (build one with: python -m pip wheel --no-deps -w dist .)"
    fi
    install="\"\$HOME\"/$(shquote "$wheel_name$extras")"
  fi
  sh+="
$fetch
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --user --quiet --upgrade uv || curl -LsSf https://astral.sh/uv/install.sh | sh
fi
uv venv --quiet --allow-existing --python $(shquote "$PY_VERSION") \"\$V\"
uv pip install --quiet --python \"\$V/bin/python\" --upgrade $(shquote "$JAX_SPEC") $install"
  if [[ $VERIFY == 1 ]]; then
    sh+="
\"\$V/bin/python\" -c 'import jax; print(\"[worker %d] jax %s: %d local of %d TPU devices\" % (jax.process_index(), jax.__version__, jax.local_device_count(), jax.device_count()))'"
  fi

  if [[ -n $tarball ]]; then
    comment "ship the committed checkout ($REPO at $rev) to every worker"
    run git -C "$REPO" archive --format=tar.gz -o "$tarball" "${what[@]}"
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:dks_jax.tar.gz" --worker=all \
      ${LOC_SSH[@]+"${LOC_SSH[@]}"}
  fi
  if [[ -n $WHEEL && $WHEEL != gs://* ]]; then
    run gcloud compute tpus tpu-vm scp "$WHEEL" "$NAME:$wheel_name" --worker=all \
      ${LOC_SSH[@]+"${LOC_SSH[@]}"}
  fi
  comment "install on every worker: uv, a Python $PY_VERSION venv, $JAX_SPEC and dks_jax$extras"
  run "${SSH[@]}" --command="$sh"
  [[ -z $tarball || $DRY_RUN == 1 ]] || rm -f "$tarball"
}

stop_script() { # $1: grace seconds
  local sh
  sh="$REMOTE_PRELUDE
pat=$(shquote "$TRAIN_PATTERN")
if pgrep -f \"\$pat\" >/dev/null; then
  echo \"[worker \$w] stopping training processes: \$(pgrep -f \"\$pat\" | tr '\n' ' ')\"
  pkill -TERM -f \"\$pat\" || true
  i=0
  while pgrep -f \"\$pat\" >/dev/null && [ \"\$i\" -lt $1 ]; do sleep 1; i=\$((i + 1)); done
  pkill -KILL -f \"\$pat\" || true
  sleep 1
fi"
  if [[ $FORCE == 1 ]]; then
    sh+="
set --
for f in /dev/accel* /dev/vfio/[0-9]*; do [ -e \"\$f\" ] && set -- \"\$@\" \"\$f\"; done
if [ \$# -gt 0 ]; then
  pids=\$(sudo -n lsof -t \"\$@\" 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n \"\$pids\" ]; then echo \"[worker \$w] killing TPU users: \$pids\"; sudo -n kill -9 \$pids || true; fi
fi"
  fi
  sh+="
lock=\${DKS_TPU_LOCKFILE:-/tmp/libtpu_lockfile}
rm -f \"\$lock\" 2>/dev/null || sudo -n rm -f \"\$lock\" || true
if [ -e \"\$lock\" ]; then echo \"[worker \$w] could not remove \$lock\"; exit 1; fi
echo \"[worker \$w] no training process left; TPU lock file cleared\""
  printf '%s' "$sh"
}

cmd_stop() {
  [[ ${#POSITIONAL[@]} -eq 0 ]] || die "stop takes no arguments (got: ${POSITIONAL[*]})"
  run "${SSH[@]}" --command="$(stop_script "$GRACE")"
}

cmd_logs() {
  [[ ${#POSITIONAL[@]} -le 1 ]] || die "logs takes at most one argument, RUN_ID"
  local id=${POSITIONAL[0]:-${RUN_ID:-latest}}
  is_run_id "$id" || die "bad RUN_ID '$id'"
  local sh
  sh="$REMOTE_PRELUDE
tail -n 100 -F \"\$(abs $(shquote "$REMOTE_LOGS/$id.log"))\" | sed -u \"s/^/[worker \$w] /\""
  run "${SSH[@]}" --command="$sh"
}

cmd_run() {
  run_args "run needs CONFIG and WORKDIR, e.g. run configs/imagenet_resnet50.py gs://bucket/dks/r50"
  if [[ $WORKDIR != gs://* && $ALLOW_LOCAL == 0 ]]; then
    die "WORKDIR '$WORKDIR' is not on Cloud Storage: the workers of a pod need one shared gs:// workdir (pass --allow-local-workdir on a single-host TPU VM)"
  fi
  check_overrides
  RUN_ID=${RUN_ID:-$NAME-$(utc_stamp)}
  check_run_id

  # What every worker runs (a file <remote-log-dir>/<RUN_ID>.sh there), detached from ssh.
  local train wrapper
  train=$(quote_words --config="$CONFIG" --workdir="$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
  wrapper="echo \$\$ > \"\$DKS_RUN_BASE.pid\"
echo \"dks_jax run $RUN_ID on \$(hostname), \$(date -u)\"
cd \"\$DKS_APP_DIR\" || { echo 1 > \"\$DKS_RUN_BASE.status\"; exit 1; }
export PYTHONUNBUFFERED=1 DKS_DISTRIBUTED=1"
  wrapper+=$(export_lines)
  wrapper+="
\"\$DKS_VENV/bin/python\" -m dks_jax.main $train
echo \$? > \"\$DKS_RUN_BASE.status\""

  local launcher wd start_id
  wd=$(delimiter DKS_WRAPPER "$wrapper")
  start_id=$(date -u +%Y%m%d%H%M%S)-$$-$RANDOM
  launcher="set -eu
$REMOTE_PRELUDE
logs=\$(abs $(shquote "$REMOTE_LOGS"))
mkdir -p \"\$logs\"
base=\$logs/$RUN_ID
# Started once per invocation: when gcloud retries a dropped ssh connection, this re-attaches.
if [ \"\$(cat \"\$base.start\" 2>/dev/null || true)\" != $start_id ]; then
  rm -f \"\$base.pid\" \"\$base.status\"
  cat > \"\$base.sh\" <<'$wd'
$wrapper
$wd
  echo $start_id > \"\$base.start\"
  DKS_RUN_BASE=\$base DKS_APP_DIR=\$(abs $(shquote "$REMOTE_DIR")) DKS_VENV=\$(abs $(shquote "$VENV")) \\
    setsid nohup sh \"\$base.sh\" >> \"\$base.log\" 2>&1 < /dev/null &
  ln -sfn $RUN_ID.log \"\$logs/latest.log\"
fi
i=0
while [ ! -s \"\$base.pid\" ] && [ \"\$i\" -lt 100 ]; do sleep 0.1; i=\$((i + 1)); done
if [ ! -s \"\$base.pid\" ]; then echo \"[worker \$w] dks_jax: training did not start, see \$base.log\"; exit 1; fi"
  if [[ $DETACH == 1 ]]; then
    launcher+="
echo \"[worker \$w] dks_jax: training started in the background, log: \$base.log\""
  else
    launcher+="
tail -n +1 --pid=\"\$(cat \"\$base.pid\")\" -f \"\$base.log\" | sed -u \"s/^/[worker \$w] /\"
rc=\$(cat \"\$base.status\" 2>/dev/null) || true
case \$rc in '' | *[!0-9]*) rc=255 ;; esac
echo \"[worker \$w] dks_jax: training exited with status \$rc\"
exit \"\$rc\""
  fi

  local check
  check="$REMOTE_PRELUDE
pids=\$(pgrep -f $(shquote "$TRAIN_PATTERN") | tr '\n' ' ') || true
if [ -n \"\$pids\" ]; then echo \"[worker \$w] dks_jax: a training process is already running (pid \$pids)\"; exit 3; fi"

  local run_dir=$LOG_DIR/$RUN_ID
  comment "1. every worker must be free: no dks_jax training process running"
  if ! run "${SSH[@]}" --command="$check"; then
    note "a training process is already running on the TPU; end it first with: $PROG stop (same options)"
    exit 1
  fi
  comment "2. start training on every worker (logs: $run_dir/worker-N.log here, ~/$REMOTE_LOGS/$RUN_ID.log there)"
  local start=("${SSH[@]}" --command="$launcher")
  if [[ $DRY_RUN == 1 ]]; then
    run "${start[@]}"
    comment "3. fail-fast: as soon as one worker reports a non-zero status, stop every worker:"
    run "${SSH[@]}" --command="$(stop_script 10)"
    return
  fi

  mkdir -p "$run_dir"
  note "run $RUN_ID; per-worker logs in $run_dir"
  trap 'note "interrupted: training goes on on the workers; follow it with: $PROG logs $RUN_ID; end it with: $PROG stop"; exit 130' INT
  printf '+ %s\n' "$(summary_cmd "${start[@]}")" >&2
  local status_re='^\[worker ([0-9]+)\] (.*)$' fail_re='^\[worker [0-9]+\] dks_jax: training exited with status [1-9]'
  local stop_cmd=("${SSH[@]}" --command="$(stop_script 10)")
  set +e
  "${start[@]}" 2>&1 | {
    failed=0
    while IFS= read -r line || [[ -n $line ]]; do
      printf '%s\n' "$line"
      if [[ $line =~ $status_re ]]; then
        printf '%s\n' "${BASH_REMATCH[2]}" >>"$run_dir/worker-${BASH_REMATCH[1]}.log"
      else
        printf '%s\n' "$line" >>"$run_dir/gcloud.log"
      fi
      if [[ $failed == 0 && $line =~ $fail_re ]]; then
        failed=1
        note "fail-fast: a worker failed; stopping the training on every worker"
        "${stop_cmd[@]}" >>"$run_dir/stop.log" 2>&1 &
      fi
    done
    wait
  }
  local rc=${PIPESTATUS[0]}
  set -e
  trap - INT
  if [[ $rc != 0 ]]; then
    note "run $RUN_ID failed (status $rc); per-worker logs in $run_dir"
    exit "$rc"
  fi
  note "run $RUN_ID finished on every worker; logs in $run_dir"
}

"cmd_$SUBCOMMAND"
