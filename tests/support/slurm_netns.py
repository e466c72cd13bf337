"""Two SLURM nodes on one machine: each slurmd in its own network namespace and hostname.

The namespaces are joined by a veth pair (10.x.y.1 <-> 10.x.y.2); each daemon also gets its
own hostname and a private bind mount of a hosts file naming both nodes, so srun, torchrun's
c10d rendezvous and gloo really go between two hosts. slurmctld and every client command run
in node n1's namespace; munged's socket is a file, shared by both; nothing under /etc changes.
Skips with the reason where `ip netns`, `nsenter` or `unshare` cannot work (e.g. not root).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.support.slurm_cluster import (
    Node,
    SlurmCluster,
    _real_memory_mb,
    boot,
    missing_reason,
)


def netns_missing_reason() -> str | None:
    """Why two namespaced nodes cannot start here, or None."""
    reason = missing_reason()
    if reason:
        return reason
    if any(shutil.which(b) is None for b in ("ip", "nsenter", "unshare")):
        return "`ip` (iproute2), `nsenter` and `unshare` (util-linux) are needed for network namespaces"
    probe = f"stprobe{os.getpid() % 100000}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*cmd: str) -> None:
    res = subprocess.run(list(cmd), capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")


def _make_namespaces(cluster: SlurmCluster, tag: str) -> None:
    a, b = cluster.nodes
    hosts = "127.0.0.1 localhost\n" + f"{a.addr} {a.name} ctl\n{b.addr} {b.name}\n"
    for node in cluster.nodes:
        node.hosts.write_text(hosts)
        _sh("ip", "netns", "add", node.netns)
        cluster.cleanups.append(lambda ns=node.netns: subprocess.run(["ip", "netns", "del", ns]))
    veth = (f"{tag}a", f"{tag}b")
    _sh("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
    for node, dev in zip(cluster.nodes, veth):
        _sh("ip", "link", "set", dev, "netns", node.netns)
        _sh("ip", "-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", dev)
        _sh("ip", "-n", node.netns, "link", "set", dev, "up")
        _sh("ip", "-n", node.netns, "link", "set", "lo", "up")


def start_two_node_cluster(base: Path) -> SlurmCluster:
    """Nodes n1 and n2 (1 CPU each) in namespaces of their own; slurmctld beside n1."""
    d = Path(base).absolute()
    d.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    tag, net = f"st{pid % 100000}", f"10.{200 + pid % 50}.{pid % 250}"
    nodes = [Node(f"n{i}", f"{net}.{i}", f"{tag}-n{i}", d / f"hosts-n{i}") for i in (1, 2)]
    cluster = SlurmCluster(dir=d, conf=d / "slurm.conf", nodes=nodes, cpus=1, mem_mb=_real_memory_mb())
    return boot(cluster, ctl_name="ctl", prepare=lambda c: _make_namespaces(c, tag))
