"""Process-group set-up for every launcher: torchrun, the deepspeed launcher, srun, or none.

torchrun and the deepspeed launcher export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT.
`srun` with one task per GPU exports only SLURM_* variables; we translate them so that the
trainer (and Hydra's submitit launcher) works without torchrun.
"""
from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from data_pipeline.fsutil import free_port
from data_pipeline.schema import ConfigError

log = logging.getLogger("scaletrain")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_env_to_torch() -> None:
    """Fill torch's env:// variables from SLURM's when started by srun without torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 and "SLURM_STEP_ID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _slurm_head_node()
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)


def _slurm_head_node() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist or int(os.environ.get("SLURM_NNODES", "1")) == 1:
        return "127.0.0.1"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0]


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto")
    check_gpu_count(local_rank, torch.cuda.device_count())
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def check_gpu_count(local_rank: int, gpus: int) -> None:
    """One GPU per local rank, checked before any process group starts: otherwise the rank past the
    last GPU dies in set_device with "invalid device ordinal" and the others wait for it. Every rank
    raises (torchrun exports LOCAL_WORLD_SIZE), so rank 0 prints the message."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    if max(local_ranks, local_rank + 1) > gpus:
        raise ConfigError([f"{local_ranks} ranks on this node but {gpus} GPU(s) visible: start at most one rank "
                           f"per GPU (torchrun --nproc_per_node {gpus}), or train on CPU ranks with "
                           "trainer.device=cpu"])


def set_tf32(enabled: bool, device: torch.device) -> None:
    """`trainer.tf32`: fp32 matmuls and convolutions on TF32 tensor cores (Ampere and later).

    torch's default is IEEE fp32, so without this the fp32 work of a GPU run (the optimizer step,
    any fp32 run) goes at a fraction of the tensor cores' rate. The fp32_precision switches
    replaced allow_tf32 in torch 2.9 (docs/DESIGN.md, "Torch API floor")."""
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision
    if device.type == "cuda":
        log.info("fp32 matmuls: %s (trainer.tf32=%s)", "TF32 tensor cores" if enabled else "IEEE fp32",
                 str(enabled).lower())


def init_distributed(device_request: str = "auto", need_group: bool = False,
                     timeout_s: float = 1800) -> DistInfo:
    """Initialise the default process group (gloo on CPU, nccl on GPU).

    With one process a group is made only when `need_group` (FSDP2 and DeepSpeed need one).
    """
    _slurm_env_to_torch()
    if need_group and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request, local_rank)
    if (world_size > 1 or need_group) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


_last_step: int | None = None


def note_step(step: int) -> None:
    """Remember the last step every rank completed, for `timeout_message`."""
    global _last_step
    _last_step = step


def is_timeout(exc: BaseException) -> bool:
    """A collective that gave up after the process group's timeout (gloo or nccl wording)."""
    text = str(exc).lower()
    collective = isinstance(exc, dist.DistError) or "gloo" in text or "nccl" in text
    return isinstance(exc, RuntimeError) and collective and ("timed out" in text or "timeout" in text)


def missing_ranks(wait_s: float = 5.0) -> list[int] | None:
    """After a timeout, the ranks that do not answer a roll call through the rendezvous store.

    Every rank that is still alive writes its key; the ones missing after `wait_s` are those that
    stopped (SIGSTOP, a hang) or died. None when the store itself cannot be reached.
    """
    import time

    try:
        store = dist.distributed_c10d._get_default_store()  # the rendezvous store; no public accessor
        rank, world = dist.get_rank(), dist.get_world_size()
        prefix = f"scaletrain/rollcall/{_last_step}"
        store.set(f"{prefix}/{rank}", "1")
        deadline = time.monotonic() + wait_s
        missing = list(range(world))
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"{prefix}/{r}"])]
            time.sleep(0.1)
        return missing
    except Exception:  # noqa: BLE001 - the store may be gone with the launcher; "unknown" is the answer
        return None


def timeout_message(exc: BaseException, timeout_s: float) -> str:
    """What the user sees when a rank stopped responding: the step, the rank where known, the fix."""
    step = "before the first step" if _last_step is None else f"in step {_last_step + 1}"
    missing = missing_ranks()
    who = (f"rank(s) {', '.join(map(str, missing))} did not arrive" if missing
           else "the rank that did not arrive is unknown")
    return (f"a collective timed out after dist.timeout_s={timeout_s:g} s {step}: {who} (stopped, hung or "
            f"dead). Nothing before the last checkpoint is lost: run the same command again to resume. "
            f"({str(exc).splitlines()[0][:300]})")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (one tiny all-reduce)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_across_ranks(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over ranks, in float64 (exact for token counts)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` summed element-wise over ranks, in place and left on its device (no host read)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
