"""Host (CPU) memory a node needs: at start-up, while the weights are loaded, and while training.

Start-up follows the meta-device loading path (issue 17): every rank builds the model on the
meta device and materializes only what it keeps.

- Sharded strategies (fsdp, zero3 and their offload variants): a rank reads only its slice of
  the weight files, so its host peak is (bytes of its shard) x SHARD_FACTOR plus one whole
  parameter in flight (the largest: the embedding). On a GPU the shard passes through host
  memory in the checkpoint's dtype (bf16 files: 2 bytes a parameter) on its way to the device;
  on the CPU, or with CPU offload, the shard stays in host memory in the dtype it is kept in.
- Replicated strategies (ddp, zero1, zero2): every rank needs the whole model, so each holds one
  full copy in the dtype it keeps (fp32 masters for DDP, DeepSpeed's compute dtype, the frozen
  base in `model.base_dtype`) plus the parameter being read.

Training adds what CPU offload keeps in host memory (FSDP2's CPUOffloadPolicy: parameters, gradients
and Adam; ZeRO-3 offload: the parameter partition, fp32 gradient partition, master and Adam state)
and, on the CPU, everything the planner counts as device memory (launch/plan.py `breakdown`, the
same bytes a GPU holds in its own memory): the rank's shards, trainable parameters' gradients and
Adam state, activations, the loss's chunk of logits, and the step's transients in `buffers`: the
gathered blocks in the dtype they are gathered in (a bf16 base under LoRA stays bf16 on the CPU),
FSDP2's copy-out, ZeRO-3's reduce bucket, the fp32 copy of one frozen weight that a bf16 base
computing in fp32 makes for a module, and the output head gathered for the loss; on CPU ranks the
larger of one block and the head, not their sum (launch/plan.py `cpu_sharded_buffers`). All of it is
the steady state from step 2 on (Adam's state exists through forward and backward); a run of one
step peaks lower when every parameter trains.

Checked against 2-rank CPU runs (tests/integration/test_plan_memory.py, bench/startup.py,
docs/BENCHMARKS.md): LoRA under fsdp and zero3 within 13% (152M test model; 350M and 0.94B bench
models within 8%), FSDP full fine-tuning within 10% of a 2-step run, ZeRO-3 full fine-tuning within
7% of a 1-step run (its second step grows ~10% more on the CPU, not modelled).
Every rank also pays a baseline for the interpreter, torch, transformers, DeepSpeed and (on a
GPU) the CUDA context: measured, not derived. Checkpoint staging (`checkpoint.async=true`
copies the rank's state to host memory) is not counted.
"""
from __future__ import annotations

from typing import Any

from launch.gpus import GiB
from launch.state import SHARDED, Setup, Shape, frozen_bytes, frozen_width, resident_param_bytes

SHARD_FACTOR = 1.1
"""Allocator slack and padding over the bytes of a rank's shard (FSDP2 pads dim 0 to N)."""
FILE_WIDTH = 2
"""Bytes a parameter in the weight files: checkpoints are bf16 (model=hf_local)."""
BASELINE = {"cuda": 3 * GiB, "cpu": GiB // 2}
"""Per rank, before any weight: imports and engines (0.42 GiB measured for 2 CPU ranks of
model=tiny under fsdp), plus the CUDA context and pinned staging buffers on a GPU."""


def _sharded_host(s: Setup) -> bool:
    """Whether a sharded rank keeps its shard in host memory (CPU run or offload)."""
    return s.device == "cpu" or s.strategy.endswith("offload")


def startup_weights(shape: Shape, s: Setup) -> int:
    """Host bytes per rank for the weights while the model is loaded (see the module docstring)."""
    resident = resident_param_bytes(shape, s)
    full_width = 4 if s.strategy.startswith(("ddp", "fsdp")) or not s.bf16 else 2
    width = frozen_width(s) if s.adapter.kind != "none" else full_width
    in_flight = int(width * shape.largest_param)
    if s.strategy not in SHARDED:
        return resident + in_flight
    kept = resident if _sharded_host(s) else FILE_WIDTH * shape.params
    return int(SHARD_FACTOR * kept / s.world) + in_flight


def offloaded_state(shape: Shape, s: Setup) -> int:
    """Host bytes per rank of the state CPU offload keeps there while training."""
    n, trainable = s.world, s.adapter.trainable(shape)
    frozen = frozen_bytes(shape, s)
    if s.strategy == "fsdp_offload":  # fp32 shards, their gradients and Adam's two moments
        return (frozen + 16 * trainable) // n
    if s.strategy == "zero3_offload":  # param partition + fp32 grads, master, momentum, variance
        width = 2 if s.bf16 else 4
        return (frozen + (width + 16) * trainable) // n
    return 0


def host_bytes(shape: Shape, s: Setup, device_bytes: int) -> dict[str, Any]:
    """Per node (and per rank) host memory at start-up and while training; `device_bytes` is the
    planner's per-rank device total, which lives in host memory when the ranks run on the CPU."""
    baseline = BASELINE["cpu" if s.device == "cpu" else "cuda"]
    start = {"baseline": baseline, "weights": startup_weights(shape, s)}
    train = {"baseline": baseline, "offloaded": offloaded_state(shape, s),
             "device_state": device_bytes if s.device == "cpu" else 0}
    start["total"], train["total"] = sum(start.values()), sum(train.values())
    p = s.procs
    per_node = lambda d: {k: v * p for k, v in d.items()}  # noqa: E731
    return {"ranks_per_node": p, "startup": per_node(start), "training": per_node(train),
            "peak": p * max(start["total"], train["total"]),
            "per_rank": {"startup": start["total"], "training": train["total"],
                         "peak": max(start["total"], train["total"])}}
