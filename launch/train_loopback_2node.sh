#!/usr/bin/env bash
# Two simulated nodes on this machine: one DeepSpeed launcher per "node", --no_ssh, loopback only.
# Exercises the multi-node code path (node ranks, hostfile, rendezvous) without other machines.
#
#   launch/train_loopback_2node.sh CONFIG.yaml [key.path=value ...]
#
# Env: SLOTS_PER_NODE (default 1), MASTER_PORT (default: a free port), DRY_RUN=1 prints the commands.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_config "$@"
CONFIG="$1"; shift
SLOTS="${SLOTS_PER_NODE:-1}"
MASTER_PORT="${MASTER_PORT:-$(free_port)}"
HOSTFILE="$(mktemp -t npt-hostfile.XXXXXX)"
trap 'rm -f "$HOSTFILE"' EXIT
printf 'nodeA slots=%s\nnodeB slots=%s\n' "$SLOTS" "$SLOTS" > "$HOSTFILE"
"$PYTHON" -m npt_ds.parallel.hostfile "$HOSTFILE" --num-nodes 2 >/dev/null
cd "$REPO_ROOT"
pids=()
for node_rank in 1 0; do
  run deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$node_rank" --num_nodes 2 \
      --master_addr 127.0.0.1 --master_port "$MASTER_PORT" \
      --module npt_ds.train --config "$CONFIG" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
