#!/usr/bin/env bash
# Copy this checkout to every worker and install exrl there.
set -euo pipefail
usage() {
  cat <<USAGE
usage: setup.sh --name NAME --zone ZONE --project PROJECT [--extra tpu] [--dry-run]
Pack this checkout (without runs/ and .git), copy it to every worker of the TPU VM / pod slice, unpack it
into ~/REMOTE_DIR and pip install -e ".[EXTRA]" on each worker.
  --extra EXTRA   pip extra to install (default tpu: jax[tpu])
$COMMON_USAGE
USAGE
}
source "$(dirname "$0")/common.sh"
EXTRA="${EXTRA:-tpu}"
while [[ $# -gt 0 ]]; do
  parse_common "$@"
  if [[ $SHIFT -gt 0 ]]; then shift "$SHIFT"; continue; fi
  case "$1" in
    --extra) [[ $# -ge 2 ]] || die "--extra needs a value"; EXTRA="$2"; shift 2 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
require TPU_NAME ZONE PROJECT
root="$(cd "$(dirname "$0")/.." && pwd)"
tgz="${TMPDIR:-/tmp}/exrl-$TPU_NAME.tgz"
run tar -C "$root" --exclude ./runs --exclude ./.git -czf "$tgz" .
run gcloud compute tpus tpu-vm scp "$tgz" "$TPU_NAME:exrl.tgz" --project "$PROJECT" --zone "$ZONE" --worker=all
tpu_ssh all "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/exrl.tgz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR && pip install -q -e '.[$EXTRA]'"
