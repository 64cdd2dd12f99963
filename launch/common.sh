# Shared helpers for launch/*.sh (sourced, not run).
set -euo pipefail
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # one thread per rank: oversubscription on small CPUs is 5x slower
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

# DeepSpeed compiles its shm_comm op once per torch build; a cache per interpreter keeps checkouts
# with different venvs from rebuilding each other's copy on every launch (40-90 s each).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions/venv-$("$PYTHON" -c 'import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])')}"

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

need_config() {
  if [[ $# -lt 1 || ! -f "$1" ]]; then
    echo "error: config '${1:-}' not found; usage: ${SCRIPT_NAME:-$0} CONFIG.yaml [key.path=value ...]" >&2
    exit 2
  fi
}

run() {  # print, and execute unless DRY_RUN=1
  echo "+ $*" >&2
  if [[ "${DRY_RUN:-0}" != "1" ]]; then "$@"; fi
}

sweep_shm() {  # DeepSpeed's CPU shm all-reduce buffers of this job's port (a killed rank leaves its 69 MB behind)
  rm -f /dev/shm/deepspeed_allreduce_buffer_"$(id -u)"_*_"${MASTER_PORT:-none}"_* 2>/dev/null || true
}

PREEMPT_GRACE_S="${PREEMPT_GRACE_S:-45}"  # DeepSpeed's launcher gives ranks 30 s after a SIGTERM; then some slack

run_job() {  # run a launch command; after a failure relaunch it up to MAX_RESTARTS times (resume: auto continues
  #            from the last good checkpoint; the trainer logs a `restart` event with NPT_DS_RESTART = the attempt).
  #            A job that ended on purpose -- preempted (every rank saved and `preempted` is logged), stopped or
  #            finished -- ends the script with 0 and no relaunch, whichever process got the signal: a rank, the
  #            node launcher (it exits 1 after forwarding it), the pdsh runner, or this script (it forwards
  #            SIGTERM/SIGINT to the whole job and never relaunches after one).  Needs JOB_CONFIG and JOB_ARGS
  #            (the recipe and its overrides) to read the run's metric stream.
  local attempt=0 rc started
  SIGNALLED=""
  trap 'forward_signal TERM' TERM
  trap 'forward_signal INT' INT
  while true; do
    export NPT_DS_RESTART="$attempt"
    if [[ -n "${BEFORE_ATTEMPT:-}" ]]; then "$BEFORE_ATTEMPT"; fi
    started="$(date +%s.%N)"
    set +e; run_in_group "$@"; rc=$?; set -e
    sweep_shm
    if [[ $rc -eq 0 || "${DRY_RUN:-0}" == "1" ]]; then return 0; fi
    if [[ $rc -eq 2 ]]; then return 2; fi  # bad input, already said in one line: a relaunch would say it again
    if ended="$(job_outcome "$started")"; then
      echo "npt-ds: the job ended on purpose ($ended) although its launcher exited $rc; not relaunched" >&2
      return 0
    fi
    if [[ -n "$SIGNALLED" ]]; then
      echo "npt-ds: stopped by SIG$SIGNALLED (exit $rc); not relaunched" >&2
      return "$rc"
    fi
    if (( attempt >= ${MAX_RESTARTS:-0} )); then
      echo "npt-ds: the job failed (exit $rc)${MAX_RESTARTS:+ after $attempt restart(s)}" >&2
      return "$rc"
    fi
    attempt=$((attempt + 1))
    echo "npt-ds: the job failed (exit $rc); restart $attempt of $MAX_RESTARTS from the last checkpoint" >&2
  done
}

run_in_group() {  # print; unless DRY_RUN=1, run in a process group of its own and wait (signals are forwarded)
  echo "+ $*" >&2
  if [[ "${DRY_RUN:-0}" == "1" ]]; then return 0; fi
  setsid "$@" &
  JOB_PID=$!
  local rc=0
  while true; do
    wait "$JOB_PID"; rc=$?
    kill -0 "$JOB_PID" 2>/dev/null || break  # a forwarded signal interrupts `wait`; the job runs on
  done
  local i
  for i in $(seq 120); do  # the launcher may return before its orphans (ranks still saving) are gone
    kill -0 -- "-$JOB_PID" 2>/dev/null || break
    sleep 0.5
  done
  JOB_PID=""
  return "$rc"
}

forward_signal() {
  SIGNALLED="$1"
  if [[ -n "${JOB_PID:-}" ]]; then kill -s "$1" -- "-$JOB_PID" 2>/dev/null || true; fi
}

job_outcome() {  # the run-ending event of this attempt (waits for it: a runner may return before the ranks saved)
  "$PYTHON" -m npt_ds.train.outcome "$JOB_CONFIG" "${JOB_ARGS[@]}" --since "$1" --wait "$PREEMPT_GRACE_S"
}
