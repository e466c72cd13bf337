"""Host and GPU memory of this process and its node, as `sys/*` metric keys."""
from __future__ import annotations

import psutil
import torch

_GB = 2**30


def memory_metrics(device: torch.device | None = None) -> dict[str, float]:
    """Resident host memory of this process, node memory in use, and (on CUDA) GPU memory.

    `sys/gpu_mem_used_gb` is the whole device as the driver sees it (other processes and the
    NCCL/CUDA context included), which is what runs out first; the allocator figures show
    how much of it PyTorch holds.
    """
    vm = psutil.virtual_memory()
    out = {
        "sys/host_rss_gb": psutil.Process().memory_info().rss / _GB,
        "sys/host_mem_used_frac": (vm.total - vm.available) / vm.total,
        "sys/host_mem_available_gb": vm.available / _GB,
    }
    if device is None and torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    if device is not None and device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out.update({
            "sys/gpu_mem_allocated_gb": torch.cuda.memory_allocated(device) / _GB,
            "sys/gpu_mem_reserved_gb": torch.cuda.memory_reserved(device) / _GB,
            "sys/gpu_mem_peak_allocated_gb": torch.cuda.max_memory_allocated(device) / _GB,
            "sys/gpu_mem_used_gb": (total - free) / _GB,
            "sys/gpu_mem_total_gb": total / _GB,
        })
    return out
