# shellcheck shell=bash
# Shell code shared by the launch scripts (tpu_pod.sh, slurm_gpu.sh, gpu_host.sh). Each sources it
# right after 'set -euo pipefail', by a path relative to the script itself:
#   SCRIPT_DIR=$(CDPATH='' cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
#   source "$SCRIPT_DIR/lib.sh"
# It runs nothing: it sets the settings every launcher has and defines helpers. bash 3.2+ (macOS):
# no associative arrays, and an array that may be empty is expanded as ${A[@]+"${A[@]}"}.

# Settings every launcher has (environment first, flags override; see parse_args).
PROG=${0##*/}
REPO=${DKS_REPO:-$(cd "$SCRIPT_DIR/.." && pwd)}
DRY_RUN=0
ENVS=()       # --env KEY=VALUE, in order
POSITIONAL=() # the arguments that are not options

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

note() { printf '%s: %s\n' "$PROG" "$*" >&2; }

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

# Status 0 when $1 is one of the other arguments.
one_of() {
  local word=$1 choice
  shift
  for choice in "$@"; do
    if [[ $word == "$choice" ]]; then return 0; fi
  done
  return 1
}

# UTC time for file and run names, e.g. 20250131-235959.
utc_stamp() { date -u +%Y%m%d-%H%M%S; }

# ---------------------------------------------------------------------------------------------
# Command line: parse_args "$@". Options and arguments come in any order. An option that takes a
# value is written '--opt VALUE' or '--opt=VALUE'; a VALUE that looks like an option means the
# value was forgotten, except for the options in RAW_VALUE_OPTS (their values are flags for
# another program). '--' ends the options. Handled here, the same in every launcher:
#   --repo DIR (REPO), --env KEY=VALUE (ENVS), --log-dir DIR (LOG_DIR), --dry-run (DRY_RUN=1),
#   -h/--help (usage, then exit).
# The script defines the rest:
#   VALUE_OPTS=(...)      its options that take a value; set_option OPT VALUE stores one
#   FLAG_OPTS=(...)       its options that take none; set_flag OPT stores one
#   RAW_VALUE_OPTS=(...)  (optional) see above
#   usage                 prints the help
# and may redefine, after sourcing this file, what is done with the other arguments:
#   add_argument ARG      an argument that is not an option (default: append it to POSITIONAL)
#   is_override           status 0 when an unknown option is an override for dks_jax.main
#                         (default: once CONFIG and WORKDIR are in POSITIONAL); otherwise it is
#                         an error
add_argument() { POSITIONAL+=("$1"); }
is_override() { [[ ${#POSITIONAL[@]} -ge 2 ]]; }

parse_args() {
  local arg val has_val
  while [[ $# -gt 0 ]]; do
    arg=$1
    val=''
    has_val=0
    if [[ $arg == --*=* ]]; then
      val=${arg#*=}
      arg=${arg%%=*}
      has_val=1
    fi
    if one_of "$arg" --repo --env --log-dir ${VALUE_OPTS[@]+"${VALUE_OPTS[@]}"}; then
      if [[ $has_val == 0 ]]; then
        [[ $# -ge 2 ]] || die "option $arg needs a value"
        [[ $2 != --* ]] || one_of "$arg" ${RAW_VALUE_OPTS[@]+"${RAW_VALUE_OPTS[@]}"} ||
          die "option $arg needs a value"
        val=$2
        shift
      fi
      # shellcheck disable=SC2034  # LOG_DIR: used by the script
      case $arg in
        --repo) REPO=$val ;;
        --env) ENVS+=("$val") ;;
        --log-dir) LOG_DIR=$val ;;
        *) set_option "$arg" "$val" ;;
      esac
      shift
      continue
    fi
    if [[ $has_val == 1 ]] && one_of "$arg" --dry-run --help ${FLAG_OPTS[@]+"${FLAG_OPTS[@]}"}; then
      die "option $arg takes no value"
    fi
    # shellcheck disable=SC2034  # DRY_RUN: used by the script
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
        if one_of "$arg" ${FLAG_OPTS[@]+"${FLAG_OPTS[@]}"}; then
          set_flag "$arg"
        else
          is_override || die "unknown option: $1"
          POSITIONAL+=("$1")
        fi
        ;;
      *) add_argument "$1" ;;
    esac
    shift
  done
}

# ---------------------------------------------------------------------------------------------
# Checks and names shared by the launchers.

# CONFIG WORKDIR [overrides...] from POSITIONAL ($1: the error when there are fewer than two):
# sets CONFIG, WORKDIR, OVERRIDES and CONFIG_NAME (configs/imagenet_resnet50.py:dks gives
# imagenet_resnet50), and checks that CONFIG is a file of the repository (or an absolute path).
run_args() {
  [[ ${#POSITIONAL[@]} -ge 2 ]] || die "$1"
  CONFIG=${POSITIONAL[0]}
  WORKDIR=${POSITIONAL[1]}
  OVERRIDES=("${POSITIONAL[@]:2}")
  CONFIG_NAME=${CONFIG%%:*}
  CONFIG_NAME=${CONFIG_NAME##*/}
  CONFIG_NAME=${CONFIG_NAME%.py}
  [[ -n $CONFIG && -n $WORKDIR ]] || die "CONFIG and WORKDIR must not be empty"
  [[ $CONFIG == /* || -f $REPO/${CONFIG%%:*} ]] ||
    die "config file not found: $REPO/${CONFIG%%:*} (CONFIG is relative to the repository root)"
}

# The overrides are passed to dks_jax.main unchanged: every one must be a flag.
check_overrides() {
  local o
  if [[ ${#OVERRIDES[@]} -gt 0 ]]; then
    for o in "${OVERRIDES[@]}"; do
      [[ $o == --?* ]] || die "override '$o' is not a flag: write overrides as --config.field=value"
    done
  fi
}

check_envs() {
  local kv
  if [[ ${#ENVS[@]} -gt 0 ]]; then
    for kv in "${ENVS[@]}"; do
      [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got '$kv'"
    done
  fi
}

# The --env settings as lines of sh, each after a newline: '\nexport KEY=VALUE' (VALUE quoted).
export_lines() {
  local kv
  if [[ ${#ENVS[@]} -gt 0 ]]; then
    for kv in "${ENVS[@]}"; do
      printf '\nexport %s=%s' "${kv%%=*}" "$(shquote "${kv#*=}")"
    done
  fi
}

# Run ids name log files: letters, digits, . _ -, starting with a letter or digit.
is_run_id() { [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; }

check_run_id() { is_run_id "$RUN_ID" || die "bad --run-id '$RUN_ID' (letters, digits, . _ -)"; }
