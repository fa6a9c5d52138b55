#!/usr/bin/env bash
# Start the same command on every worker, in the background, logging to ~/REMOTE_DIR/logs/LOG.log.
set -euo pipefail
usage() {
  cat <<USAGE
usage: launch.sh --name NAME --zone ZONE --project PROJECT [--log LOG] [--env K=V ...] [--dry-run] -- COMMAND...
Run COMMAND (e.g. python -m experiments.grpo ...) on all workers at once, one process per host.
EXRL_DISTRIBUTED=1 is set, so the entry point calls exrl.infra.distributed.init(), which on a TPU pod
reads the coordinator, process count and id from the TPU metadata; every host then joins one global Mesh.
  --log LOG     log file name under ~/REMOTE_DIR/logs (default run; tail it with logs.sh --log LOG)
  --env K=V     extra environment variable for COMMAND (repeatable), e.g. --env XLA_FLAGS=...
$COMMON_USAGE
example: launch.sh --name exrl-v5e --zone us-west4-a --project p -- python -m experiments.grpo default --model /m
USAGE
}
source "$(dirname "$0")/common.sh"
LOG=run
ENVS=("EXRL_DISTRIBUTED=1")
while [[ $# -gt 0 ]]; do
  parse_common "$@"
  if [[ $SHIFT -gt 0 ]]; then shift "$SHIFT"; continue; fi
  case "$1" in
    --log) [[ $# -ge 2 ]] || die "--log needs a value"; LOG="$2"; shift 2 ;;
    --env) [[ $# -ge 2 && "$2" == *=* ]] || die "--env needs K=V"; ENVS+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (put the command after --)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no command given after --"
[[ "$LOG" =~ ^[A-Za-z0-9._-]+$ ]] || die "--log '$LOG' must be a plain file name"
require TPU_NAME ZONE PROJECT
cmd="$(printf '%q ' "$@")"
envs="$(printf '%q ' "${ENVS[@]}")"
tpu_ssh all "cd ~/$REMOTE_DIR && mkdir -p logs && env $envs nohup $cmd> logs/$LOG.log 2>&1 < /dev/null &"
