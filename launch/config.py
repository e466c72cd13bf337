"""Typed settings of `python -m launch` (the `launch` section of conf/launch.yaml) and their checks.

`load_launch` validates the training config with the trainer's own schema
(`train.config.load_config`, for the world size the launch will create) and the launch
settings, and raises one `ConfigError` listing every problem, before anything runs or is
submitted.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.schema import minimums
from launch.gpus import ALIASES, GPUS
from train.config import Config, ConfigError, build, load_config

TARGETS = ("local", "deepspeed", "slurm")
NODE_LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run")
"""Paths that are private to each machine on every cluster we know of."""
NODE_LOCAL_FSTYPES = ("tmpfs", "ramfs")
SLURM_NAME = re.compile(r"[A-Za-z0-9_.+,-]+")
"""Partition, account and QoS names (comma lists allowed), as SLURM itself names them."""
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def unrenderable(key: str, value: Any) -> str | None:
    """A problem when `value` cannot go into an #SBATCH line: a newline would end the directive
    block early and turn the rest into a shell command; other control characters are refused too."""
    if CONTROL.search(str(value)):
        return (f"{key}={value!r} contains a newline or another control character, which would break "
                "the job script's #SBATCH block: remove it")
    return None


@dataclass
class SlurmConfig:
    """#SBATCH settings of the rendered job (slurm/train.sbatch)."""

    job_name: str | None = None
    """null = run.name."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | int = "01:00:00"
    """Wall-clock limit: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    cpus_per_task: int = 8
    """CPUs per node: the one task per node runs torchrun and all its ranks."""
    mem: str | int | None = None
    """Memory per node (sbatch --mem), e.g. 64G; null = cluster default; 0 = all of it."""
    signal_seconds: int = 120
    """USR1 this long before the time limit: every rank checkpoints and the job requeues."""
    extra: list[str] = field(default_factory=list)
    """More sbatch options, one per #SBATCH line, e.g. --constraint=h100."""


@dataclass
class LaunchConfig:
    """How many machines and ranks, and how they find each other."""

    nnodes: int = 1
    node_rank: int = 0
    """This machine's index for target=local with nnodes > 1 (run the launch on every node)."""
    nproc_per_node: int | None = None
    """Ranks per machine; null = gpus_per_node, or 1 without GPUs."""
    gpus_per_node: int = 0
    rdzv_endpoint: str | None = None
    """HOST:PORT on node 0 where the ranks meet (c10d rendezvous / DeepSpeed master)."""
    hosts: list[str] = field(default_factory=list)
    """target=deepspeed, nnodes > 1: machines written into the generated hostfile."""
    hostfile: str | None = None
    """target=deepspeed, nnodes > 1: an existing hostfile instead of `hosts`."""
    max_requeues: int = 3
    require_shared_run_dir: bool = True
    """nnodes > 1: refuse a run.dir on node-local storage; false only if it is truly shared."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    gpu: str = "h100_80gb"
    """GPU type the memory planner checks against (launch/gpus.py): h100_80gb, h200_141gb, a100_80gb..."""

    @property
    def procs(self) -> int:
        """Ranks per node after defaults."""
        if self.nproc_per_node is not None:
            return self.nproc_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.nnodes * self.procs


@dataclass
class LaunchRequest:
    """Everything `python -m launch` decided: target, dry run, launch and training settings."""

    target: str
    dry_run: bool
    launch: LaunchConfig
    train: Config


def parse_time(text: str) -> int | None:
    """SLURM time limit in seconds, or None when `text` is not a SLURM time format."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        return None
    days, a, b, c = m.groups()
    if days is None:
        parts = [int(x) for x in (a, b, c) if x is not None]
        if len(parts) == 1:
            return parts[0] * 60                       # MINUTES
        if len(parts) == 2:
            return parts[0] * 60 + parts[1]             # MM:SS
        return parts[0] * 3600 + parts[1] * 60 + parts[2]  # HH:MM:SS
    hms = [int(x) for x in (a, b, c) if x is not None] + [0, 0]
    return int(days) * 86400 + hms[0] * 3600 + hms[1] * 60 + hms[2]


def node_local_reason(run_dir: str) -> str | None:
    """Why `run_dir` is on storage private to one machine, or None when it may be shared."""
    path = os.path.realpath(Path(run_dir).absolute())
    for prefix in NODE_LOCAL_PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            return f"it is under {prefix}, which every node has its own copy of"
    best, fstype = "", ""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        mounts = []
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3:
            mnt = parts[1].replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, fstype = mnt, parts[2]
    if fstype in NODE_LOCAL_FSTYPES:
        return f"it is on a {fstype} mount ({best}), which lives in one machine's memory"
    return None


def check_launch(target: str, lc: LaunchConfig, run_dir: str, device: str = "auto",
                 run_name: str = "scaletrain", planning: bool = False) -> list[str]:
    """Problems with the launch settings for this run (empty when it can run).

    `run_dir`, `device` and `run_name` are the training config's run.dir, trainer.device and run.name.
    `planning` (`python -m launch plan`): only what an estimate needs; how the nodes meet and
    where they write (rendezvous, hosts, shared run.dir) matter to a launch, not to a plan.
    """
    p: list[str] = []
    if target not in TARGETS:
        p.append(f"target={target!r}: use target=local (torchrun), target=deepspeed or target=slurm")
    p += minimums("launch", nnodes=(lc.nnodes, 1), nproc_per_node=(lc.procs, 1), gpus_per_node=(lc.gpus_per_node, 0))
    if lc.gpus_per_node > 0 and lc.procs > lc.gpus_per_node:
        p.append(f"launch.nproc_per_node={lc.procs} > launch.gpus_per_node={lc.gpus_per_node}: "
                 "NCCL cannot put two ranks on one GPU; use at most one rank per GPU")
    if device == "cuda" and lc.gpus_per_node == 0:
        p.append("trainer.device=cuda but launch.gpus_per_node=0: set launch.gpus_per_node to the "
                 "GPUs of each machine, or trainer.device=auto|cpu")
    if target != "slurm" and lc.nnodes > 1 and not (0 <= lc.node_rank < lc.nnodes):
        p.append(f"launch.node_rank={lc.node_rank}: must be in 0..{lc.nnodes - 1} "
                 f"for launch.nnodes={lc.nnodes}")
    if lc.gpu not in GPUS and lc.gpu not in ALIASES:
        p.append(f"launch.gpu={lc.gpu!r}: unknown GPU type; use one of {', '.join(GPUS)}")
    if planning:
        return p
    if target in ("local", "deepspeed"):
        if lc.nnodes > 1 and not lc.rdzv_endpoint:
            p.append(f"launch.nnodes={lc.nnodes} needs launch.rdzv_endpoint=HOST:PORT, an address of "
                     "node 0 that every node can reach (e.g. launch.rdzv_endpoint=node001:29500)")
        elif lc.rdzv_endpoint and not re.fullmatch(r"[^\s:]+:\d{1,5}", lc.rdzv_endpoint):
            p.append(f"launch.rdzv_endpoint={lc.rdzv_endpoint!r}: expected HOST:PORT")
    if target == "deepspeed" and lc.nnodes > 1:
        p.extend(_check_hosts(lc))
    elif lc.hostfile:  # never silently ignored: missing, or given where nothing reads it
        p.extend(_check_hosts(lc) or [
            f"launch.hostfile={lc.hostfile!r} is read only by target=deepspeed with launch.nnodes > 1 (this is "
            f"target={target}, launch.nnodes={lc.nnodes}): set launch.nnodes to its number of hosts, or drop "
            "launch.hostfile"])
    if lc.nnodes > 1 and lc.require_shared_run_dir:
        why = node_local_reason(run_dir)
        if why:
            p.append(f"run.dir={run_dir!r} is not on storage all {lc.nnodes} nodes share ({why}): "
                     "every rank writes checkpoints there; choose a run.dir on a shared filesystem "
                     "(NFS, Lustre, GPFS), or set launch.require_shared_run_dir=false if it is shared")
    if lc.max_requeues < 0:
        p.append(f"launch.max_requeues={lc.max_requeues}: must be >= 0")
    if target == "slurm":
        p.extend(_check_slurm(lc, run_dir, run_name))
    return p


def _check_hosts(lc: LaunchConfig) -> list[str]:
    if lc.hostfile:
        if not Path(lc.hostfile).is_file():
            return [f"launch.hostfile={lc.hostfile!r} does not exist: write one 'HOST slots=N' line "
                    "per node, or list the nodes in launch.hosts=[node1,node2]"]
        return []
    if len(lc.hosts) != lc.nnodes:
        return [f"target=deepspeed with launch.nnodes={lc.nnodes} needs {lc.nnodes} machines in "
                f"launch.hosts (got {lc.hosts}) or a launch.hostfile"]
    return []


def _check_slurm(lc: LaunchConfig, run_dir: str, run_name: str) -> list[str]:
    s, p = lc.slurm, []
    for name in ("partition", "account", "qos"):
        value = getattr(s, name)
        if value is not None and not SLURM_NAME.fullmatch(str(value)):
            p.append(f"launch.slurm.{name}={value!r}: a SLURM name has only letters, digits and . _ - + "
                     "(a comma separates several)")
    job_key = "launch.slurm.job_name" if s.job_name else "run.name (the job name while launch.slurm.job_name is null)"
    rendered = [(job_key, s.job_name or run_name), ("launch.slurm.time", s.time),
                ("run.dir", str(Path(run_dir).absolute())), ("launch.slurm.mem", s.mem),
                *(("launch.slurm.extra item", x) for x in s.extra)]
    p.extend(filter(None, (unrenderable(key, value) for key, value in rendered)))
    limit = parse_time(s.time)
    if limit is None:
        p.append(f"launch.slurm.time={s.time!r}: use MINUTES, HH:MM:SS or D-HH:MM:SS")
    if not 1 <= s.signal_seconds <= 65535:
        p.append(f"launch.slurm.signal_seconds={s.signal_seconds}: must be in 1..65535 (SLURM's limit)")
    elif limit is not None and s.signal_seconds >= limit:
        p.append(f"launch.slurm.signal_seconds={s.signal_seconds} is not shorter than "
                 f"launch.slurm.time={s.time!r} ({limit}s): the job would be told to stop at once")
    if s.cpus_per_task < lc.procs:
        p.append(f"launch.slurm.cpus_per_task={s.cpus_per_task} < {lc.procs} ranks per node: each rank "
                 f"needs a CPU; set launch.slurm.cpus_per_task >= {lc.procs}")
    if s.mem is not None and not re.fullmatch(r"\d+[KMGT]?", str(s.mem)):
        p.append(f"launch.slurm.mem={s.mem!r}: use a size such as 64G or 500M (0 = all memory)")
    for opt in s.extra:
        if not str(opt).startswith("-"):
            p.append(f"launch.slurm.extra item {opt!r}: write sbatch options as --name=value")
    return p


def load_launch(raw: dict[str, Any], planning: bool = False) -> LaunchRequest:
    """Validate the composed launch config (training part included); one ConfigError for all.
    `planning`: for `python -m launch plan`, which needs no rendezvous, hosts or shared run.dir."""
    problems: list[str] = []
    target = raw.get("target", "local")
    dry_run = raw.get("dry_run", False)
    if not isinstance(dry_run, bool):
        problems.append(f"dry_run={dry_run!r}: expected true or false")
    launch_problems: list[str] = []
    lc = build(LaunchConfig, raw.get("launch") or {}, "launch", launch_problems)
    problems.extend(launch_problems)
    lc_ok = not launch_problems and isinstance(lc.nnodes, int) and isinstance(lc.procs, int)
    world = lc.world_size if lc_ok and lc.procs >= 1 and lc.nnodes >= 1 else None
    cfg: Config | None = None
    try:
        cfg = load_config(raw, world_size=world)
    except ConfigError as err:
        problems.extend(err.problems)
    if lc_ok:
        run = raw.get("run") if isinstance(raw.get("run"), dict) else {}
        trainer = raw.get("trainer") if isinstance(raw.get("trainer"), dict) else {}
        problems.extend(check_launch(target, lc, str(run.get("dir", "runs/default")),
                                     str(trainer.get("device", "auto")), str(run.get("name", "scaletrain")),
                                     planning))
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    return LaunchRequest(target=target, dry_run=dry_run, launch=lc, train=cfg)
