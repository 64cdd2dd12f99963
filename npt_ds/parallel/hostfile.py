"""Check a DeepSpeed hostfile (`host slots=N` per line) before a multi-node launch.

    python -m npt_ds.parallel.hostfile HOSTFILE [--num-nodes N] [--resolve]

Exits 0 and prints `host slots` pairs, or prints one line naming the problem and the fix, exit 2.
"""
from __future__ import annotations

import argparse
import re
import socket
import sys
from pathlib import Path

LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.\-]+)\s+slots=(?P<slots>\d+)\s*$")


class HostfileError(ValueError):
    pass


def parse_hostfile(path: str | Path) -> list[tuple[str, int]]:
    p = Path(path)
    if not p.is_file():
        raise HostfileError(f"hostfile {str(p)!r} not found; copy launch/hostfile.example and list one "
                            "'host slots=N' per node")
    hosts: list[tuple[str, int]] = []
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = LINE.match(line)
        if not m:
            raise HostfileError(f"hostfile {p}:{n}: {raw.strip()!r} is not 'host slots=N'")
        host, slots = m["host"], int(m["slots"])
        if slots < 1:
            raise HostfileError(f"hostfile {p}:{n}: host {host!r} has slots=0; give it at least one slot or remove it")
        if any(h == host for h, _ in hosts):
            raise HostfileError(f"hostfile {p}:{n}: host {host!r} is listed twice; keep one line per host")
        hosts.append((host, slots))
    if not hosts:
        raise HostfileError(f"hostfile {p} lists no hosts; add one 'host slots=N' line per node")
    return hosts


def check_hostfile(path: str | Path, num_nodes: int | None = None, resolve: bool = False) -> list[tuple[str, int]]:
    hosts = parse_hostfile(path)
    if num_nodes is not None and num_nodes > len(hosts):
        raise HostfileError(f"NUM_NODES={num_nodes} but hostfile {path} lists only {len(hosts)} host(s): "
                            f"{', '.join(h for h, _ in hosts)}; add the missing host(s) or lower NUM_NODES")
    if resolve:
        for host, _ in hosts[: num_nodes or len(hosts)]:
            try:
                socket.getaddrinfo(host, None)
            except OSError:
                raise HostfileError(f"hostfile {path}: host {host!r} does not resolve; add it to /etc/hosts or DNS, "
                                    "or fix its line") from None
    return hosts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m npt_ds.parallel.hostfile", description=__doc__.splitlines()[0])
    parser.add_argument("hostfile")
    parser.add_argument("--num-nodes", type=int)
    parser.add_argument("--resolve", action="store_true", help="check that every host name resolves")
    args = parser.parse_args(argv)
    try:
        hosts = check_hostfile(args.hostfile, args.num_nodes, args.resolve)
    except HostfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for host, slots in hosts:
        print(host, slots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
