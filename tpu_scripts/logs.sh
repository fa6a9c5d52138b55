#!/usr/bin/env bash
# Tail a run's log on one worker (or all of them).
set -euo pipefail
usage() {
  cat <<USAGE
usage: logs.sh --name NAME --zone ZONE --project PROJECT [--worker W] [--log LOG] [--lines N] [--no-follow] [--dry-run]
Show the last N lines of ~/REMOTE_DIR/logs/LOG.log and keep following it.
  --worker W    worker index, or all (default 0: process 0 writes the metrics)
  --log LOG     the --log given to launch.sh (default run)
  --lines N     lines of history (default 100)
  --no-follow   print and exit instead of following
$COMMON_USAGE
USAGE
}
source "$(dirname "$0")/common.sh"
WORKER=0
LOG=run
LINES=100
FOLLOW=-f
while [[ $# -gt 0 ]]; do
  parse_common "$@"
  if [[ $SHIFT -gt 0 ]]; then shift "$SHIFT"; continue; fi
  case "$1" in
    --worker) [[ $# -ge 2 ]] || die "--worker needs a value"; WORKER="$2"; shift 2 ;;
    --log) [[ $# -ge 2 ]] || die "--log needs a value"; LOG="$2"; shift 2 ;;
    --lines) [[ $# -ge 2 ]] || die "--lines needs a value"; LINES="$2"; shift 2 ;;
    --no-follow) FOLLOW=""; shift ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[[ "$WORKER" =~ ^([0-9]+|all)$ ]] || die "--worker '$WORKER' must be a worker index or all"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines '$LINES' must be a number"
[[ "$LOG" =~ ^[A-Za-z0-9._-]+$ ]] || die "--log '$LOG' must be a plain file name"
require TPU_NAME ZONE PROJECT
tpu_ssh "$WORKER" "tail -n $LINES $FOLLOW ~/$REMOTE_DIR/logs/$LOG.log"
