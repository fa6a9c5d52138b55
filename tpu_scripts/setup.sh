#!/usr/bin/env bash
# Copy this checkout to every worker of the TPU VM and install exrl with the TPU extra.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
root="$(cd "$(dirname "$0")/.." && pwd)"
tar -C "$root" --exclude runs --exclude .git -czf /tmp/exrl.tgz .
gcloud compute tpus tpu-vm scp /tmp/exrl.tgz "$TPU_NAME":~/exrl.tgz --worker=all --project "$PROJECT" --zone "$ZONE"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --project "$PROJECT" --zone "$ZONE" --command \
  'mkdir -p ~/exrl && tar -xzf ~/exrl.tgz -C ~/exrl && cd ~/exrl && pip install -e ".[tpu]"'
