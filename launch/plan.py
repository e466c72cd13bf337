"""Memory planner: per-GPU bytes of a training config, whether it fits, and what else would.

`python -m launch plan [overrides] [format=json] [launch.gpu=h100_80gb]`. No torch import:
it runs on a login node before anything is launched. Model state follows the ZeRO paper
(Rajbhandari et al. 2020) for bf16 on GPU: parameters 2Ψ, gradients 2Ψ, Adam state KΨ with
K = 12 (fp32 master, momentum, variance), each divided by the world size N once its stage
shards it. DDP and FSDP2 keep fp32 parameters (autocast / MixedPrecisionPolicy), so 4Ψ + 4Ψ +
8Ψ (FSDP2: all over N). On CPU (fp32) DeepSpeed keeps 4-byte weights and gradients, and ZeRO-3
uses its fp32 partition as the master copy (K = 8). Activations follow Korthikanti et al. 2022
for a Llama block with SwiGLU and a fused attention kernel; step time is a roofline estimate
(compute at an assumed efficiency vs. ring-collective bytes over the GPU's links), used only
to rank the alternatives.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from launch.gpus import GPU, GiB, lookup

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp", "zero3_offload", "fsdp_offload")
FRAMEWORK_RESERVE = 1 * GiB
"""CUDA context, cuBLAS workspaces and allocator slack, counted in `buffers`."""
CHUNK_LOGITS = 2**25
"""Logits per chunk of the chunked loss (train/loss.py)."""


@dataclass(frozen=True)
class Shape:
    """What memory depends on in a Llama-style decoder."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_params(self) -> int:
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.layer_params + self.hidden + embed * (1 if self.tied else 2)


@dataclass(frozen=True)
class Setup:
    """One way to run it: what the planner varies when it looks for alternatives."""

    strategy: str
    world: int
    nnodes: int
    micro_batch: int
    accum: int
    seq_len: int
    checkpointing: bool
    bf16: bool
    loss: str = "chunked"
    attention: str = "sdpa"


def model_state(psi: int, strategy: str, world: int, bf16: bool) -> dict[str, int]:
    """Bytes per rank of parameters, gradients and optimizer state (see the module docstring)."""
    n = world
    if strategy.startswith("fsdp"):
        if strategy == "fsdp_offload":
            return {"params": 0, "grads": 0, "optimizer": 0}  # CPUOffloadPolicy: all in host memory
        return {"params": 4 * psi // n, "grads": 4 * psi // n, "optimizer": 8 * psi // n}
    if strategy == "ddp":
        return {"params": 4 * psi, "grads": 4 * psi, "optimizer": 8 * psi}
    stage = int(strategy[4])
    width = 2 if bf16 else 4
    k = 12 if bf16 or stage < 3 else 8
    return {"params": width * psi // (n if stage == 3 else 1),
            "grads": width * psi // (n if stage >= 2 else 1),
            "optimizer": 0 if strategy.endswith("offload") else k * psi // n}


def activation_bytes(shape: Shape, s: Setup, checkpointing: bool) -> int:
    """Saved activations of one micro-batch (bytes), per rank.

    Per token and layer a block saves its two norm inputs and outputs, q, k, v and the
    attention output, gate, up, SiLU(gate) and their product in the compute dtype, plus the
    fp32 copies RMSNorm makes. With checkpointing each layer keeps only its input, and one
    layer's full set exists again while it is recomputed."""
    a = 2 if s.bf16 else 4
    h, i = shape.hidden, shape.intermediate
    per_layer = a * (6 * h + 2 * shape.kv_dim + 4 * i) + 8 * h
    tokens = s.micro_batch * s.seq_len
    layers = a * h * shape.layers + per_layer if checkpointing else per_layer * shape.layers
    mask = s.micro_batch * s.seq_len ** 2 if s.attention == "sdpa" else 0  # packed-document bool mask
    return tokens * (layers + 2 * a * h) + mask


def logits_bytes(shape: Shape, s: Setup) -> int:
    """Output projection + loss: plain holds [tokens, vocab] in the compute dtype, an fp32 copy,
    fp32 log-probabilities and their fp32 gradient; chunked holds one chunk of fp32 logits and
    probabilities plus fp32 gradients of the head and the hidden states."""
    a = 2 if s.bf16 else 4
    tokens, v, h = s.micro_batch * s.seq_len, shape.vocab, shape.hidden
    if s.loss == "plain":
        return tokens * v * (a + 12)
    chunk = max(1, CHUNK_LOGITS // v) * v
    return chunk * (8 + a) + 4 * v * h + a * tokens * h


def buffer_bytes(shape: Shape, psi: int, s: Setup) -> int:
    """Communication buffers (defaults of each engine) plus the framework reserve."""
    a = 2 if s.bf16 else 4
    root = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    if s.strategy == "ddp":
        comm = 4 * psi  # the reducer's flat gradient buckets
    elif s.strategy.startswith("fsdp"):
        comm = a * (2 * shape.layer_params + root) + 4 * shape.layer_params  # 2 gathered layers + root
    elif s.strategy.startswith("zero3"):
        comm = a * (2 * shape.layer_params + root) + a * min(psi, 500_000_000)
    else:
        comm = 2 * a * min(psi, 500_000_000)  # reduce and all-gather buckets (5e8 elements)
    return comm + FRAMEWORK_RESERVE


def step_seconds(shape: Shape, psi: int, s: Setup, gpu: GPU) -> float:
    """Roofline estimate of one optimizer step: compute vs. collective traffic, overlapped."""
    tokens = s.micro_batch * s.seq_len
    flops = 6 * (psi - shape.vocab * shape.hidden * (0 if shape.tied else 1)) \
        + 12 * shape.layers * shape.hidden * s.seq_len
    efficiency = 0.5 * tokens / (tokens + 2048)  # small micro-batches keep the GPU less busy
    compute = s.accum * tokens * flops * (4 / 3 if s.checkpointing else 1) / (gpu.peak_bf16_flops * efficiency)
    ring = (s.world - 1) / s.world if s.world > 1 else 0.0
    bw = gpu.inter_node_bw if s.nnodes > 1 else gpu.intra_node_bw
    p, g = (2, 2) if s.bf16 else (4, 4)
    per_step = {"ddp": 2 * 4 * psi, "zero1": (p + g) * psi, "zero2": p * psi + s.accum * g * psi}
    traffic = per_step.get(s.strategy, s.accum * 2 * p * psi + (4 if s.strategy.startswith("fsdp") else g) * psi)
    seconds = max(compute, traffic * ring / bw)
    if s.strategy.endswith("offload"):
        seconds += 16 * psi / s.world / 25e9 + 12 * psi / s.world / 5e9  # PCIe round trip + CPU Adam
    return seconds


def breakdown(shape: Shape, s: Setup) -> dict[str, Any]:
    psi = shape.params
    out = model_state(psi, s.strategy, s.world, s.bf16)
    out["activations"] = activation_bytes(shape, s, s.checkpointing)
    out["logits"] = logits_bytes(shape, s)
    out["buffers"] = buffer_bytes(shape, psi, s)
    out["total"] = sum(out.values())
    return out


def alternatives(shape: Shape, base: Setup, gpu: GPU, global_batch: int) -> list[dict[str, Any]]:
    """Every strategy x micro-batch x checkpointing that fits, fastest first."""
    per_rank = global_batch // base.world
    found = []
    for strategy in STRATEGIES:
        for mb in (m for m in (1, 2, 4, 8, 16, 32) if m <= per_rank and per_rank % m == 0):
            for ckpt in (False, True):
                s = replace(base, strategy=strategy, micro_batch=mb, accum=per_rank // mb, checkpointing=ckpt)
                total = breakdown(shape, s)["total"]
                if total <= gpu.memory_bytes:
                    sec = step_seconds(shape, shape.params, s, gpu)
                    found.append({"strategy": strategy, "micro_batch_size": mb, "activation_checkpointing": ckpt,
                                  "total_bytes": total, "est_step_s": round(sec, 4),
                                  "tokens_per_s_per_gpu": round(per_rank * s.seq_len / sec)})
    return sorted(found, key=lambda r: (r["est_step_s"], r["total_bytes"]))


def plan(shape: Shape, s: Setup, gpu: GPU, global_batch: int) -> dict[str, Any]:
    """The JSON object of `python -m launch plan format=json`."""
    per_gpu = breakdown(shape, s)
    return {
        "params": shape.params, "world_size": s.world, "gpu": gpu.name, "gpu_bytes": gpu.memory_bytes,
        "strategy": s.strategy, "dtype": "bf16" if s.bf16 else "fp32", "micro_batch_size": s.micro_batch,
        "grad_accum_steps": s.accum, "seq_len": s.seq_len, "activation_checkpointing": s.checkpointing,
        "loss": s.loss, "attention": s.attention, "per_gpu_bytes": per_gpu,
        "activations_bytes": {"without_checkpointing": activation_bytes(shape, s, False),
                              "with_checkpointing": activation_bytes(shape, s, True)},
        "fits": per_gpu["total"] <= gpu.memory_bytes,
        "est_step_s": round(step_seconds(shape, shape.params, s, gpu), 4),
        "alternatives": alternatives(shape, s, gpu, global_batch),
    }


def render(result: dict[str, Any], top: int = 8) -> str:
    """The human-readable table."""
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    pg, act = result["per_gpu_bytes"], result["activations_bytes"]
    lines = [f"{result['params'] / 1e9:.2f}B parameters | {result['strategy']} on {result['world_size']} x "
             f"{result['gpu']} | {result['dtype']} | micro batch {result['micro_batch_size']} x "
             f"{result['seq_len']} tokens | activation checkpointing "
             f"{'on' if result['activation_checkpointing'] else 'off'} | loss {result['loss']}",
             "per GPU:"]
    for key in ("params", "grads", "optimizer", "activations", "logits", "buffers", "total"):
        lines.append(f"  {key:<12}{g(pg[key])}")
    lines.append(f"  activations without / with checkpointing: {g(act['without_checkpointing']).strip()} / "
                 f"{g(act['with_checkpointing']).strip()}")
    verdict = "fits" if result["fits"] else "DOES NOT FIT"
    lines.append(f"GPU memory {g(result['gpu_bytes']).strip()}: {verdict} "
                 f"({pg['total'] / result['gpu_bytes']:.0%} used)")
    lines.append("alternatives that fit, fastest first (estimated):" if result["alternatives"]
                 else "nothing fits on this GPU count: add GPUs or lower trainer.seq_len")
    for alt in result["alternatives"][:top]:
        lines.append(f"  strategy={alt['strategy']:<14} trainer.micro_batch_size={alt['micro_batch_size']:<3} "
                     f"trainer.activation_checkpointing={str(alt['activation_checkpointing']).lower():<6}"
                     f"{g(alt['total_bytes'])}  ~{alt['tokens_per_s_per_gpu']} tokens/s/GPU")
    return "\n".join(lines)


def shape_from_config(model: Any, data_vocab: int | None) -> Shape:
    """The planner's shape of `model` (a train.config.ModelConfig): its own fields, or the
    config.json of a local checkpoint (read as JSON; nothing is imported or downloaded)."""
    if model.kind == "hf_local":
        c = json.loads((Path(model.path) / "config.json").read_text())
        return Shape(c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                     c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"],
                     bool(c.get("tie_word_embeddings", False)))
    vocab = model.vocab_size or data_vocab
    if vocab is None:
        raise ValueError("model.vocab_size is null and the data config names no vocabulary size: "
                         "set model.vocab_size for the plan")
    return Shape(vocab, model.hidden_size, model.intermediate_size, model.num_hidden_layers,
                 model.num_attention_heads, model.num_key_value_heads, model.tie_word_embeddings)


def strategy_name(strategy: Any) -> str:
    """conf/strategy name of a train.config.StrategyConfig (offload variants included)."""
    if strategy.kind == "ddp":
        return "ddp"
    if strategy.kind == "fsdp":
        return "fsdp_offload" if strategy.offload_params else "fsdp"
    name = f"zero{strategy.zero_stage}"
    return f"{name}_offload" if strategy.offload_optimizer and strategy.zero_stage == 3 else name


def plan_request(cfg: Any, lc: Any) -> dict[str, Any]:
    """Plan a validated launch: `cfg` the training Config, `lc` the LaunchConfig."""
    t = cfg.trainer
    world = lc.world_size
    global_batch = t.global_batch_size or t.micro_batch_size * t.grad_accum_steps * world
    setup = Setup(strategy=strategy_name(cfg.strategy), world=world, nnodes=lc.nnodes,
                  micro_batch=t.micro_batch_size, accum=max(1, global_batch // (t.micro_batch_size * world)),
                  seq_len=t.seq_len, checkpointing=t.activation_checkpointing, bf16=t.dtype != "fp32",
                  loss=t.loss, attention=cfg.model.attention)
    shape = shape_from_config(cfg.model, getattr(cfg.data, "vocab_size", None))
    return plan(shape, setup, lookup(lc.gpu), global_batch)
