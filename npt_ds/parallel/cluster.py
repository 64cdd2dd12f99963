"""Before a multi-node launch: the environment every node needs, and an ssh check of every host.

    python -m npt_ds.parallel.cluster env FILE            # write the managed block of FILE (.deepspeed_env)
    python -m npt_ds.parallel.cluster preflight HOST ... --repo DIR --python EXE [--ssh-config F]

DeepSpeed's pdsh launcher exports only a few variable prefixes to the remote ranks, plus the KEY=VALUE lines
of `.deepspeed_env` (in ~ and in the launch dir).  `env` writes the variables a run needs (offline hub
flags, WANDB_*, OMP_NUM_THREADS, TORCH_EXTENSIONS_DIR, PATH/VIRTUAL_ENV/PYTHONPATH, NCCL_*/GLOO_* socket
settings, NPT_DS_*) into a block between two marker lines (NPT_DS_ENV_BEGIN=... / NPT_DS_ENV_END=1: DeepSpeed
takes every line for KEY=VALUE, comments included), leaving any other line of the file as it was;
the file is created 0600 (it may carry WANDB_API_KEY) and is git-ignored.

`preflight` runs `ssh HOST` on every host at once (BatchMode, 5 s connect timeout) and checks that the
repo dir and the Python interpreter exist there; each failing host gets one line, exit 2.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# DeepSpeed reads every line as KEY=VALUE (a comment line breaks its launcher), so the markers are variables too
BEGIN, END = "NPT_DS_ENV_BEGIN=written-by-launch/train_multinode.sh", "NPT_DS_ENV_END=1"
NAMES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "OMP_NUM_THREADS",
         "TOKENIZERS_PARALLELISM", "TORCH_EXTENSIONS_DIR", "PATH", "VIRTUAL_ENV", "PYTHONPATH",
         "CUDA_DEVICE_MAX_CONNECTIONS")
PREFIXES = ("WANDB_", "NCCL_", "GLOO_", "TP_SOCKET_", "NPT_DS_")


def run_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of `env` (default: this process's) that the remote ranks need."""
    env = dict(os.environ if env is None else env)
    return {k: v for k, v in sorted(env.items()) if (k in NAMES or k.startswith(PREFIXES)) and "\n" not in v}


def write_deepspeed_env(path: str | Path, variables: dict[str, str]) -> Path:
    """Replace the npt-ds block of `path` with `variables` (one KEY=VALUE per line); other lines stay.

    A user's own line for a key we would write wins: that key is left out of our block."""
    path = Path(path)
    old = path.read_text().splitlines() if path.is_file() else []
    mine, keep, inside = [], [], False
    for line in old:
        if line == BEGIN:
            inside = True
        elif line == END:
            inside = False
        elif not inside:
            keep.append(line)
    users = {m[1] for line in keep if (m := re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*)=", line))}
    mine = [f"{k}={v}" for k, v in variables.items() if k not in users]
    text = "\n".join([line for line in keep if line.strip()] + [BEGIN, *mine, END]) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def check_host(host: str, repo: str, python: str, ssh_config: str | None, timeout: float = 5.0) -> str | None:
    """None if `host` answers over ssh and has `repo` and `python`; else one line saying what is wrong."""
    cmd = ["ssh", *(["-F", ssh_config] if ssh_config else []), "-o", "BatchMode=yes", "-o",
           f"ConnectTimeout={int(timeout)}", host,
           f"test -d {repo} || echo no-repo; test -x {python} || echo no-python; echo reached"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        return f"host {host}: ssh did not answer within {timeout + 5:.0f} s; check that the host is up and sshd runs"
    out = proc.stdout.split()
    if "reached" not in out:
        reason = (proc.stderr.strip().splitlines() or [f"ssh exit {proc.returncode}"])[-1]
        return f"host {host}: not reachable over ssh ({reason}); set up password-less ssh (BatchMode) to it"
    if "no-repo" in out:
        return f"host {host}: has no {repo}; check out the repo at the same path on every node (or share it)"
    if "no-python" in out:
        return f"host {host}: has no {python}; create the venv at the same path on every node"
    return None


def preflight(hosts: list[str], repo: str, python: str, ssh_config: str | None = None) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(32, len(hosts) or 1)) as pool:
        results = pool.map(lambda h: check_host(h, repo, python, ssh_config), hosts)
    return [r for r in results if r]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m npt_ds.parallel.cluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="write the npt-ds block of a .deepspeed_env file")
    env.add_argument("file")
    pre = sub.add_parser("preflight", help="check every host over ssh before launching")
    pre.add_argument("hosts", nargs="+")
    pre.add_argument("--repo", required=True)
    pre.add_argument("--python", required=True)
    pre.add_argument("--ssh-config", default=None)
    args = parser.parse_args(argv)
    if args.command == "env":
        write_deepspeed_env(args.file, run_environment())
        return 0
    problems = preflight(args.hosts, args.repo, args.python, args.ssh_config)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
