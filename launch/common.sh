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

run_job() {  # run a launch command; after a failure relaunch it up to MAX_RESTARTS times (resume: auto continues
  #            from the last good checkpoint; the trainer logs a `restart` event with NPT_DS_RESTART = the attempt)
  local attempt=0 rc
  while true; do
    export NPT_DS_RESTART="$attempt"
    if [[ -n "${BEFORE_ATTEMPT:-}" ]]; then "$BEFORE_ATTEMPT"; fi
    set +e; run "$@"; rc=$?; set -e
    sweep_shm
    if [[ $rc -eq 0 ]]; then return 0; fi
    if (( attempt >= ${MAX_RESTARTS:-0} )); then
      echo "npt-ds: the job failed (exit $rc)${MAX_RESTARTS:+ after $attempt restart(s)}" >&2
      return "$rc"
    fi
    attempt=$((attempt + 1))
    echo "npt-ds: the job failed (exit $rc); restart $attempt of $MAX_RESTARTS from the last checkpoint" >&2
  done
}
