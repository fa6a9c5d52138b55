#!/usr/bin/env bash
# Create a TPU VM or pod slice.
set -euo pipefail
usage() {
  cat <<USAGE
usage: create.sh --name NAME --zone ZONE --project PROJECT --accelerator TYPE [--version V] [--spot] [--dry-run]
Create a TPU VM (single host, e.g. v5litepod-8) or a pod slice (multi-host, e.g. v5litepod-64, v4-64).
  --accelerator TYPE  accelerator type (ACCELERATOR)
  --version V         TPU software image (VERSION, default v2-alpha-tpuv5-lite; v4 wants tpu-ubuntu2204-base)
  --spot              a preemptible (spot) slice
$COMMON_USAGE
USAGE
}
source "$(dirname "$0")/common.sh"
ACCELERATOR="${ACCELERATOR:-}"
VERSION="${VERSION:-v2-alpha-tpuv5-lite}"
SPOT=()
while [[ $# -gt 0 ]]; do
  parse_common "$@"
  if [[ $SHIFT -gt 0 ]]; then shift "$SHIFT"; continue; fi
  case "$1" in
    --accelerator) [[ $# -ge 2 ]] || die "--accelerator needs a value"; ACCELERATOR="$2"; shift 2 ;;
    --version) [[ $# -ge 2 ]] || die "--version needs a value"; VERSION="$2"; shift 2 ;;
    --spot) SPOT=(--spot); shift ;;
    *) die "unknown argument '$1'" ;;
  esac
done
require TPU_NAME ZONE PROJECT ACCELERATOR
run gcloud compute tpus tpu-vm create "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" \
  --accelerator-type "$ACCELERATOR" --version "$VERSION" ${SPOT[@]+"${SPOT[@]}"}
