"""Small real shard sets for tests (ours and the trainer's): `make_shards(tmp_path, ...)`.

The shards are written by the same writer as `prepare` (tar + index + manifest.json), so a
test exercises the real format. By default every token of document g is `g + 1` and the
document ends with EOS (id 0): a batch then tells exactly which documents it holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.shards.format import ShardWriter, ext_for_vocab
from data_pipeline.shards.manifest import MANIFEST_NAME, build_manifest, write_index_bundle, write_json_atomic

EOS = 0


@dataclass
class ShardSet:
    """What make_shards wrote: `root` is a prepare-style output (use it as data.urls)."""

    root: Path
    shard_paths: list[Path]
    val_paths: list[Path]
    docs: list[np.ndarray]
    val_docs: list[np.ndarray]
    vocab_size: int

    @property
    def urls(self) -> str:
        """The train shards as a brace pattern (another accepted data.urls form)."""
        n = len(self.shard_paths)
        return str(self.root / "train" / f"shard-{{000000..{n - 1:06d}}}.tar")

    @property
    def total_tokens(self) -> int:
        return int(sum(len(d) for d in self.docs))


def make_docs(count: int, *, first_id: int = 0, min_len: int = 3, max_len: int = 40,
              vocab_size: int = 1000, content: str = "id", seed: int = 0) -> list[np.ndarray]:
    """`count` documents ending in EOS; content `id` = doc g's tokens are all g+1, `random`."""
    rng = np.random.default_rng([seed, first_id])
    docs = []
    for g in range(first_id, first_id + count):
        n = int(rng.integers(min_len, max_len + 1))
        if content == "id":
            if g + 1 >= vocab_size:
                raise ValueError(f"content='id' needs vocab_size > {g + 1}")
            body = np.full(n - 1, g + 1, dtype=np.int64)
        else:
            body = rng.integers(1, vocab_size, n - 1)
        docs.append(np.append(body, EOS).astype(np.int64))
    return docs


def make_shards(tmp_path: Path, sizes: tuple[int, ...] = (7, 3, 12), *, val_sizes: tuple[int, ...] = (4,),
                min_len: int = 3, max_len: int = 40, vocab_size: int = 1000, content: str = "id",
                seed: int = 0, name: str = "shards", first_id: int = 0) -> ShardSet:
    """Write train shards with `sizes[i]` documents each (uneven on purpose) and val shards.

    Returns a ShardSet; point `WebDatasetConfig(urls=str(s.root))` (or `s.urls`) at it.
    `first_id`: id of the first document (content `id`: sets with disjoint ids tell their tokens apart).
    """
    root = Path(tmp_path) / name
    ext = ext_for_vocab(vocab_size)
    splits, all_docs = {}, {}
    next_id = first_id
    for split, counts in (("train", sizes), ("val", val_sizes)):
        writer = ShardWriter(root, split, ext, max_bytes=1 << 40)
        docs = []
        for count in counts:
            shard_docs = make_docs(count, first_id=next_id, min_len=min_len, max_len=max_len,
                                   vocab_size=vocab_size, content=content, seed=seed)
            next_id += count
            for d in shard_docs:
                writer.write(d)
            writer.end_shard()
            docs.extend(shard_docs)
        splits[split] = writer.close()
        all_docs[split] = docs
    manifest = build_manifest(splits=splits, ext=ext, vocab_size=vocab_size, eos_token_id=EOS,
                              tokenizer=None, fingerprint=f"make_shards-{seed}",
                              settings={"sizes": list(sizes), "val_sizes": list(val_sizes)},
                              index_bundle=write_index_bundle(root, splits))
    write_json_atomic(root / MANIFEST_NAME, manifest)
    return ShardSet(root, [root / r.path for r in splits["train"]],
                    [root / r.path for r in splits["val"]], all_docs["train"], all_docs["val"],
                    vocab_size)


# --- chat fine-tuning fixtures: a tiny Llama-3-style tokenizer and conversations ------------

LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
"""The pre-tokenizer split pattern of Llama 3 (llama.cpp's `llama-bpe`)."""

LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>")

LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
"""Llama 3's chat template with {% generation %} markers around each assistant turn's content
and <|eot_id|> (what transformers' return_assistant_tokens_mask reports)."""

_WORDS = ("the model learns to answer questions about data shards tokens packing loss masks "
          "every conversation has a system prompt user turns and assistant replies with numbers "
          "like 12 345 and 2026 or punctuation: commas, dots; quotes 'x' and emails a@b.org").split()


def sample_conversations(n: int, *, seed: int = 0, max_words: int = 12) -> list[dict]:
    """`n` varied OpenAI-style records ({"messages": [...]}): optional system turn, 1-3 rounds."""
    rng = np.random.default_rng(seed)

    def text() -> str:
        return " ".join(rng.choice(_WORDS, int(rng.integers(1, max_words + 1))).tolist())

    records = []
    for _ in range(n):
        msgs = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
        for _ in range(int(rng.integers(1, 4))):
            msgs += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        records.append({"messages": msgs})
    return records


def write_jsonl(path: Path, records: list) -> Path:
    """One JSON value per line (records may be anything, for bad-input tests)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def build_llama3_tokenizer(out_dir: Path, *, vocab_size: int = 512, template: str | None = LLAMA3_CHAT_TEMPLATE):
    """A tiny Llama-3-style tokenizer built locally (Llama 3 split pattern + byte-level BPE,
    its special tokens, BOS <|begin_of_text|>, EOS <|eot_id|>, no pad), saved to out_dir with
    `template` in tokenizer_config.json (None = no chat template). Returns the fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(LLAMA3_SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = [m["content"] for r in sample_conversations(200, seed=1) for m in r["messages"]]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>")
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(str(out_dir), save_jinja_files=False)
    return fast


def prepare_chat(out: Path, source: Path, tokenizer_dir: Path | None, **overrides) -> dict:
    """Run `prepare mode=chat` in-process (one tokenizer process, no progress bar) and return
    its manifest; `overrides` are dotted keys, e.g. **{"chat.max_len": 64}."""
    from data_pipeline.prepare import prepare
    from data_pipeline.prepare.config import load_prepare_config

    raw: dict = {"mode": "chat", "source": {"path": str(source)}, "out": str(out), "num_proc": 1,
                 "progress": False, "tokenizer": {"path": str(tokenizer_dir) if tokenizer_dir else None}}
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return prepare(load_prepare_config(raw))


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.support.data chat DIR`: DIR/tokenizer (tiny Llama-3-style, with a
    chat template) and DIR/chats.jsonl (200 conversations), for trying `prepare mode=chat`."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "chat":
        sys.exit("usage: python -m tests.support.data chat DIR")
    out = Path(args[1])
    build_llama3_tokenizer(out / "tokenizer")
    write_jsonl(out / "chats.jsonl", sample_conversations(200))
    print(f"wrote {out}/tokenizer and {out}/chats.jsonl")


if __name__ == "__main__":
    main()
