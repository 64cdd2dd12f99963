#!/usr/bin/env bash
# Train on this machine with NUM_RANKS DeepSpeed ranks (CPU ranks when there is no GPU).
#
#   launch/train_local.sh CONFIG.yaml [key.path=value ...]
#
# Env: NUM_RANKS (default 2), MASTER_PORT (default: a free port), OMP_NUM_THREADS (default 1),
#      MAX_RESTARTS (default 0: relaunch after a failure this many times), DRY_RUN=1 prints the command.
# A preempted job (SIGTERM/SIGINT to this script, the node launcher or a rank: every rank checkpoints and
# `preempted` is logged) exits 0 and is not relaunched; a bad config (exit 2) is not relaunched either.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_config "$@"
CONFIG="$1"; shift
JOB_CONFIG="$CONFIG"; JOB_ARGS=("$@")
NUM_RANKS="${NUM_RANKS:-2}"
MASTER_PORT="${MASTER_PORT:-$(free_port)}"
cd "$REPO_ROOT"
run_job deepspeed --num_gpus "$NUM_RANKS" --master_addr 127.0.0.1 --master_port "$MASTER_PORT" \
    --module npt_ds.train --config "$CONFIG" "$@"
