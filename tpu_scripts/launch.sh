#!/usr/bin/env bash
# Run one command on every worker (same program per host; jax.distributed joins them on pods).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
cmd="${1:?usage: launch.sh 'python -m experiments.NAME ...'}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --project "$PROJECT" --zone "$ZONE" --command \
  "cd ~/exrl && EXRL_DISTRIBUTED=1 nohup $cmd > run.log 2>&1 &"
