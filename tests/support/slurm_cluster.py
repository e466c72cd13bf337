"""A throwaway single-node SLURM cluster on localhost for the SLURM tests.

`slurm_cluster` (session-scoped fixture in tests/conftest.py) starts munged, slurmctld and slurmd from a generated
slurm.conf in a temp dir and stops them afterwards; nothing under /etc is touched. Every
client call goes through `SlurmCluster.env` (SLURM_CONF points at the generated file). The
node uses proctrack/linuxproc and task/none so no cgroup setup is needed, and it is declared
with at least 2 CPUs so that two ranks fit. Where SLURM or munge is missing, or we are not
root (slurmd must start jobs as their user), the fixture skips with the reason.

Also usable by hand: `python -m tests.support.slurm_cluster DIR` (from the repository root) starts a cluster and prints the
`export SLURM_CONF=...` line; Ctrl-C or SIGTERM stops it.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from data_pipeline.fsutil import free_port
from tests.helpers import run_reporting_hangs

DAEMONS = ("munged", "slurmctld", "slurmd")
CRED_EXPIRE_S = 10
"""The cluster's credential lifetime (`AuthInfo=cred_expire`), which is also how long SLURM holds a
requeued job pending (`Reason=BeginTime`) so that its relaunch cannot meet the revoked credential of
the attempt that is ending (docs/SLURM.md, "Why the relaunch waits"). SLURM's default is 120 s; the
tests keep SLURM's own hold, only shorter, and never release a requeued job early."""
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel")


def missing_reason() -> str | None:
    """Why a local cluster cannot start here, or None when it can."""
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b) is None]
    if missing:
        return (f"SLURM/munge not installed (missing: {', '.join(missing)}); "
                "install with `apt-get install -y slurm-wlm munge` (.ci/run does this as root)")
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd starts jobs as the submitting user)"
    return None


def _real_memory_mb() -> int:
    """MemTotal with headroom: slurmd drains a node that declares more than it has."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(512, int(line.split()[1]) // 1024 * 8 // 10)
    return 1024


SLURM_CONF = """\
ClusterName=scaletrain-test
SlurmctldHost={ctl_name}({ctl_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={cred_expire}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# test every pending job every 2 s (default 60): a requeued job starts soon after its hold ends
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
MinJobAge=3600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=30
{node_lines}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


@dataclass
class Node:
    """A slurmd: node name, address, and its network namespace and hosts file (None = this host's)."""

    name: str
    addr: str
    netns: str | None = None
    hosts: Path | None = None

    def wrap(self, cmd: list[str], hostname: str | None = None) -> list[str]:
        """`cmd` in this node's network namespace; with `hostname`, also under that hostname and
        with the node's hosts file (private mount and UTS namespaces, nothing under /etc changes)."""
        if self.netns is None:
            return cmd
        prefix = ["nsenter", f"--net=/run/netns/{self.netns}"]
        if hostname:
            prefix += ["unshare", "--mount", "--uts", "sh", "-c",
                       f'mount --bind "{self.hosts}" /etc/hosts && hostname {hostname} && exec "$0" "$@"']
        return prefix + cmd


@dataclass
class SlurmCluster:
    """Handle on a running local cluster: paths, client environment, job helpers."""

    dir: Path
    conf: Path
    nodes: list[Node]
    cpus: int
    """CPUs of each node."""
    mem_mb: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    cleanups: list = field(default_factory=list)
    """Callables run after the daemons stopped (e.g. deleting network namespaces)."""

    @property
    def host(self) -> str:
        """The first node, where the batch scripts run."""
        return self.nodes[0].name

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF, for every client command and submitted job."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        env = {**self.env, **kw.pop("env", {})}
        res = run_reporting_hangs(self.nodes[0].wrap(list(cmd)), timeout=timeout, env=env, **kw)
        if check and res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}{res.stderr}"
                               f"\n{self.logs()}")
        return res

    def sbatch(self, *args: str, **kw) -> int:
        out = self.run("sbatch", *args, **kw).stdout
        m = re.search(r"Submitted batch job (\d+)", out)
        assert m, out
        return int(m.group(1))

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, Reason, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id: int, states: set[str], timeout: float = 180) -> dict[str, str]:
        """Poll until the job reaches one of `states` (a requeued job waits out SLURM's own hold)."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not reach {states} in {timeout}s: {info}\n{self.logs()}")

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until no job is pending, running or completing (tests run one job at a time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-t", "PD,R,CG,S,CF").stdout.strip():
                return
            time.sleep(0.5)
        raise TimeoutError(f"cluster still busy:\n{self.run('squeue').stdout}")

    def cancel_all(self) -> None:
        """Cancel every job left on this cluster (after a failed test) and wait until it is idle."""
        ids = self.run("squeue", "-h", "-o", "%i").stdout.split()
        if ids:
            self.run("scancel", *ids, check=False)
        self.wait_idle(timeout=90)

    def logs(self, tail: int = 30) -> str:
        parts = []
        for p in [self.dir / "slurmctld.log", *sorted(self.dir.glob("slurmd-*.log"))]:
            if p.exists():
                lines = p.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {p.name} (last {tail} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the daemons this cluster started (by pid), slurmds first, then clean up."""
        order = sorted(self.procs, key=lambda n: (not n.startswith("slurmd"), n == "munged"))
        for name in order:
            proc = self.procs.pop(name)
            if proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        while self.cleanups:
            self.cleanups.pop()()


def _start_munge(d: Path) -> tuple[subprocess.Popen, Path]:
    mdir = d / "munge"
    mdir.mkdir(mode=0o700)
    key = mdir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = mdir / "munge.socket"
    proc = subprocess.Popen(
        ["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
         f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
         f"--seed-file={mdir / 'munged.seed'}"],
        stdout=subprocess.DEVNULL, stderr=open(mdir / "munged.stderr", "w"))
    _wait_for(lambda: sock.exists(), 20, "munged socket", proc, mdir / "munged.log")
    return proc, sock


def _wait_for(pred, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    text = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    raise RuntimeError(f"{what} not ready (exit code {proc.poll()}):\n{text}")


def start_daemons(cluster: SlurmCluster, ctl_name: str) -> None:
    """Write slurm.conf and start munged, slurmctld (beside node 0) and one slurmd per node."""
    d = cluster.dir
    (d / "state").mkdir(exist_ok=True)
    cluster.procs["munged"], sock = _start_munge(d)
    lines = [f"NodeName={n.name} NodeAddr={n.addr} CPUs={cluster.cpus} RealMemory={cluster.mem_mb} "
             "State=UNKNOWN" for n in cluster.nodes]
    cluster.conf.write_text(SLURM_CONF.format(
        ctl_name=ctl_name, ctl_addr=cluster.nodes[0].addr, d=d, ctld_port=free_port(),
        slurmd_port=free_port(), munge_socket=sock, cred_expire=CRED_EXPIRE_S, node_lines="\n".join(lines),
        node_names=",".join(n.name for n in cluster.nodes)))
    env = cluster.env
    cluster.procs["slurmctld"] = subprocess.Popen(
        cluster.nodes[0].wrap(["slurmctld", "-D", "-i", "-f", str(cluster.conf)], hostname=ctl_name),
        env=env, stdout=subprocess.DEVNULL, stderr=open(d / "slurmctld.stderr", "w"))
    _wait_for(lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") > 0,
              30, "slurmctld", cluster.procs["slurmctld"], d / "slurmctld.log")
    for n in cluster.nodes:
        (d / f"spool-{n.name}").mkdir(exist_ok=True)
        cluster.procs[f"slurmd:{n.name}"] = subprocess.Popen(
            n.wrap(["slurmd", "-D", "-N", n.name, "-f", str(cluster.conf)], hostname=n.name),
            env=env, stdout=subprocess.DEVNULL, stderr=open(d / f"slurmd-{n.name}.stderr", "w"))
    for n in cluster.nodes:
        _wait_for(lambda: _node_idle(cluster), 40, f"slurmd {n.name} (node idle)",
                  cluster.procs[f"slurmd:{n.name}"], d / f"slurmd-{n.name}.log")


def boot(cluster: SlurmCluster, ctl_name: str, prepare=None) -> SlurmCluster:
    """Start the daemons of `cluster` (after `prepare(cluster)`, e.g. its network namespaces);
    on any failure stop what was started and undo what `prepare` registered, then re-raise."""
    try:
        if prepare is not None:
            prepare(cluster)
        start_daemons(cluster, ctl_name=ctl_name)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def start_cluster(base: Path, cpus: int | None = None) -> SlurmCluster:
    """A one-node cluster on localhost under `base` (this machine's hostname and CPUs)."""
    d = Path(base).absolute()
    d.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    cluster = SlurmCluster(dir=d, conf=d / "slurm.conf", nodes=[Node(host, "127.0.0.1")],
                           cpus=cpus or max(2, os.cpu_count() or 2), mem_mb=_real_memory_mb())
    return boot(cluster, ctl_name=host)


def _node_idle(cluster: SlurmCluster) -> bool:
    out = cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
    return len(out) == len(cluster.nodes) and all(s.rstrip("*") in ("idle", "mix", "alloc") for s in out)


def session_cluster(tmp_path_factory, missing, start, name: str):
    """Body of a session fixture (tests/conftest.py): skip with `missing()`'s reason, or start a
    cluster under a fresh temp dir, yield it, and stop it at the end of the session."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    cluster = start(tmp_path_factory.mktemp(name))
    try:
        yield cluster
    finally:
        cluster.stop()


def _serve(base: Path) -> None:
    """Run a cluster until SIGINT or SIGTERM (background shells ignore SIGINT), then stop it."""
    cluster = start_cluster(base)
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    try:
        while not stop:
            signal.pause()
    finally:
        cluster.stop()


if __name__ == "__main__":
    why = missing_reason()
    if why:
        sys.exit(why)
    _serve(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/scaletrain-slurm"))
