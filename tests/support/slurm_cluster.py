"""A real two-node Slurm cluster on this machine, for the tests of launch/train_slurm.sbatch.

The two hosts are the network namespaces of ``launch/netns_hosts.sh`` (joined by a veth pair, 10.231.7.1 and .2).
Each runs a ``slurmd`` in its own UTS namespace, so each node has its own hostname (``nodea``, ``nodeb``) as Slurm
expects, and in a mount namespace of its own where NODE_LOCAL is that host's own disk (``DIR/local_a``, ``local_b``,
as for the sshd of netns_hosts.sh); ``slurmctld`` and ``munged`` (its socket on the shared filesystem) run in host a.  Everything -- the
munge key, ``slurm.conf``, spool and state dirs, logs -- lives under one directory that :meth:`SlurmCluster.stop`
removes after stopping the daemons.  Client commands (sbatch, scontrol, scancel) run in host a with SLURM_CONF.

Set-up (Slurm 22.05 and munge 0.5.15 from Debian 12, as root): ``SlurmUser=root``, ``ProctrackType=proctrack/pgid``,
``TaskPlugin=task/none``, no accounting, the cgroup plugin of the mounted hierarchy (slurmd loads one even with
proctrack/pgid), and ``cred_expire=5`` (a requeued job waits cred_expire + 1 s before it may start again; Slurm's
default is 120 s).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NETNS = REPO / "launch" / "netns_hosts.sh"
NODES = ("nodea", "nodeb")
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "scancel", "srun", "sinfo")


def unavailable() -> str | None:
    """None when this machine can run the cluster, else the reason (the tests skip with it)."""
    if os.geteuid() != 0:
        return "a Slurm cluster in network namespaces needs root (CAP_NET_ADMIN, SlurmUser=root)"
    missing = [t for t in (*DAEMONS, "ip", "unshare", "pdsh", "ssh") if not shutil.which(t)]
    if not Path("/usr/sbin/sshd").exists():
        missing.append("sshd")
    if missing:
        return f"{', '.join(missing)} not installed (make test installs slurmctld, slurmd, munge, openssh-server, pdsh)"
    probe = f"npt-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    uts = subprocess.run(["unshare", "--uts", "true"], capture_output=True, text=True)
    if uts.returncode:
        return f"cannot create a UTS namespace (each slurmd needs its own hostname): {uts.stderr.strip()}"
    return None


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.hosts_dir = root / "hosts"
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.hosts: dict[str, str] = {}

    # ---------------------------------------------------------------- life cycle
    def start(self, timeout: float = 30.0) -> None:
        up = subprocess.run(["bash", str(NETNS), "up", str(self.hosts_dir)], capture_output=True, text=True, timeout=60)
        if up.returncode:
            raise RuntimeError(f"netns_hosts.sh up failed: {up.stderr.strip()}")
        self.hosts = dict(item.split("=", 1) for item in up.stdout.split())
        subnet = self.hosts["MASTER_ADDR"].rsplit(".", 1)[0]
        munge = self.root / "munge"
        munge.mkdir()
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for node in NODES:
            (self.root / f"spool-{node}").mkdir()
        (self.root / "state").mkdir()
        cgroup = "cgroup/v2" if _fs_type("/sys/fs/cgroup") == "cgroup2fs" else "cgroup/v1"
        (self.root / "cgroup.conf").write_text(f"CgroupPlugin={cgroup}\n")
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=npt-test",
            f"SlurmctldHost={NODES[0]}({subnet}.1)",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge}/munge.sock,cred_expire=5",
            "ProctrackType=proctrack/pgid", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none", "MpiDefault=none", "ReturnToService=2",
            "SchedulerParameters=sched_interval=1",  # a requeued job starts as soon as it may
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd-%n.log",
            *(f"NodeName={node} NodeAddr={subnet}.{i + 1} CPUs=2 State=UNKNOWN" for i, node in enumerate(NODES)),
            f"PartitionName=main Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP", ""]))
        self._daemon(self.hosts["NETNS_A"], None, "munged", "--foreground", "--force", f"--key-file={key}",
                     f"--socket={munge}/munge.sock", f"--pid-file={munge}/munged.pid",
                     f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed")
        _wait_for(lambda: (munge / "munge.sock").exists(), 10, "munged did not create its socket")
        self._daemon(self.hosts["NETNS_A"], NODES[0], "slurmctld", "-D", "-f", str(self.conf))
        for side, node in zip("ab", NODES):  # each node's own disk at NODE_LOCAL, as netns_hosts.sh gives sshd
            self._daemon(self.hosts[f"NETNS_{side.upper()}"], node, "slurmd", "-D", "-f", str(self.conf),
                         local_disk=self.hosts_dir / f"local_{side}")
        _wait_for(lambda: self.node_states() == ["idle", "idle"], timeout,
                  lambda: f"the nodes did not come up ({self.node_states()}); see {self.root}/*.log")

    def _daemon(self, netns: str, hostname: str | None, *cmd: str, local_disk: Path | None = None) -> None:
        """Start a daemon in the foreground inside host `netns`; with `hostname` in a UTS namespace of its own
        (and with `local_disk` bind-mounted at NODE_LOCAL in a mount namespace of its own)."""
        argv = ["ip", "netns", "exec", netns]
        if hostname:
            setup = f"hostname {hostname}"
            if local_disk:
                setup = f"mount --bind '{local_disk}' '{self.hosts['NODE_LOCAL']}' && {setup}"
            argv += ["unshare", "--uts", *(["--mount", "--propagation", "private"] if local_disk else []),
                     "sh", "-c", f'{setup} && exec "$@"', "sh"]
        log = open(self.root / f"{cmd[0]}-{hostname or 'a'}.stderr", "w")
        self.procs.append(subprocess.Popen(argv + list(cmd), stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, "SLURM_CONF": str(self.conf)}))
        log.close()

    def stop(self) -> None:
        """Cancel every job, stop the daemons, remove the namespaces and every file of the cluster."""
        if self.conf.exists() and self.procs:
            self.run("scancel", "--full", "--user=root", check=False)
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.hosts_dir.exists():
            subprocess.run(["bash", str(NETNS), "down", str(self.hosts_dir)], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    # ---------------------------------------------------------------- clients
    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment without a launcher's rank variables (an in-process trainer test leaves
        RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 behind), with this cluster's SLURM_CONF."""
        clean = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
        return {**clean, "SLURM_CONF": str(self.conf), **extra}

    def run(self, *cmd: str, check: bool = True, env: dict | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess:
        """A command in host a (where slurmctld listens), with this cluster's SLURM_CONF."""
        proc = subprocess.run(["ip", "netns", "exec", self.hosts["NETNS_A"], *cmd], capture_output=True, text=True,
                              env=env or self.env(), timeout=timeout, cwd=REPO)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def node_states(self) -> list[str]:
        out = self.run("sinfo", "--noheader", "--Node", "--format=%T", check=False).stdout
        return sorted(s.strip().rstrip("*") for s in out.split())

    def sbatch(self, *args: str, env: dict) -> int:
        return int(self.run("sbatch", "--parsable", *args, env=env).stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (there is no accounting daemon, hence no sacct)."""
        out = self.run("scontrol", "--oneliner", "show", "job", str(job_id)).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job_id: int, timeout: float = 300) -> dict[str, str]:
        """Until the job has ended for good (a requeued job passes through PENDING again)."""
        done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
        _wait_for(lambda: self.job(job_id)["JobState"] in done, timeout,
                  lambda: f"job {job_id} did not end: {self.job(job_id)}")
        return self.job(job_id)


def _fs_type(path: str) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True).stdout.strip()


def _wait_for(ready, timeout: float, message) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(message() if callable(message) else message)
