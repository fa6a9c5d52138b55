#!/usr/bin/env bash
# Create a TPU VM. Needs TPU_NAME, ZONE, ACCELERATOR (e.g. v5litepod-8), PROJECT; VERSION is optional.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR}" "${PROJECT:?set PROJECT}"
gcloud compute tpus tpu-vm create "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" \
  --accelerator-type "$ACCELERATOR" --version "${VERSION:-v2-alpha-tpuv5-lite}"
