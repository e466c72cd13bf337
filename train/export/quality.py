"""The perplexity each exported format loses, measured at export time (EXPORT/quality.json).

The reference is the trained model in fp32 (the checkpoint's weights). Every format is measured by
loading its own weights back, exactly as a server holds them (the safetensors in the export dtype;
each GGUF dequantized by the `gguf` package), into the same transformers model computing in fp32,
and running the project's evaluation (`train.loss.token_loss_sum`, the token-mean cross-entropy the
trainer's eval reports) over the same tokens. The difference is therefore the weights' format and
nothing else. Tokens: the run's validation split (the loader the trainer's eval reads) or
`export.quality_text`, at most `export.quality_tokens`.
"""
from __future__ import annotations

import gc
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from train.checkpoint_layout import CONFIG_FILE
from train.export.verify import ExportVerificationError, materialize_buffers

QUALITY_NAME = "quality.json"
_BATCH_ROWS = 8


class QualityError(ExportVerificationError):
    """A format loses more perplexity than export.quality_max_delta allows; nothing was published."""


def run_config(ckpt_path: Path) -> dict[str, Any]:
    """The run's resolved config.yaml saved with the checkpoint ({} when absent or unreadable)."""
    import yaml

    path = Path(ckpt_path) / CONFIG_FILE
    try:
        raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (OSError, yaml.YAMLError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _val_data(raw: dict[str, Any]) -> Any | None:
    """The run's webdataset config when it has a validation split; synthetic token ids say nothing
    about quality, so a synthetic run has none."""
    from data_pipeline.read.config import WebDatasetConfig, missing_val_split
    from data_pipeline.schema import ConfigError, load

    data = raw.get("data")
    if not isinstance(data, dict) or data.get("kind") != "webdataset":
        return None
    try:
        cfg = load(WebDatasetConfig, data, prefix="data")
    except (ConfigError, ValueError, TypeError):
        return None
    return None if missing_val_split(cfg) or not cfg.urls else cfg


def quality_source(cfg: Any, ckpt_path: Path) -> tuple[str, Any] | None:
    """('text', path) or ('val', data config) to measure on, or None when quality is off."""
    if cfg.quality is False:
        return None
    if cfg.quality_text:
        return "text", Path(cfg.quality_text).expanduser()
    data = _val_data(run_config(ckpt_path))
    if data is not None:
        return "val", data
    if cfg.quality:
        raise ValueError(f"export.quality=true but the run of {ckpt_path} has no validation split (its config.yaml "
                         "names no webdataset data with a val split): set export.quality_text=FILE, or "
                         "export.quality=null")
    return None


def _seq_len(cfg: Any, raw: dict[str, Any], config: Any) -> int:
    trainer = raw.get("trainer") if isinstance(raw.get("trainer"), dict) else {}
    length = cfg.quality_seq_len or trainer.get("seq_len") or 512
    return int(min(length, getattr(config, "max_position_embeddings", None) or length))


def evaluation_batches(cfg: Any, ckpt_path: Path, config: Any, tokenizer: Any) -> tuple[list[dict], str] | None:
    """The batches (input_ids, labels, position_ids) every format is measured on, and where they came from."""
    source = quality_source(cfg, ckpt_path)
    if source is None:
        return None
    seq_len = _seq_len(cfg, run_config(ckpt_path), config)
    kind, where = source
    if kind == "text":
        if tokenizer is None:
            raise ValueError(f"export.quality_text={str(where)!r} needs the run's tokenizer, and this checkpoint "
                             "has none (synthetic token ids): set export.quality=false")
        ids = tokenizer.encode(where.read_text(encoding="utf-8"), add_special_tokens=False)
        return _windows(ids, seq_len, cfg.quality_tokens), f"text file {where}"
    return _from_loader(where, seq_len, cfg.quality_tokens), "the run's validation split"


def _windows(ids: list[int], seq_len: int, budget: int) -> list[dict]:
    """Consecutive windows of seq_len predictions over a token stream, at most `budget` in all."""
    ids = ids[: budget + 1]
    if len(ids) < 2:
        raise ValueError("export.quality_text holds fewer than 2 tokens: nothing to measure perplexity on")
    batches = []
    for start in range(0, len(ids) - 1, seq_len):
        chunk = torch.tensor(ids[start:start + seq_len + 1], dtype=torch.long)
        n = chunk.numel() - 1
        batches.append({"input_ids": chunk[None, :n], "labels": chunk[None, 1:],
                        "position_ids": torch.arange(n)[None]})
    return batches


def _from_loader(data: Any, seq_len: int, budget: int) -> list[dict]:
    from data_pipeline import build_loader

    loader = build_loader(data, rank=0, world_size=1, micro_batch_size=_BATCH_ROWS, seq_len=seq_len, split="val")
    batches, tokens = [], 0
    for batch in loader:
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
        batches.append(batch)
        tokens += int((batch["labels"] != -100).sum())
        if tokens >= budget or len(batches) * _BATCH_ROWS * seq_len > 4 * budget:
            break
    if not batches:
        raise ValueError(f"the validation split of {data.urls} yielded no batch of seq_len {seq_len}")
    return batches


@torch.no_grad()
def perplexity(model: Any, batches: list[dict]) -> dict[str, float]:
    """Token-mean loss and its exp over `batches`, with the trainer's loss function."""
    from train.loss import token_loss_sum

    total, count = 0.0, 0
    for batch in batches:
        out = token_loss_sum(model, batch, "plain")
        total += float(out.sum)
        count += int(out.tokens)
    loss = total / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def fp32_model(config: Any, state: dict[str, torch.Tensor]) -> Any:
    """A transformers model of `config` holding `state` (upcast to fp32), built without a second copy."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    model.tie_weights()
    materialize_buffers(model)
    return model.eval()


Loader = Callable[[], dict[str, torch.Tensor]]


def measure(batches: list[dict], config: Any, reference: Loader, formats: Iterator[tuple[dict, Loader]],
            max_delta: float | None) -> dict[str, Any]:
    """quality.json's content: the reference's perplexity, then each format's, with its delta in percent.

    `formats` yields (description: format, file, size_bytes, bits_per_weight; its state-dict loader),
    one model in memory at a time."""
    ref = _evaluate(config, reference, batches)
    rows = []
    for info, load in formats:
        result = _evaluate(config, load, batches)
        delta = 100.0 * (result["perplexity"] / ref["perplexity"] - 1.0)
        rows.append({**info, "perplexity": result["perplexity"], "loss": result["loss"],
                     "delta_pct": delta, "passed": max_delta is None or delta <= max_delta})
    return {"tokens": ref["tokens"], "reference": {"format": "fp32 (trained weights)", **ref},
            "formats": rows, "max_delta_pct": max_delta}


def _evaluate(config: Any, load: Loader, batches: list[dict]) -> dict[str, float]:
    model = fp32_model(config, load())
    try:
        return perplexity(model, batches)
    finally:
        del model
        gc.collect()


def check(quality: dict[str, Any], export_path: Path) -> None:
    """Raise QualityError naming every format over export.quality_max_delta."""
    failed = [r for r in quality["formats"] if not r["passed"]]
    if failed:
        worst = ", ".join(f"{r['format']} +{r['delta_pct']:.2f}%" for r in failed)
        raise QualityError(f"export of {export_path} refused: perplexity over the fp32 reference "
                           f"({quality['reference']['perplexity']:.4g}) rose more than export.quality_max_delta="
                           f"{quality['max_delta_pct']}%: {worst}; nothing was published (raise the limit, or "
                           "drop those formats from export.gguf)")


def write(quality: dict[str, Any], out_dir: Path, source: str) -> None:
    (out_dir / QUALITY_NAME).write_text(json.dumps({**quality, "source": source}, indent=2) + "\n")


def table(quality: dict[str, Any]) -> str:
    """The markdown table of quality.json (export README and run report)."""
    ref = quality["reference"]
    lines = ["| format | file | size | bits/weight | perplexity | delta |", "|---|---|---:|---:|---:|---:|",
             f"| {ref['format']} | (checkpoint) | | 32 | {ref['perplexity']:.4f} | reference |"]
    for r in quality["formats"]:
        mark = "" if r["passed"] else " (over limit)"
        lines.append(f"| {r['format']} | `{r['file']}` | {r['size_bytes'] / 2**20:.2f} MiB | {r['bits_per_weight']:.2f} "
                     f"| {r['perplexity']:.4f} | {r['delta_pct']:+.2f}%{mark} |")
    return "\n".join(lines) + f"\n\nMeasured on {quality['tokens']:,} tokens of {quality.get('source', '?')}.\n"


def metrics(quality: dict[str, Any]) -> dict[str, float]:
    """Flat keys for the tracker: export/ppl_reference, export/ppl_delta_pct/<format>, ..."""
    out = {"export/ppl_reference": quality["reference"]["perplexity"]}
    for r in quality["formats"]:
        out[f"export/ppl/{r['format']}"] = r["perplexity"]
        out[f"export/ppl_delta_pct/{r['format']}"] = r["delta_pct"]
    return out
