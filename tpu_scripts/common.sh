#!/usr/bin/env bash
# Shared by the tpu_scripts (sourced, not run): common flags, required-value checks, a dry-run-aware runner.
# Every flag also reads an environment variable: --name TPU_NAME, --zone ZONE, --project PROJECT.

DRY_RUN="${DRY_RUN:-0}"
TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
REMOTE_DIR="${REMOTE_DIR:-exrl}"  # checkout directory on each worker, relative to $HOME

COMMON_USAGE="common flags (or environment variables):
  --name NAME        TPU VM / pod slice name      (TPU_NAME)
  --zone ZONE        e.g. us-west4-a              (ZONE)
  --project PROJECT  GCP project id               (PROJECT)
  --remote-dir DIR   checkout dir on each worker, under \$HOME (REMOTE_DIR, default exrl)
  --dry-run          print the commands instead of running them (DRY_RUN=1)
  -h, --help         this text"

# parse_common FLAG [VALUE]: takes one common flag; sets SHIFT to the words used (0: not a common flag).
parse_common() {
  SHIFT=0
  case "$1" in
    --name|--zone|--project|--remote-dir)
      if [[ $# -lt 2 || "$2" == --* ]]; then die "$1 needs a value"; fi
      case "$1" in
        --name) TPU_NAME="$2" ;; --zone) ZONE="$2" ;; --project) PROJECT="$2" ;; --remote-dir) REMOTE_DIR="$2" ;;
      esac
      SHIFT=2 ;;
    --dry-run) DRY_RUN=1; SHIFT=1 ;;
    -h|--help) usage; exit 0 ;;
  esac
}

die() { echo "$(basename "$0"): $*" >&2; echo "run '$(basename "$0") --help' for usage" >&2; exit 2; }

require() {  # require VAR...: each must be non-empty
  local v
  for v in "$@"; do
    if [[ -z "${!v}" ]]; then die "missing $v: pass its flag or set the environment variable"; fi
  done
}

# run CMD ARGS...: execute, or with --dry-run print one shell-quoted line (re-runnable by copy and paste).
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

# tpu_ssh WORKER REMOTE_COMMAND: one command on one worker (0, 1, ...) or on all of them (all).
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" --worker="$1" --command "$2"
}
