"""Before a multi-node launch: the environment every node needs, kept off command lines, and an ssh check of every host.

    python -m npt_ds.parallel.cluster env FILE            # write the managed block of FILE (.deepspeed_env) and
                                                          # the sealed file beside it; print the names to unset
    python -m npt_ds.parallel.cluster preflight HOST ... --repo DIR --python EXE [--ssh-config F]

DeepSpeed's pdsh runner starts every rank (on the first node too) through one pdsh command line that begins with
`export K="V";` for each variable of the launching shell named PYTHON*, MLFLOW*, MV2*, UCX* or NCCL* and each line
of `.deepspeed_env` (in ~ and in the launch dir): the runner logs that line and `ps` shows it on every node, and the
remote shell expands `$`, backticks and quotes inside the double quotes.  So `env` splits what the ranks need
(offline hub flags, WANDB_*, HF_TOKEN, OMP_NUM_THREADS, TORCH_EXTENSIONS_DIR, PATH/VIRTUAL_ENV/PYTHONPATH,
NCCL_*/GLOO_* socket settings, NPT_DS_*):
* plain values go into a block of `.deepspeed_env` between two marker lines (NPT_DS_ENV_BEGIN=... /
  NPT_DS_ENV_END=1: DeepSpeed takes every line for KEY=VALUE, comments included), other lines kept as they were;
* secrets (WANDB_API_KEY and any name ending in _KEY, _TOKEN, _SECRET or _PASSWORD) and values the remote shell
  would change go into the *sealed* file beside it (JSON, mode 0600, git-ignored), named by the non-secret
  NPT_DS_SEALED_ENV in the block; each rank reads it at start (:func:`load_sealed_env`), byte for byte;
* their names are printed, and the launch script removes them from the runner's environment.
A secret in a line of `~/.deepspeed_env` or of the launch dir's file outside our block is refused in one line.

`preflight` runs `ssh HOST` on every host at once (BatchMode, 5 s connect timeout) and checks that the
repo dir and the Python interpreter exist there; each failing host gets one line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..config import ConfigError

# DeepSpeed reads every line as KEY=VALUE (a comment line breaks its launcher), so the markers are variables too
BEGIN, END = "NPT_DS_ENV_BEGIN=written-by-launch/train_multinode.sh", "NPT_DS_ENV_END=1"
NAMES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_TOKEN", "OMP_NUM_THREADS",
         "TOKENIZERS_PARALLELISM", "TORCH_EXTENSIONS_DIR", "PATH", "VIRTUAL_ENV", "PYTHONPATH",
         "CUDA_DEVICE_MAX_CONNECTIONS")
PREFIXES = ("WANDB_", "NCCL_", "GLOO_", "TP_SOCKET_", "NPT_DS_")
DEEPSPEED_EXPORTS = ("PYTHON", "MLFLOW", "MV2", "UCX", "NCCL")  # the runner copies these onto its command line
SECRET_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
SEALED_FILE, SEALED_VAR = ".npt_ds_sealed_env", "NPT_DS_SEALED_ENV"


def is_secret(name: str) -> bool:
    return name == "WANDB_API_KEY" or name.upper().endswith(SECRET_SUFFIXES)


def shell_safe(value: str) -> bool:
    """Whether `export K="value";` gives a remote shell `value` unchanged (DeepSpeed strips it and double-quotes
    it when it holds anything but word characters and @%+=:,./-)."""
    return value == value.strip() and not any(c in value for c in '$`"\\\n')


def run_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of `env` (default: this process's) that the remote ranks need, and the launching shell's
    variables DeepSpeed's runner would put on the command line by itself."""
    env = dict(os.environ if env is None else env)
    return {k: v for k, v in sorted(env.items()) if k in NAMES or k.startswith(PREFIXES + DEEPSPEED_EXPORTS)}


def split_environment(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(plain, sealed): what may go on a command line, and secrets plus values a shell would change."""
    sealed = {k: v for k, v in env.items() if is_secret(k) or not shell_safe(v)}
    return {k: v for k, v in env.items() if k not in sealed}, sealed


def write_sealed_env(path: str | Path, variables: dict[str, str]) -> Path:
    """The sealed file: JSON (exact bytes, any character), mode 0600 from its creation, replaced atomically."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(variables, f)
    os.replace(tmp, path)
    return path


def load_sealed_env(environ: dict | None = None) -> list[str]:
    """At a rank's start: the variables of the sealed file that NPT_DS_SEALED_ENV names, set where unset.
    -> their names.  A named file that is missing is a one-line error."""
    environ = os.environ if environ is None else environ
    name = environ.get(SEALED_VAR)
    if not name:
        return []
    try:
        variables = json.loads(Path(name).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{SEALED_VAR}: cannot read {name} ({type(exc).__name__}); the launch script writes it "
                          "beside .deepspeed_env: the repo dir must be at the same path on every node") from None
    for key, value in variables.items():
        environ.setdefault(key, value)
    return sorted(variables)


def refuse_exposed_lines(paths: list[Path]) -> None:
    """A secret (or a value a shell would change) in a `.deepspeed_env` line outside our block would go onto
    the pdsh command line: one-line ConfigError naming the file, the line and the variable."""
    for path in paths:
        if not path.is_file():
            continue
        inside = False
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line in (BEGIN, END):
                inside = line == BEGIN
                continue
            key, sep, value = line.partition("=")
            if inside or not sep:
                continue
            if is_secret(key.strip()) or not shell_safe(value.strip()):
                raise ConfigError(f"{path}:{n}: {key.strip()} would go onto the pdsh command line DeepSpeed's runner "
                                  "logs and ps shows on every node; remove the line and export the variable in the "
                                  "launching shell instead (launch/train_multinode.sh hands it to the ranks in a "
                                  "0600 file)")


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
    env = sub.add_parser("env", help="write the npt-ds block of a .deepspeed_env file and the sealed file beside "
                                     "it; print the names to unset for DeepSpeed's runner")
    env.add_argument("file")
    pre = sub.add_parser("preflight", help="check every host over ssh before launching")
    pre.add_argument("hosts", nargs="+")
    pre.add_argument("--repo", required=True)
    pre.add_argument("--python", required=True)
    pre.add_argument("--ssh-config", default=None)
    args = parser.parse_args(argv)
    if args.command == "env":
        target = Path(args.file)
        try:
            refuse_exposed_lines([Path.home() / os.environ.get("DS_ENV_FILE", ".deepspeed_env"), target])
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        plain, sealed = split_environment(run_environment())
        sealed_path = write_sealed_env(target.with_name(SEALED_FILE), sealed)
        write_deepspeed_env(target, {**{k: v for k, v in plain.items() if k != SEALED_VAR},
                                     SEALED_VAR: str(sealed_path.resolve())})
        print("\n".join(sealed))  # the launch script unsets these for DeepSpeed's runner
        return 0
    problems = preflight(args.hosts, args.repo, args.python, args.ssh_config)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
