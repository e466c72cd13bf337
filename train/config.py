"""The typed schema under the YAML in conf/.

Hydra composes plain YAML; `load_config` turns it into these dataclasses and collects every
problem (unknown keys, wrong types, bad values, impossible combinations) into one
`ConfigError` that names each key and its fix, before any process group starts.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_pipeline.read.config import (
    SyntheticDataConfig,
    WebDatasetConfig,
    chat_len_problems,
    missing_local,
    missing_val_split,
    mix_kind_problems,
    source_configs,
)
from data_pipeline.schema import ConfigError, build, load
from train.adapters.config import AdapterConfig, adapter_problems
from train.export.config import ExportConfig
from train.objectives.config import ObjectiveConfig
from train.strategies.config import DDPConfig, StrategyConfig
from train.tracking.config import TrackingConfig

__all__ = ["Config", "ConfigError", "build", "load_config", "grad_accum_steps", "env_world_size"]


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory shared by all ranks (and all nodes): checkpoints, metrics, exports."""
    name: str = "scaletrain"
    lock_stale_s: float = 300.0
    """A run lock (RUN_DIR/run.lock) whose heartbeat is older than this is taken over with a warning
    (a dead pid on the same host, or a requeue of the same SLURM job, at once)."""


@dataclass
class ModelConfig:
    """A Llama-style decoder built from config, or a local Hugging Face checkpoint."""

    name: str = "tiny"
    kind: Literal["llama", "hf_local"] = "llama"
    """`llama` (built from the fields below) or `hf_local` (loaded from `path`)."""
    path: str | None = None
    """Local Hugging Face checkpoint directory for kind=hf_local (never downloaded)."""
    trust_remote_code: bool = False
    """Run model code shipped inside a checkpoint; off unless you trust it."""
    vocab_size: int | None = None
    """null = the data's vocabulary size."""
    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    base_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Dtype of the frozen base parameters under an adapter (adapter=lora): `auto` = the dtype the
    safetensors files store (bf16 for a model built from config), so the base is never rounded;
    trainable parameters always keep fp32 masters. Full fine-tuning trains in fp32 masters; its DPO
    reference copy (objective=dpo) is stored in this dtype (`auto` there: fp32 for a from-config model)."""
    attention: Literal["sdpa", "flex", "flash"] = "sdpa"
    """Attention kernel. `sdpa`: torch SDPA with the block-diagonal mask of packed documents (portable);
    `flex`: FlexAttention with a document block mask built once per batch; `flash`: flash-attn varlen
    (CUDA, needs the flash-attn package)."""


@dataclass
class OptimConfig:
    kind: Literal["adamw"] = "adamw"
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    """`cosine` (linear warmup then cosine decay), `linear` (linear warmup then linear decay, the
    transformers/TRL default) or `constant` (linear warmup then flat)."""
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the run's steps (as TRL/axolotl's warmup_ratio; for trainer.epochs
    runs, whose step count is known only at start-up); use it or warmup_steps, not both."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of optim.lr (cosine, linear)."""


@dataclass
class TrainerConfig:
    max_steps: int | None = None
    """Optimizer steps to run; null = derived from `trainer.epochs`, or 100 when that is null too."""
    epochs: float | None = None
    """Passes over the data instead of `max_steps` (e.g. 3, or 0.5): the step count comes from the
    manifests' token (packed text) or row (chat) counts and the global batch; the log says how."""
    max_tokens: int | None = None
    """Stop once this many real input tokens (global, padding excluded: metrics' `tokens`) have
    been seen, if reached before max_steps."""
    micro_batch_size: int = 2
    """Sequences per rank per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (ignored when global_batch_size is set)."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all ranks; sets grad_accum_steps from the world size."""
    seq_len: int = 64
    seed: int = 0
    grad_clip: float = 1.0
    """Max global grad norm (0 = no clipping)."""
    log_every: int = 1
    eval_every: int = 0
    """Evaluate every N steps (0 = never)."""
    eval_batches: int = 4
    activation_checkpointing: bool = False
    compile: bool = False
    """torch.compile each decoder block (after activation checkpointing, before sharding)."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """auto (bf16 on GPU, fp32 on CPU), fp32 or bf16."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto, cpu or cuda."""
    tf32: bool = True
    """On a GPU, let fp32 matmuls and convolutions use TF32 tensor cores (fp32 range, 10-bit mantissa:
    the optimizer step, fp32 runs, the fp32 parts of bf16 runs). false = full IEEE fp32."""
    loss: Literal["plain", "chunked", "fused"] = "chunked"
    """`chunked`: cross-entropy a chunk of tokens at a time, fused with the output projection (never the
    full-vocabulary fp32 logits); `plain`: full logits upcast to fp32; `fused`: Liger's kernel (CUDA)."""
    spike_factor: float | None = None
    """Skip a step whose loss exceeds this many times the median of recent losses (null = off).
    A step with a non-finite loss or gradient norm on any rank is always skipped."""
    max_bad_steps: int = 5
    """After this many skipped steps in a row, roll back to the newest finite checkpoint and
    skip past the data that caused them."""
    max_rollbacks: int = 3
    """Rollbacks allowed per run; one more stops the run with an error naming the bad steps."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Checkpoint every N steps (0 = only at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = 3
    """Complete checkpoints kept; the newest complete one is never deleted."""
    resume: bool = True
    """Resume automatically from checkpoints/latest when present."""
    at_end: bool = True
    async_save: bool = field(default=False, metadata={"key": "async"})
    """`checkpoint.async`: stage the state, write it in the background (DDP and FSDP2; DeepSpeed
    saves blocking). A checkpoint becomes `latest` only once its write has completed."""
    verify: bool = False
    """Record an xxhash of every checkpoint file; resume and export check it and fall back to
    an older checkpoint on a mismatch."""


@dataclass
class DistConfig:
    timeout_s: float = 1800.0
    """Seconds a collective waits for every rank (the process group's timeout); a rank that stops
    responding then ends the job with a message naming the step and, where known, the rank."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=DDPConfig)
    data: SyntheticDataConfig | WebDatasetConfig = field(default_factory=SyntheticDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


def env_world_size() -> int:
    """World size as the launcher announces it, before any process group exists."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            if var == "SLURM_NTASKS" and "LOCAL_RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
                continue
            return int(os.environ[var])
    return 1


def validate(cfg: Config, world_size: int) -> list[str]:
    """Cross-field checks (types and enumerations are checked by the converter); returns problems."""
    t, m = cfg.trainer, cfg.model
    llama = m.kind == "llama"
    rules = [
        (t.max_steps is not None and t.epochs is not None,
         f"trainer.max_steps={t.max_steps} and trainer.epochs={t.epochs} are both set: train for a step "
         "count or for epochs, not both (set trainer.max_steps=null or trainer.epochs=null)"),
        (t.max_steps is not None and t.max_steps < 1, f"trainer.max_steps={t.max_steps}: must be >= 1"),
        (t.epochs is not None and not t.epochs > 0, f"trainer.epochs={t.epochs}: must be > 0"),
        (t.epochs is not None and not isinstance(cfg.data, WebDatasetConfig),
         f"trainer.epochs={t.epochs} needs prepared data (data=webdataset or data=mix): data={cfg.data.kind} "
         "has no epochs; set trainer.max_steps instead"),
        (t.micro_batch_size < 1, f"trainer.micro_batch_size={t.micro_batch_size}: must be >= 1"),
        (t.grad_accum_steps < 1, f"trainer.grad_accum_steps={t.grad_accum_steps}: must be >= 1"),
        (t.seq_len < 2, f"trainer.seq_len={t.seq_len}: must be >= 2"),
        (llama and t.seq_len > m.max_position_embeddings,
         f"trainer.seq_len={t.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}: "
         "lower trainer.seq_len"),
        (m.kind == "hf_local" and not m.path,
         "model.path is not set: model=hf_local needs model.path=/local/hf/checkpoint"),
        (m.kind == "hf_local" and bool(m.path) and not (Path(m.path or ".") / "config.json").is_file(),
         f"model.path={m.path!r} has no config.json: point it at a local Hugging Face checkpoint "
         "directory (nothing is downloaded)"),
        (llama and m.hidden_size % max(1, m.num_attention_heads) != 0,
         f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}"),
        (llama and m.num_attention_heads % max(1, m.num_key_value_heads) != 0,
         f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
         f"model.num_key_value_heads={m.num_key_value_heads}"),
        (cfg.checkpoint.keep_last < 1, f"checkpoint.keep_last={cfg.checkpoint.keep_last}: must be >= 1"),
        (t.max_bad_steps < 1, f"trainer.max_bad_steps={t.max_bad_steps}: must be >= 1"),
        (t.max_rollbacks < 0, f"trainer.max_rollbacks={t.max_rollbacks}: must be >= 0"),
        (t.spike_factor is not None and t.spike_factor <= 1,
         f"trainer.spike_factor={t.spike_factor}: must be > 1 (or null to turn spike skipping off)"),
        (not cfg.run.lock_stale_s > 0, f"run.lock_stale_s={cfg.run.lock_stale_s}: must be > 0 (seconds)"),
        (cfg.schedule.warmup_steps > 0 and cfg.schedule.warmup_ratio > 0,
         f"schedule.warmup_steps={cfg.schedule.warmup_steps} and schedule.warmup_ratio="
         f"{cfg.schedule.warmup_ratio} are both set: use one (set the other to 0)"),
        (not 0 <= cfg.schedule.warmup_ratio < 1, f"schedule.warmup_ratio={cfg.schedule.warmup_ratio}: "
         "must be in [0, 1)"),
        (not cfg.dist.timeout_s > 0, f"dist.timeout_s={cfg.dist.timeout_s}: must be > 0 (seconds)"),
    ]
    p = [msg for bad, msg in rules if bad]
    if t.compile and cfg.strategy.compile_problem():
        p.append(cfg.strategy.compile_problem())
    if t.global_batch_size is not None and t.micro_batch_size >= 1 and \
            t.global_batch_size % (t.micro_batch_size * world_size):
        per_step = t.micro_batch_size * world_size
        p.append(f"trainer.global_batch_size={t.global_batch_size} is not a multiple of "
                 f"trainer.micro_batch_size x world size = {t.micro_batch_size} x {world_size}: "
                 f"set trainer.global_batch_size to a multiple of {per_step} or change "
                 "trainer.micro_batch_size")
    if cfg.objective.kind == "dpo" and not isinstance(cfg.data, WebDatasetConfig):
        p.append("objective=dpo reads preference pairs: set data=webdataset data.urls=DIR (the output "
                 "of `python -m data_pipeline.prepare mode=preference`)")
    for section in (cfg.strategy, cfg.data, cfg.tracking, cfg.export, cfg.adapter, cfg.objective):
        p.extend(section.validate())
    p.extend(adapter_problems(cfg.adapter, m.kind, cfg.strategy.kind, t.device, cfg.export.kind))
    if isinstance(cfg.data, WebDatasetConfig):
        mix = bool(cfg.data.mix)
        for i, (_, _, source) in enumerate(source_configs(cfg.data)):
            key = f"data.mix[{i}].urls" if mix else "data.urls"
            p.extend(missing_local(source.urls, key))
            p.extend(chat_len_problems(source, t.seq_len))
            if t.eval_every > 0:
                p.extend(missing_val_split(source))
        p.extend(mix_kind_problems(cfg.data))
        if not p:  # one HEAD of a remote manifest, only once the settings themselves are sound
            from data_pipeline.read.remote_table import unreachable

            for _, _, source in source_configs(cfg.data):
                p.extend(unreachable(source))
    p.extend(_check_run_dir(cfg.run.dir))
    p.extend(_fresh_start_problems(cfg))
    if m.kind == "hf_local" and m.path:
        p.extend(_context_problems(Path(m.path), t.seq_len))
    return p


def _context_problems(path: Path, seq_len: int) -> list[str]:
    """trainer.seq_len beyond an hf_local model's max_position_embeddings trains positions the model
    never saw (and RoPE tables it never had): an error, unless its config.json sets rope_scaling."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return []  # a missing config.json is reported above; the loader reports an unreadable one
    sub = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    limit = sub.get("max_position_embeddings") if isinstance(sub, dict) else None
    if not isinstance(limit, int) or seq_len <= limit:
        return []
    scaling = sub.get("rope_scaling")
    if isinstance(scaling, dict) and scaling:
        logging.getLogger("scaletrain").warning(
            "trainer.seq_len=%d exceeds max_position_embeddings=%d of %s; its rope_scaling %s extends the "
            "context", seq_len, limit, path / "config.json", scaling)
        return []
    return [f"trainer.seq_len={seq_len} exceeds max_position_embeddings={limit} of model.path={str(path)!r} "
            f"(its config.json): set trainer.seq_len<={limit}, or use a model whose config.json sets rope_scaling "
            "for longer contexts"]


def _fresh_start_problems(cfg: Config) -> list[str]:
    """checkpoint.resume=false on a run.dir that holds checkpoints would start over on top of them:
    retention and the new run's own step numbers would replace them, and metrics.jsonl with them."""
    if cfg.checkpoint.resume:
        return []
    from train.checkpoint_layout import CHECKPOINTS_DIR, complete_checkpoints

    found = complete_checkpoints(Path(cfg.run.dir) / CHECKPOINTS_DIR)
    if not found:
        return []
    return [f"checkpoint.resume=false but run.dir={cfg.run.dir!r} holds the checkpoints of an earlier run "
            f"({len(found)}, newest {found[0].name}): a run directory belongs to one run. Start the new run "
            "with a new run.dir, or resume this one (checkpoint.resume=true)"]


def _check_run_dir(run_dir: str) -> list[str]:
    path = Path(run_dir).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return [f"run.dir={run_dir!r}: {probe} is a file, not a directory; choose another run.dir"]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [f"run.dir={run_dir!r}: {probe} is not writable; choose a writable run.dir"]
    return []


def load_config(raw: dict[str, Any], world_size: int | None = None) -> Config:
    """Turn a resolved config mapping into `Config`, raising one ConfigError with every problem."""
    raw = {k: v for k, v in raw.items() if k not in ("hydra", "launch", "target", "dry_run", "format")}
    world = world_size if world_size is not None else env_world_size()
    cfg = load(Config, raw, lambda cfg: validate(cfg, world))
    if cfg.trainer.max_steps is None and cfg.trainer.epochs is None:
        cfg.trainer.max_steps = DEFAULT_MAX_STEPS
    return cfg


DEFAULT_MAX_STEPS = 100
"""`trainer.max_steps` when neither it nor `trainer.epochs` is set."""


def grad_accum_steps(cfg: TrainerConfig, world_size: int) -> int:
    if cfg.global_batch_size is None:
        return cfg.grad_accum_steps
    return cfg.global_batch_size // (cfg.micro_batch_size * world_size)
