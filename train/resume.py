"""Resume (and roll back) from the best checkpoint that actually loads, and say what changed.

Every file read back here is untrusted: a checkpoint whose trainer_state.json, checksums, rank
files (RNG and loader state) or engine state cannot be used is skipped with a warning naming
the file, and the next older one is tried; all ranks agree on each verdict, so they always
load the same checkpoint. When none of the run's checkpoints loads, the run stops saying why
(`NoCheckpointLoads`): starting over at step 0 would let retention delete them. Before loading,
the checkpoint's recorded config is compared with the new one: shape, adapter and engine changes
that cannot load refuse with the fix, optimizer and schedule changes take the new value, data
and batch changes are warnings.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from torch.distributed.checkpoint.api import CheckpointException

from data_pipeline.schema import ConfigError
from train import dist as d
from train.checkpoint import (
    TrainState,
    describe_error,
    load_rank_files,
    load_train_state,
    resume_candidates,
    set_rng_state,
)
from train.checkpoint_layout import (
    CONFIG_FILE,
    LayoutError,
    check_checkpoint,
    check_checksums,
    complete_checkpoints,
    read_text,
)
from train.config import Config
from train.strategies.base import Strategy

log = logging.getLogger("scaletrain")
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings")
NEW_WINS = ("optim.", "schedule.", "trainer.max_steps", "trainer.max_tokens", "trainer.epochs")
DATA_KEYS = ("data.", "trainer.seq_len", "trainer.micro_batch_size", "trainer.grad_accum_steps",
             "trainer.global_batch_size")
DCP_KINDS = {"ddp", "fsdp"}  # both write torch.distributed.checkpoint model/ and optim/
# What an adapter checkpoint's weights and meaning depend on: (trainer_state key, config key).
ADAPTER_KEYS = (("r", "adapter.r"), ("lora_alpha", "adapter.alpha"), ("target_modules", "adapter.target_modules"),
                ("modules_to_save", "adapter.modules_to_save"))
WAYS_FORWARD = ("keep the old settings, or start a new run with a new run.dir (this run.dir's checkpoints "
                "and metrics.jsonl stay as they are)")


class NoCheckpointLoads(ConfigError):
    """The run.dir holds checkpoints and none of them loads: stop rather than start over."""


def candidates(root: Path, cfg: Config, info: d.DistInfo) -> list[Path]:
    """Checkpoints to try, best first, as rank 0 sees them (every rank gets the same list).
    Step directories that exist but are all incomplete or corrupt raise NoCheckpointLoads."""
    if not cfg.checkpoint.resume:
        return []
    found: tuple[list[str], list[str]] | None = None
    if info.is_main:
        paths = resume_candidates(root)
        broken = [] if paths else [f"checkpoint {p}: {check_checkpoint(p)}" for p in complete_checkpoints(root)]
        found = ([str(p) for p in paths], broken)
    paths, broken = d.broadcast_object(found)
    if broken:
        raise NoCheckpointLoads([*broken, f"none of the checkpoints in {root} is complete, and starting over "
                                 "would let checkpoint.keep_last delete them: nothing was changed. Fix or move "
                                 f"the files named above, or {WAYS_FORWARD}"], what="resume")
    return [Path(p) for p in paths]


def check_changes(path: Path, cfg: Config, public_cfg: dict[str, Any], model_config: dict[str, Any]) -> None:
    """Compare checkpoint `path` with this run; raise ConfigError for what cannot be resumed."""
    try:
        saved = load_train_state(path)
    except LayoutError:
        return  # restore() skips it with the reason
    problems = (_shape_changes(saved.model_config, model_config) + adapter_changes(saved.adapter, cfg.adapter)
                + _strategy_change(saved.strategy, cfg))
    if problems:
        raise ConfigError([*problems, f"checkpoint {path} cannot be resumed with this config: {WAYS_FORWARD}"],
                          what="resume")
    old = _flat(_saved_config(path))
    if not old:
        return
    new = _flat(public_cfg)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    for key in changed:
        what = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        if key.startswith(NEW_WINS):
            log.warning("resume: %s (the new value is used)", what)
        elif key.startswith(DATA_KEYS):
            log.warning("resume: %s (the loader continues at the checkpoint's stream position)", what)
        else:
            log.info("resume: %s", what)


def _shape_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"model.{k}: the checkpoint has {old[k]!r}, this run {new[k]!r} (a different model shape)"
            for k in SHAPE_KEYS if k in old and k in new and old[k] != new[k]]


def adapter_changes(saved: dict[str, Any] | None, adapter: Any) -> list[str]:
    """An adapter checkpoint belongs to its adapter: kind, rank, alpha, target modules and modules
    to save (peft would load a differently shaped adapter as "corrupt", or a different one silently)."""
    now = adapter.lora_config() if adapter.kind != "none" else None
    if saved is None or now is None:
        if (saved is None) == (now is None):
            return []
        was = f"adapter={saved['kind']}" if saved else "adapter=none (full fine-tuning)"
        return [f"adapter.kind: the checkpoint was trained with {was}, this run has adapter={adapter.kind}"]
    old = saved.get("lora_config") or {}
    out = []
    if saved.get("kind") != adapter.kind:
        out.append(f"adapter.kind: the checkpoint has {saved.get('kind')!r}, this run {adapter.kind!r}")
    for key, name in ADAPTER_KEYS:
        a, b = old.get(key), now.get(key)
        if isinstance(a, list) and isinstance(b, list):
            a, b = sorted(a), sorted(b)  # peft matches names, the order does not matter
        if key in old and a != b:
            out.append(f"{name}: the checkpoint has {old.get(key)!r}, this run {now.get(key)!r}")
    return out


def _strategy_change(old: dict[str, Any], cfg: Config) -> list[str]:
    s = cfg.strategy
    was, now = old.get("kind"), s.kind
    if was is None or was == now:
        if now == "deepspeed" and old.get("zero_stage", s.zero_stage) != s.zero_stage:
            return [f"strategy.zero_stage: the checkpoint was written by ZeRO stage {old.get('zero_stage')}, "
                    f"this run uses {s.zero_stage}; resume with strategy={old.get('name')}"]
        return []
    if {was, now} <= DCP_KINDS:
        log.warning("resume: strategy %s -> %s: converting through torch.distributed.checkpoint (resharded)",
                    was, now)
        return []
    return [f"strategy: the checkpoint was written by {old.get('name', was)} ({was}), this run uses "
            f"{s.name} ({now}), and their optimizer states do not convert; resume with "
            f"strategy={old.get('name', was)}, or carry the weights over: python -m train.export "
            "checkpoint=CHECKPOINT out=DIR, then a new run.dir with model=hf_local model.path=DIR"]


def _saved_config(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(read_text(path / CONFIG_FILE))
    except (LayoutError, yaml.YAMLError) as e:
        log.warning("resume: cannot compare configs, %s is unreadable (%s)", path / CONFIG_FILE, e)
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def restore(paths: list[Path], strategy: Strategy, loader, info: d.DistInfo,
            verify: bool = True) -> tuple[Path, TrainState] | tuple[None, None]:
    """Collective: load the first of `paths` that every rank can load. `loader=None` is a
    rollback: only checkpoints recorded finite, and the loader stays where it is.
    Returns the checkpoint and its state, or (None, None) when `paths` is empty or (rollback) none
    is usable; on resume, raises NoCheckpointLoads when checkpoints exist and none loads."""
    reasons: list[str] = []
    for path in paths:
        saved, problem = _prepare(path, loader, info, verify)
        if problem is None and loader is None and not saved.finite:
            problem = "not recorded as finite (written before the NaN guard)"
        if _agree(path, problem, info, reasons):
            continue
        try:
            strategy.load(path, saved.world_size)
            problem = None
        except (Exception, CheckpointException) as e:  # any bytes in the engine's files (DCP's is a BaseException)
            problem = f"the engine cannot load it, a file is corrupt or not from this trainer ({describe_error(e)})"
        if _agree(path, problem, info, reasons):
            continue
        return path, saved
    if paths and loader is not None:
        raise NoCheckpointLoads([*reasons, f"none of the {len(paths)} checkpoints in {paths[0].parent} loads, and "
                                 "starting over would let checkpoint.keep_last delete them: nothing was "
                                 f"changed. Fix or move the files named above, or {WAYS_FORWARD}"], what="resume")
    return None, None


def _prepare(path: Path, loader, info: d.DistInfo, verify: bool) -> tuple[TrainState | None, str | None]:
    """This rank's checks and the rank files: what can fail without a collective."""
    try:
        saved = load_train_state(path)
        if verify and saved.checksums:
            share = sorted(saved.checksums.items())[info.rank::info.world_size]
            bad = check_checksums(path, dict(share))
            if bad:
                return saved, bad
        rng, data_states = load_rank_files(path, info, saved.world_size)
        set_rng_state(rng)
        if loader is not None:
            _load_loader(loader, data_states, saved.world_size, info.world_size, path)
        return saved, None
    except Exception as e:  # LayoutError, or a rank file that unpickles to something else
        return None, describe_error(e)


def _load_loader(loader, states: list[dict], saved_world: int, world: int, path: Path) -> None:
    if saved_world == world:
        loader.load_state_dict(states[0])
    else:
        log.warning("checkpoint %s was written by %d ranks; resuming on %d (resharded)", path, saved_world, world)
        loader.load_elastic(states)


def _agree(path: Path, problem: str | None, info: d.DistInfo, reasons: list[str]) -> bool:
    """Collective: True (and a warning naming each rank's problem, kept in `reasons`) when any rank has one."""
    problems = [(r, p) for r, p in enumerate(d.all_gather_object(problem)) if p]
    for rank, p in problems if info.is_main else ():
        log.warning("skipping checkpoint %s (rank %d): %s", path, rank, p)
    reasons.extend(f"checkpoint {path} (rank {rank}): {p}" for rank, p in problems[:1])
    return bool(problems)
