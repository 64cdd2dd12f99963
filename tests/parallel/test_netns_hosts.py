"""launch/netns_hosts.sh removes only what it created: a user's DIR and its files survive every failure."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "netns_hosts.sh"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "pdsh", "ssh-keygen"))
    or not Path("/usr/sbin/sshd").exists(),
    reason="needs root, iproute2, openssh-server and pdsh (make test installs them as root)")


def netns(cmd: str, path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), cmd, str(path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def namespaces() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


def test_a_non_empty_dir_it_did_not_make_is_refused_untouched(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("a user's work")
    (work / "id_ed25519").write_text("a user's key")  # a key file that already exists
    before = namespaces()
    proc = netns("up", work)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "not empty" in proc.stderr
    assert sorted(p.name for p in work.iterdir()) == ["id_ed25519", "notes.txt"]
    assert (work / "notes.txt").read_text() == "a user's work" and namespaces() == before


@pytest.mark.parametrize("existed", [False, True])
def test_a_failure_half_way_removes_only_what_up_made(tmp_path, existed):
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "keep.txt").write_text("beside DIR")
    target = parent / "hosts"
    if existed:
        target.mkdir()
    before = namespaces()
    proc = netns("up", target, NETNS_SUBNET="10.999.1")  # `ip addr add` fails after the keys and namespaces exist
    assert proc.returncode != 0 and "removing what it made" in proc.stderr
    assert namespaces() == before
    assert (parent / "keep.txt").read_text() == "beside DIR"
    if existed:
        assert target.is_dir() and not any(target.iterdir())  # the user's (empty) DIR stays
    else:
        assert not target.exists()  # made by `up`, so removed with everything in it


def test_down_refuses_a_dir_that_up_did_not_make(tmp_path):
    (tmp_path / "data.bin").write_text("x")
    proc = netns("down", tmp_path)
    assert proc.returncode == 2 and "nothing removed" in proc.stderr
    assert (tmp_path / "data.bin").exists()
