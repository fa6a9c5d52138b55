#!/usr/bin/env bash
# Delete the TPU VM / pod slice (its disks and anything not pushed to a bucket are lost).
set -euo pipefail
usage() {
  cat <<USAGE
usage: teardown.sh --name NAME --zone ZONE --project PROJECT --yes [--dry-run]
Delete the TPU VM or pod slice. Push checkpoints first (ckpt.sh push). --yes is required unless --dry-run.
$COMMON_USAGE
USAGE
}
source "$(dirname "$0")/common.sh"
YES=0
while [[ $# -gt 0 ]]; do
  parse_common "$@"
  if [[ $SHIFT -gt 0 ]]; then shift "$SHIFT"; continue; fi
  case "$1" in
    --yes) YES=1; shift ;;
    *) die "unknown argument '$1'" ;;
  esac
done
require TPU_NAME ZONE PROJECT
[[ $YES == 1 || $DRY_RUN == 1 ]] || die "refusing to delete '$TPU_NAME' without --yes"
run gcloud compute tpus tpu-vm delete "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" --quiet
