"""The small files of a Hugging Face export: config, generation config, tokenizer, model card."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_EOS_GUESSES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class TokenizerError(ValueError):
    """The checkpoint names a tokenizer that cannot be loaded."""


def hf_config(model_config: dict[str, Any], dtype: str) -> Any:
    """transformers config from trainer_state.json's model_config, marked with the export dtype."""
    from transformers import AutoConfig

    fields = dict(model_config)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ValueError("trainer_state.json model_config has no model_type: cannot rebuild the model config")
    for key in ("transformers_version", "_name_or_path", "torch_dtype"):
        fields.pop(key, None)
    config = AutoConfig.for_model(model_type, **fields)
    config.dtype = TORCH_DTYPES[dtype]
    return config


def find_tokenizer_dir(tokenizer_dir: str | None, checkpoint_dir: Path) -> Path | None:
    """trainer_state.json's tokenizer_dir, resolved (relative paths: cwd, then the run dir)."""
    if not tokenizer_dir:
        return None
    candidates = [Path(tokenizer_dir).expanduser()]
    if not candidates[0].is_absolute():
        candidates.append(checkpoint_dir.parent.parent / tokenizer_dir)
    for path in candidates:
        if path.is_dir():
            return path
    raise TokenizerError(f"trainer_state.json names tokenizer_dir={tokenizer_dir!r} but no such directory "
                         f"exists (looked in {[str(c) for c in candidates]}): restore the data manifest's "
                         "tokenizer directory, or export from a run whose tokenizer is still present")


def load_tokenizer(path: Path) -> Any:
    """The tokenizer as transformers sees it; a bare tokenizer.json is accepted too."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(f"cannot load the tokenizer in {path}: {exc}") from exc
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    if tok.eos_token is None:
        specials = [t for t in _EOS_GUESSES if t in tok.get_vocab()]
        if specials:
            tok.eos_token = specials[0]
    return tok


def save_generation_config(config: Any, out: Path, tokenizer: Any | None) -> None:
    from transformers import GenerationConfig

    gen = GenerationConfig.from_model_config(config)
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            gen.eos_token_id = tokenizer.eos_token_id
        if tokenizer.bos_token_id is not None:
            gen.bos_token_id = tokenizer.bos_token_id
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else gen.eos_token_id
    gen.save_pretrained(str(out))


def param_count(shapes: list[tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def model_card(meta: dict[str, Any], n_params: int) -> str:
    """README.md: what the export is, where it came from, how to load it."""
    verify = meta.get("verification") or {}
    verified = ("passed: max |logit diff| {:.3g} (relative {:.3g}, tolerance {:.3g})".format(
        verify["max_abs_diff"], verify["relative_diff"], verify["tolerance"])
        if verify.get("passed") else "not run (export.verify=false)")
    tok = ("included" if meta.get("tokenizer") else
           "none: the model was trained on synthetic token ids; feed it token ids directly")
    gguf_line = "".join(f"- GGUF for llama.cpp / Ollama: `{g['file']}` ({g['type']}, {g.get('bits_per_weight', 0):.2f} "
                        f"bits/weight; `ollama create NAME -f {g.get('modelfile') or 'Modelfile'}`)\n"
                        for g in meta.get("gguf_files") or ([meta["gguf"]] if meta.get("gguf") else []))
    adapter = meta.get("adapter")
    if adapter:
        gguf_line += (f"- LoRA adapter (PEFT) in `adapter/` (r={adapter['r']}, base `{adapter['base_model']}`): "
                      "`PeftModel.from_pretrained(base, 'path/to/this/dir/adapter')`\n")
    if not meta.get("merged_model", True):
        gguf_line += "- Adapter only (export.adapter=adapter): no merged weights in this directory\n"
    strategy = meta.get("strategy") or {}
    return f"""---
library_name: transformers
tags: [scaletrain, causal-lm]
---
# {meta['model_type']} checkpoint exported by scaletrain

- Parameters: {n_params:,} ({meta['dtype']} weights)
- Training step {meta['step']}, {meta.get('tokens') or 0:,} tokens seen, strategy `{strategy.get('name', '?')}`
- Source checkpoint: `{meta['source_checkpoint']}`
- Training config digest: `{meta.get('config_digest')}`
- Tokenizer: {tok}
- Verification against the training weights: {verified}
{gguf_line}
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")
```

`python -m train.export verify=path/to/this/dir` re-hashes every file against `export.json`.
{quality_section(meta.get("quality"))}"""


def quality_section(quality: dict[str, Any] | None) -> str:
    """The model card's quality table: what each format loses against the trained fp32 model."""
    if not quality:
        return ""
    from train.export.quality import table

    return ("\n## Quality of each format (perplexity, `quality.json`)\n\n" + table(quality))
