"""Greedy continuation of a prompt by an exported model, through transformers alone.

    python -m train.sample EXPORT_DIR [--prompt TEXT] [--max-new-tokens N]

EXPORT_DIR is what `export=hf` or `python -m train.export` wrote (RUN_DIR/exports/step_N): the
model and its tokenizer load with `AutoModelForCausalLM` / `AutoTokenizer`, offline, without remote
code. This is how a user would serve the export, so the demo's last word comes from there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def greedy(export_dir: Path | str, prompt: str, max_new_tokens: int = 48) -> str:
    """The prompt and its greedy (deterministic) continuation, decoded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
    # fp32 whatever the export's dtype; `.float()` rather than the loading keyword, which transformers
    # renamed (`torch_dtype` warns as deprecated from 5.x, `dtype` is unknown before 4.56)
    model = AutoModelForCausalLM.from_pretrained(export_dir, local_files_only=True).float()
    model.eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.sample", description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path, help="an export directory (RUN_DIR/exports/step_N)")
    parser.add_argument("--prompt", default="def main(", help="text to continue (default: %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    if not (args.export_dir / "config.json").is_file() or not (args.export_dir / "tokenizer_config.json").is_file():
        print(f"error: {args.export_dir} is not an export with a tokenizer (no config.json or "
              "tokenizer_config.json): pass RUN_DIR/exports/step_N of a run trained on prepared data",
              file=sys.stderr)
        return 2
    print(f"--- greedy continuation by {args.export_dir} ---")
    print(greedy(args.export_dir, args.prompt, args.max_new_tokens))
    print("---")
    return 0


if __name__ == "__main__":
    sys.exit(main())
