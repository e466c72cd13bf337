"""Export one training checkpoint (any strategy) to a verified Hugging Face directory.

`export_checkpoint` is the single code path of the training hook and of
`python -m train.export`: read trainer_state.json, stream the fp32 weights tensor by tensor
into sharded safetensors in the export dtype, add config/generation config/tokenizer/model
card, verify by reloading with transformers, optionally write GGUF, hash every file into
export.json, then rename the temporary directory to its final name.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data_pipeline.fsutil import file_sha256
from train import faults
from train.checkpoint_layout import CONFIG_FILE
from train.export.adapter_checkpoint import (
    Adapter,
    export_parts,
    merged_view,
    read_adapter,
)
from train.export.artifacts import (
    TORCH_DTYPES,
    find_tokenizer_dir,
    hf_config,
    load_tokenizer,
    model_card,
    param_count,
    save_generation_config,
)
from train.export.checkpoint_reader import Checkpoint, CheckpointError, open_checkpoint
from train.export.config import ExportConfig, parse_size
from train.export.files import META_NAME, clean_stale, hash_tree, publish, temp_dir_for
from train.export.peft_export import LoraMergedWeights, peft_reference_logits
from train.export.safetensors_writer import TensorSpec, write_sharded
from train.export.target import check_target
from train.export.verify import (
    ExportVerificationError,
    check_export,
    check_finite,
    reference_logits_from_checkpoint,
    tolerance,
    verify_batch,
)

FORMAT_VERSION = 1


def export_names(config: Any, ckpt: Checkpoint) -> tuple[dict[str, str], list[str]]:
    """Export name -> checkpoint name for every tensor the model needs, and the dropped names.

    The model is built on the meta device to learn its state-dict keys; tied parameters
    (lm_head when tie_word_embeddings) are written once, as save_pretrained does. Extra
    checkpoint entries (e.g. rotary caches) are dropped and listed in export.json.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen: set[int] = set()
    wanted: list[tuple[str, torch.Size]] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in seen:
            seen.add(id(param))
            wanted.append((name, param.shape))
    persistent = set(model.state_dict())
    wanted += [(n, b.shape) for n, b in model.named_buffers() if n in persistent]
    available = set(ckpt.weights.names())
    missing = [n for n, _ in wanted if n not in available]
    if missing:
        raise CheckpointError(f"{ckpt.path}: the checkpoint lacks {len(missing)} tensors the "
                              f"{type(model).__name__} needs, e.g. {missing[:5]}")
    bad = [f"{n}: checkpoint {tuple(ckpt.weights.shape(n))}, model {tuple(s)}"
           for n, s in wanted if tuple(ckpt.weights.shape(n)) != tuple(s)]
    if bad:
        raise CheckpointError(f"{ckpt.path}: shapes disagree with model_config: {bad[:5]}")
    keep = {n for n, _ in wanted}
    return {n: n for n, _ in wanted}, sorted(available - keep)


def _digest_config(ckpt: Checkpoint) -> str | None:
    path = ckpt.path / CONFIG_FILE
    return "sha256:" + file_sha256(path) if path.is_file() else None


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, cfg: ExportConfig,
                      reference_logits: torch.Tensor | None = None,
                      reference_precision: str = "fp32") -> dict[str, Any]:
    """Export `checkpoint_dir` to `out_dir` atomically; returns the export.json metadata.

    reference_logits: logits of the training model on `verify_batch(vocab_size)`, computed by
    the live model during training; None = rebuild the fp32 model from the checkpoint.
    reference_precision: the precision those logits were computed in (bf16 under autocast),
    which widens the tolerance. Raises ExportVerificationError (nothing published) on mismatch.
    """
    started = time.perf_counter()
    ckpt = open_checkpoint(checkpoint_dir)
    out = Path(out_dir).absolute()
    check_target(out, ckpt.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent, out.name)
    config = hf_config(ckpt.model_config, cfg.dtype)
    config.architectures = config.architectures or [_architecture(config)]
    if cfg.gguf_types:
        from train.export.gguf_export import check_supported

        check_supported(config)
    adapter = read_adapter(ckpt)
    write_model, write_adapter = export_parts(cfg.adapter, adapter, ckpt.path)
    if adapter is not None:
        ckpt = merged_view(ckpt, adapter, hf_config(ckpt.model_config, "fp32"))
    names, dropped = export_names(config, ckpt)
    tok_dir = find_tokenizer_dir(ckpt.tokenizer_dir, ckpt.path)
    tokenizer = load_tokenizer(tok_dir) if tok_dir else None
    tmp = temp_dir_for(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        meta = _build(ckpt, config, names, dropped, tokenizer, tok_dir, tmp, cfg, reference_logits,
                      reference_precision, write_model, adapter if write_adapter else None)
        meta["export_time_s"] = round(time.perf_counter() - started, 3)
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta["path"] = str(out)
    return meta


def _build(ckpt: Checkpoint, config: Any, names: dict[str, str], dropped: list[str], tokenizer: Any,
           tok_dir: Path | None, tmp: Path, cfg: ExportConfig, reference_logits: torch.Tensor | None,
           reference_precision: str, write_model: bool = True, adapter: Adapter | None = None) -> dict[str, Any]:
    digests, shapes = _write_model(ckpt, config, names, tokenizer, tmp, cfg) if write_model else ({}, [])
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source_checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "tokens": ckpt.state.get("tokens"),
        "strategy": ckpt.strategy,
        "world_size": ckpt.state.get("world_size"),
        "dtype": cfg.dtype,
        "model_type": config.model_type,
        "architectures": config.architectures,
        "config_digest": ckpt.state.get("config_digest"),
        "config_yaml_sha256": _digest_config(ckpt),
        "tokenizer": ({"source": str(tok_dir), "class": type(tokenizer).__name__,
                       "eos_token": tokenizer.eos_token} if tokenizer is not None else None),
        "dropped_keys": dropped,
        "versions": _versions(),
        "merged_model": write_model,
    }
    if tokenizer is None:
        meta["tokenizer_note"] = ("no tokenizer: the run trained on synthetic token ids "
                                  "(trainer_state.json tokenizer_dir is null)")
    meta["verification"] = (_verify(ckpt, config, names, tmp, cfg, tokenizer, reference_logits,
                                    reference_precision) if cfg.verify and write_model else None)
    if cfg.gguf_types and write_model:
        meta["gguf_files"] = _write_ggufs(ckpt, config, names, tmp, cfg)
        meta["gguf"] = meta["gguf_files"][0]  # the first type, as export.json had it with one type
    if write_model:
        meta["quality"] = _quality(ckpt, config, names, tmp, cfg, meta, tokenizer)
    if adapter is not None:
        from train.export.peft_export import write_peft_adapter

        meta["adapter"] = {"dir": "adapter", "kind": adapter.kind, "base_model": str(adapter.base_dir),
                           **write_peft_adapter(tmp / "adapter", adapter.base_dir, adapter.state, adapter.config)}
    n_params = param_count(shapes)
    (tmp / "README.md").write_text(model_card(meta, n_params))
    meta["parameters"] = n_params
    meta["files"] = hash_tree(tmp, known=digests)
    return meta


def _write_model(ckpt: Checkpoint, config: Any, names: dict[str, str], tokenizer: Any, tmp: Path,
                 cfg: ExportConfig) -> tuple[dict[str, str], list[tuple[int, ...]]]:
    """Weights (streamed, NaN/inf refused), config.json and generation_config.json into `tmp`."""
    dtype = TORCH_DTYPES[cfg.dtype]
    source = ckpt.weights

    def out_dtype(name: str) -> torch.dtype:
        return dtype if source.dtype(names[name]).is_floating_point else source.dtype(names[name])

    specs = [TensorSpec(n, tuple(source.shape(src)), out_dtype(n)) for n, src in names.items()]
    # disable=None: a bar on a terminal, silent in logs and batch jobs
    with tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="export",
              disable=None) as bar:
        def fetch(name: str) -> torch.Tensor:
            tensor = source.load(names[name]).to(out_dtype(name))
            check_finite(name, tensor, ckpt.path, cfg.dtype)
            bar.update(tensor.numel() * tensor.element_size())
            return tensor

        digests = write_sharded(tmp, specs, parse_size(cfg.max_shard_size), fetch)
    faults.hit("export.write")
    config.use_cache = True  # training turns the KV cache off to save memory; serving wants it
    if tokenizer is not None:
        config.eos_token_id = tokenizer.eos_token_id if config.eos_token_id is None else config.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id if config.bos_token_id is None else config.bos_token_id
    config.save_pretrained(str(tmp))
    save_generation_config(config, tmp, tokenizer)
    return digests, [s.shape for s in specs]


def _checkpoint_source(ckpt: Checkpoint, names: dict[str, str]) -> Any:
    """Export name -> the checkpoint's fp32 tensor, as numpy (GGUF is quantized from the trained values)."""
    return lambda name: ckpt.weights.load(names[name]).detach().float().numpy()


def _write_ggufs(ckpt: Checkpoint, config: Any, names: dict[str, str], tmp: Path,
                 cfg: ExportConfig) -> list[dict[str, Any]]:
    """model-TYPE.gguf for every export.gguf type, each checked against the fp32 weights, with a Modelfile."""
    from train.export.gguf_export import verify_gguf, write_gguf
    from train.export.modelfile import write_modelfile

    infos = []
    for kind in cfg.gguf_types:
        started = time.perf_counter()
        source = _checkpoint_source(ckpt, names)
        info = write_gguf(tmp, config, kind, name=f"{config.model_type}-step{ckpt.step}", source=source)
        info["time_s"] = round(time.perf_counter() - started, 3)
        info["verification"] = verify_gguf(tmp, config, info["file"], source=source)
        info["modelfile"] = write_modelfile(tmp, info["file"], kind)
        infos.append(info)
    return infos


def _quality(ckpt: Checkpoint, config: Any, names: dict[str, str], tmp: Path, cfg: ExportConfig,
             meta: dict[str, Any], tokenizer: Any) -> dict[str, Any] | None:
    """Perplexity of the fp32 reference and of every written format (quality.json), or None when off."""
    from train.export import quality

    found = quality.evaluation_batches(cfg, ckpt.path, config, tokenizer)
    if found is None:
        return None
    batches, source = found
    ref_config = hf_config(ckpt.model_config, "fp32")
    n_params = sum(int(torch.Size(ckpt.weights.shape(src)).numel()) for src in names.values())

    def formats() -> Any:
        from safetensors.torch import load_file

        shards = sorted(tmp.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in shards)
        yield ({"format": f"hf-{cfg.dtype}", "file": "*.safetensors", "size_bytes": size,
                "bits_per_weight": 8 * size / max(1, n_params)},
               lambda: {k: v for p in shards for k, v in load_file(p).items()})
        for info in meta.get("gguf_files") or []:
            from train.export.gguf_export import load_gguf_state

            yield ({"format": f"gguf-{info['type']}", "file": info["file"], "size_bytes": info["size_bytes"],
                    "bits_per_weight": info["bits_per_weight"]},
                   lambda file=info["file"]: load_gguf_state(tmp, file, ref_config))

    reference = _checkpoint_source(ckpt, names)
    result = quality.measure(batches, ref_config, lambda: {n: torch.from_numpy(reference(n)) for n in names},
                             formats(), cfg.quality_max_delta)
    result["source"] = source
    quality.write(result, tmp, source)
    quality.check(result, ckpt.path)
    return result


def _verify(ckpt: Checkpoint, config: Any, names: dict[str, str], tmp: Path, cfg: ExportConfig,
            tokenizer: Any, reference_logits: torch.Tensor | None, reference_precision: str) -> dict[str, Any]:
    batch = verify_batch(config.vocab_size, getattr(config, "max_position_embeddings", None))
    if reference_logits is None and isinstance(ckpt.weights, LoraMergedWeights):
        source = ckpt.weights
        reference = peft_reference_logits(source.base.dir, source.state, source.config, batch)
        origin = "peft model of the base and the unmerged adapter (fp32)"
    elif reference_logits is None:
        ref_config = hf_config(ckpt.model_config, "fp32")
        reference = reference_logits_from_checkpoint(ref_config, ckpt.weights, names, batch)
        origin = "checkpoint fp32 weights"
    else:
        reference = reference_logits.detach().float().cpu()
        origin = f"live training model ({reference_precision})"
    tol = tolerance(cfg.dtype, reference_precision, cfg.verify_tolerance)
    report = check_export(tmp, reference, batch, tol, cfg.verify_new_tokens, tokenizer)
    report["reference"] = origin
    if not report["passed"]:
        raise ExportVerificationError(
            f"export of {ckpt.path} failed verification: max |logit diff| {report['max_abs_diff']:.4g} "
            f"= {report['relative_diff']:.4g} of max |logit|, tolerance {tol:.3g} for dtype {cfg.dtype} "
            f"(reference: {origin}); nothing was published")
    return report


def _architecture(config: Any) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
