"""GPU types the memory planner knows (`launch.gpu`): memory, bf16 peak and link speeds.

Memory is what the device reports (GiB as sold, e.g. an "80 GB" H100 shows 79.6 GiB to
torch); peaks are dense bf16 datasheet figures (as in train/tracking/flops.py); bandwidths
are per-GPU bus bandwidths that NCCL collectives reach in practice, within a node (NVLink
or PCIe) and across nodes (one 400 Gb/s NIC per GPU unless noted). Estimates, not promises.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    peak_bf16_flops: float
    intra_node_bw: float
    """Bytes/s a rank reaches in an all-reduce within a node."""
    inter_node_bw: float
    """Bytes/s per rank across nodes."""


GPUS: dict[str, GPU] = {g.name: g for g in [
    GPU("h100_80gb", int(79.6 * GiB), 989e12, 360e9, 45e9),
    GPU("h200_141gb", int(139.8 * GiB), 989e12, 360e9, 45e9),
    GPU("b200_180gb", int(178 * GiB), 2.25e15, 720e9, 45e9),
    GPU("a100_80gb", int(79.2 * GiB), 312e12, 230e9, 22e9),
    GPU("a100_40gb", int(39.4 * GiB), 312e12, 230e9, 22e9),
    GPU("l40s_48gb", int(44.4 * GiB), 362e12, 25e9, 10e9),
    GPU("rtx4090_24gb", int(23.6 * GiB), 165e12, 20e9, 5e9),
]}
ALIASES = {"h100": "h100_80gb", "h200": "h200_141gb", "b200": "b200_180gb", "a100": "a100_80gb",
           "l40s": "l40s_48gb", "rtx4090": "rtx4090_24gb"}


def lookup(name: str) -> GPU:
    """The GPU named `name` (or an alias), or ValueError listing the known ones."""
    key = ALIASES.get(name, name)
    if key not in GPUS:
        raise ValueError(f"launch.gpu={name!r}: unknown GPU type; use one of {', '.join(GPUS)}")
    return GPUS[key]
