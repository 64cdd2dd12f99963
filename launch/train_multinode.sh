#!/usr/bin/env bash
# Multi-node training from a hostfile (DeepSpeed's pdsh/ssh launcher), run on the first node.
#
#   HOSTFILE=launch/hostfile NUM_NODES=2 GPUS_PER_NODE=8 MASTER_ADDR=node-01 \
#     launch/train_multinode.sh configs/llama3_8b_multinode.yaml [key.path=value ...]
#
# Env: HOSTFILE (default launch/hostfile), NUM_NODES (default: all hosts in the file), GPUS_PER_NODE
#      (default: the slots in the file), MASTER_ADDR (default: the first host), MASTER_PORT (default 29500),
#      DRY_RUN=1 prints the command. Every host must resolve and accept password-less ssh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_config "$@"
CONFIG="$1"; shift
HOSTFILE="${HOSTFILE:-$LAUNCH_DIR/hostfile}"
HOSTS="$("$PYTHON" -m npt_ds.hostfile "$HOSTFILE" ${NUM_NODES:+--num-nodes "$NUM_NODES"} --resolve)" || exit 2
NUM_NODES="${NUM_NODES:-$(echo "$HOSTS" | wc -l)}"
MASTER_ADDR="${MASTER_ADDR:-$(echo "$HOSTS" | head -1 | cut -d' ' -f1)}"
MASTER_PORT="${MASTER_PORT:-29500}"
cd "$REPO_ROOT"
run deepspeed --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" ${GPUS_PER_NODE:+--num_gpus "$GPUS_PER_NODE"} \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --module npt_ds.train --config "$CONFIG" "$@"
