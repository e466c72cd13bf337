"""Helpers shared by the export tests (no tests here).

`make_checkpoint` writes a checkpoint in the trainer's documented layout (trainer_state.json,
config.yaml, model/ as torch.distributed.checkpoint) from a real tiny transformers model, so
the writer, verification, GGUF and CLI are tested without a training run; the trainer's own
checkpoints are covered in test_export_strategies.py.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TINY_LLAMA = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@dataclass
class Ckpt:
    path: Path
    state_dict: dict[str, torch.Tensor]
    model: Any


def make_checkpoint(root: Path, step: int = 2, config: Any = None, tokenizer_dir: str | None = None,
                    seed: int = 0, poison: dict[str, float] | None = None, model: Any = None) -> Ckpt:
    """RUN/checkpoints/step_N in the trainer's DCP layout, from a seeded tiny model (or `model`, e.g.
    a trained one); `poison` sets the first element of the named tensors (e.g. to NaN) before saving."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    if model is not None:
        config = model.config
        model = model.eval()
    else:
        config = config or LlamaConfig(**TINY_LLAMA, use_cache=False, bos_token_id=None, eos_token_id=None)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # norms start at exactly 1: perturb them so a mixed-up norm shows
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
    ckpt_dir = root / "checkpoints" / f"step_{step:08d}"
    ckpt_dir.mkdir(parents=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, value in (poison or {}).items():
        state[name].view(-1)[0] = value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(ckpt_dir / "model"), no_dist=True)
    (ckpt_dir / "config.yaml").write_text("trainer:\n  max_steps: 2\n")
    trainer_state = {"step": step, "tokens": 128 * step, "world_size": 1,
                     "strategy": {"name": "ddp", "kind": "ddp", "zero_stage": 0},
                     "model_config": config.to_dict(), "tokenizer_dir": tokenizer_dir,
                     "config_digest": "0123456789abcdef",
                     "files": {p.relative_to(ckpt_dir).as_posix(): p.stat().st_size
                               for p in sorted(ckpt_dir.rglob("*")) if p.is_file()}}
    (ckpt_dir / "trainer_state.json").write_text(json.dumps(trainer_state, default=str))
    (root / "checkpoints" / "latest").write_text(ckpt_dir.name + "\n")
    return Ckpt(ckpt_dir, state, model)


def make_tokenizer(out: Path, vocab_size: int = 300) -> Path:
    """A real byte-level BPE trained the way data_pipeline.prepare trains the manifest's tokenizer."""
    from data_pipeline.prepare.tokenizer import train_bpe

    texts = ["the quick brown fox jumps over the lazy dog", "export hooks write serving checkpoints",
             "llama cpp reads gguf files with merges and tokens"] * 40
    train_bpe(texts, vocab_size, 2, out)
    return out


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end_of_text|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXTS = ["the quick brown fox jumps over the lazy dog 12345", "I've been told he's @debian.org there",
         "export hooks 2024 write serving checkpoints\n\n  ok"] * 40


def make_bpe_tokenizer(out: Path, pattern: str | None = None, bos: str | None = None,
                       chat_template: str | None = None, vocab_size: int = 300) -> Path:
    """A byte-level BPE built locally like a real family: `pattern=None` is GPT-2 style (ByteLevel's
    own regex), otherwise a Split(pattern) + ByteLevel(use_regex=false) as Llama 3 / Qwen2 ship;
    `bos` is prepended by a TemplateProcessing post-processor, as Llama 3's tokenizer does."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pattern is None)
    tok.pre_tokenizer = (byte_level if pattern is None else
                         pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                  byte_level]))
    tok.decoder = decoders.ByteLevel()
    specials = ["<|end_of_text|>"] + ([bos] if bos else [])
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>", bos_token=bos)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(out))
    return out


def export_tensors(export_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export, read back with the safetensors library through the index."""
    from safetensors.torch import load_file

    index = json.loads((export_dir / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(export_dir / shard))
    assert set(out) == set(index["weight_map"]), "index and shards disagree"
    return out


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()
