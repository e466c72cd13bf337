"""Command lines for target=local (torchrun) and target=deepspeed (the deepspeed launcher).

Every rank runs `python -m train` with the user's training overrides, unchanged: each rank
composes the same Hydra config that `python -m launch` validated.
"""
from __future__ import annotations

import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launch.config import LaunchConfig

LAUNCH_KEYS = ("target", "dry_run", "launch", "hydra", "format")
"""Override keys that belong to `python -m launch`, never passed to the trainer."""


@dataclass
class Plan:
    """What a launch runs: argv, plus files it writes first (hostfile, job script)."""

    argv: list[str]
    files: dict[Path, str] = field(default_factory=dict)

    def shell(self) -> str:
        """The command as one properly quoted shell line."""
        return shlex.join(self.argv)


def override_key(override: str) -> str:
    """The config key an override sets: `+a.b=1` -> `a.b`, `~x` -> `x`, `strategy=zero3` -> `strategy`."""
    key = override.split("=", 1)[0].strip()
    return re.sub(r"^(\+\+|\+|~)", "", key).removeprefix("override ").strip()


def training_overrides(overrides: list[str]) -> list[str]:
    """The overrides meant for `python -m train` (launch's own settings removed), in order."""
    out = []
    for o in overrides:
        key = override_key(o)
        if key.split(".", 1)[0].split("/", 1)[0] in LAUNCH_KEYS:
            continue
        out.append(o)
    return out


def executable(name: str) -> str:
    """`name` from this Python's environment (the venv that validated the config), else PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"`{name}` is not installed next to {sys.executable} nor on PATH: "
            f"install the project (`pip install -e .`) in the environment you launch from")
    return found


def torchrun_args(lc: LaunchConfig) -> list[str]:
    """torchrun options: --standalone on one node, else a c10d rendezvous at launch.rdzv_endpoint."""
    if lc.nnodes == 1:
        return ["--standalone", "--nnodes", "1", "--nproc_per_node", str(lc.procs)]
    return ["--nnodes", str(lc.nnodes), "--node_rank", str(lc.node_rank),
            "--nproc_per_node", str(lc.procs), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", str(lc.rdzv_endpoint)]


def local_plan(lc: LaunchConfig, overrides: list[str]) -> Plan:
    """torchrun on this machine (run it on every node with its launch.node_rank for nnodes > 1)."""
    return Plan([executable("torchrun"), *torchrun_args(lc), "-m", "train", *overrides])


def hostfile_text(lc: LaunchConfig) -> str:
    return "".join(f"{h} slots={lc.procs}\n" for h in lc.hosts)


def deepspeed_plan(lc: LaunchConfig, overrides: list[str], run_dir: Path) -> Plan:
    """The deepspeed launcher: `--num_gpus N --module train` (it passes --local_rank to each rank).

    Several nodes: it reaches every host of the hostfile over ssh/pdsh from this machine and
    uses launch.rdzv_endpoint as the master address (on one node too, when set).
    """
    argv = [executable("deepspeed")]
    files: dict[Path, str] = {}
    if lc.nnodes == 1:
        argv += ["--num_gpus", str(lc.procs)]
        if lc.rdzv_endpoint:  # otherwise DeepSpeed's default 127.0.0.1:29500
            addr, port = lc.rdzv_endpoint.rsplit(":", 1)
            argv += ["--master_addr", addr, "--master_port", port]
    else:
        hostfile = Path(lc.hostfile) if lc.hostfile else run_dir.absolute() / "launch" / "hostfile"
        if not lc.hostfile:
            files[hostfile] = hostfile_text(lc)
        addr, port = str(lc.rdzv_endpoint).rsplit(":", 1)
        argv += ["--hostfile", str(hostfile), "--num_nodes", str(lc.nnodes),
                 "--num_gpus", str(lc.procs), "--master_addr", addr, "--master_port", port]
    return Plan(argv + ["--module", "train", *overrides], files)
