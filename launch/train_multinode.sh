#!/usr/bin/env bash
# Multi-node training from a hostfile (DeepSpeed's pdsh/ssh launcher), run on the first node.
#
#   HOSTFILE=launch/hostfile NUM_NODES=2 GPUS_PER_NODE=8 MASTER_ADDR=node-01 \
#     launch/train_multinode.sh configs/llama3_8b_multinode.yaml [key.path=value ...]
#
# Env: HOSTFILE (default launch/hostfile), NUM_NODES (default: all hosts in the file), GPUS_PER_NODE
#      (default: the slots in the file), MASTER_ADDR (default: the first host), MASTER_PORT (default 29500),
#      SSH_CONFIG (an ssh config file for ssh and pdsh, e.g. the one launch/netns_hosts.sh writes),
#      MAX_RESTARTS (default 0: relaunch after a failure this many times, resuming from the last checkpoint),
#      DRY_RUN=1 prints the command.
# Before launching: every host must answer password-less ssh and see this repo and this Python at the same
# paths (one line per failing host, exit 2, nothing started).  The variables the ranks need are written to
# the npt-ds block of $REPO_ROOT/.deepspeed_env (git-ignored; your own lines there are kept); secrets (WANDB_API_KEY,
# *_KEY, *_TOKEN, *_SECRET, *_PASSWORD) and values with $ ` " \ go to $REPO_ROOT/.npt_ds_sealed_env (0600) instead,
# which every rank reads at start, and are unset for DeepSpeed's runner: none appears on a command line or in a log.
# A preempted job (SIGTERM to this script, the runner, a node launcher or a rank) exits 0 with no relaunch.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_config "$@"
CONFIG="$1"; shift
JOB_CONFIG="$CONFIG"; JOB_ARGS=("$@")
HOSTFILE="${HOSTFILE:-$LAUNCH_DIR/hostfile}"
HOSTS="$("$PYTHON" -m npt_ds.parallel.hostfile "$HOSTFILE" ${NUM_NODES:+--num-nodes "$NUM_NODES"} --resolve)" || exit 2
NUM_NODES="${NUM_NODES:-$(echo "$HOSTS" | wc -l)}"
MASTER_ADDR="${MASTER_ADDR:-$(echo "$HOSTS" | head -1 | cut -d' ' -f1)}"
MASTER_PORT="${MASTER_PORT:-29500}"
PYTHON_EXE="$("$PYTHON" -c 'import sys; print(sys.executable)')"
cd "$REPO_ROOT"
if [[ "${DRY_RUN:-0}" != "1" ]]; then
  # shellcheck disable=SC2046
  "$PYTHON" -m npt_ds.parallel.cluster preflight $(echo "$HOSTS" | head -n "$NUM_NODES" | cut -d' ' -f1) \
      --repo "$REPO_ROOT" --python "$PYTHON_EXE" ${SSH_CONFIG:+--ssh-config "$SSH_CONFIG"} || exit 2
fi
export PATH="$(dirname "$PYTHON_EXE"):$PATH"
if [[ -n "${SSH_CONFIG:-}" ]]; then export PDSH_SSH_ARGS_APPEND="${PDSH_SSH_ARGS_APPEND:-} -F $SSH_CONFIG"; fi
write_env() {  # per attempt (NPT_DS_RESTART); secrets and values a shell would change go to a 0600 file instead
  "$PYTHON" -m npt_ds.parallel.cluster env "$REPO_ROOT/.deepspeed_env" >/dev/null
}
# ... and out of DeepSpeed's runner's environment, which it copies onto the pdsh command line (PYTHON*, NCCL*, ...)
SEALED=()
while IFS= read -r name; do [[ -n "$name" ]] && SEALED+=(-u "$name"); done \
    < <("$PYTHON" -m npt_ds.parallel.cluster env "$REPO_ROOT/.deepspeed_env" || echo "__npt_ds_env_failed__")
if [[ " ${SEALED[*]} " == *" -u __npt_ds_env_failed__ "* ]]; then exit 2; fi
BEFORE_ATTEMPT=write_env
run_job env "${SEALED[@]}" deepspeed --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" ${GPUS_PER_NODE:+--num_gpus "$GPUS_PER_NODE"} \
    --no_ssh_check --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --module npt_ds.train --config "$CONFIG" "$@"
