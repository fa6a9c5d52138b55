#!/usr/bin/env bash
# Copy a run directory (checkpoints, metrics) between the workers and a Cloud Storage bucket.
set -euo pipefail
usage() {
  cat <<USAGE
usage: ckpt.sh push|pull --run RUN_DIR --bucket gs://BUCKET/PATH --name NAME --zone ZONE --project PROJECT [--dry-run]
  push   every worker copies ~/REMOTE_DIR/RUN_DIR to the bucket (each host holds its own checkpoint shards)
  pull   every worker copies the bucket back into ~/REMOTE_DIR/RUN_DIR (then relaunch to resume)
  --run RUN_DIR    run directory relative to the checkout, e.g. runs/grpo
  --bucket URL     gs:// destination/source
  --local          copy between this machine's RUN_DIR and the bucket instead of the workers
$COMMON_USAGE
USAGE
}
source "$(dirname "$0")/common.sh"
[[ $# -gt 0 ]] || { usage >&2; exit 2; }
MODE="$1"
case "$MODE" in push|pull) shift ;; -h|--help) usage; exit 0 ;; *) die "first argument must be push or pull, got '$MODE'" ;; esac
RUN=""
BUCKET=""
LOCAL=0
while [[ $# -gt 0 ]]; do
  parse_common "$@"
  if [[ $SHIFT -gt 0 ]]; then shift "$SHIFT"; continue; fi
  case "$1" in
    --run) [[ $# -ge 2 ]] || die "--run needs a value"; RUN="${2%/}"; shift 2 ;;
    --bucket) [[ $# -ge 2 ]] || die "--bucket needs a value"; BUCKET="${2%/}"; shift 2 ;;
    --local) LOCAL=1; shift ;;
    *) die "unknown argument '$1'" ;;
  esac
done
require RUN BUCKET
[[ "$BUCKET" == gs://* ]] || die "--bucket '$BUCKET' must start with gs://"
[[ "$RUN" != /* && "$RUN" != *..* ]] || die "--run '$RUN' must be a path inside the checkout"
if [[ "$MODE" == push ]]; then src="$RUN"; dst="$BUCKET/$(basename "$RUN")"; else src="$BUCKET/$(basename "$RUN")"; dst="$RUN"; fi
if [[ $LOCAL == 1 ]]; then
  [[ "$MODE" == push ]] || run mkdir -p "$dst"
  run gcloud storage rsync --recursive "$src" "$dst"
else
  require TPU_NAME ZONE PROJECT
  tpu_ssh all "cd ~/$REMOTE_DIR && mkdir -p $RUN && gcloud storage rsync --recursive $src $dst"
fi
