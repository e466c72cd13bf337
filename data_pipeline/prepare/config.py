"""Typed settings of `python -m data_pipeline.prepare` (root config conf/prepare.yaml).

`load_prepare_config` fills these dataclasses from the composed YAML and collects every
problem (unknown keys, bad values, missing paths) into one PrepareConfigError before any
file is read or written.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_pipeline.schema import ConfigError, build, load
from data_pipeline.storage.backends import StorageConfig, backend_problem, is_remote, scheme

Format = Literal["text", "jsonl", "parquet", "arrow"]


class PrepareConfigError(ConfigError):
    """Every problem found in a prepare config, one per line."""

    def __init__(self, problems: list[str]):
        super().__init__(problems, what="prepare config")


@dataclass
class SourceConfig:
    path: str = "stdlib"
    """A file, directory or glob of text/JSONL/Parquet files, a `datasets.save_to_disk`
    directory, or `stdlib`: the running Python's own standard-library .py files (no download)."""
    format: Format | None = None
    """text (one document per file), jsonl, parquet or arrow (save_to_disk); null = inferred."""
    text_field: str = "text"
    """Field/column holding the document text (jsonl, parquet, arrow)."""
    weight: float = 1.0
    """Share of documents drawn from this source when several are mixed."""
    max_files: int | None = None
    """Use at most this many files, evenly spaced (null = all; stdlib: 300)."""
    split: str | None = None
    """Split of a saved DatasetDict (null = its only split, or `train`)."""


@dataclass
class TokenizerConfig:
    path: str | None = None
    """Local Hugging Face tokenizer directory (never downloaded)."""
    train: bool | None = None
    """Train a byte-level BPE on the corpus (null = train when `path` is null)."""
    vocab_size: int = 4096
    min_frequency: int = 2
    max_train_docs: int = 0
    """Train on at most this many documents (0 = all)."""


@dataclass
class ShardSettings:
    max_bytes: int = 64 << 20
    """Target shard size; a shard closes before the document that would exceed it."""


@dataclass
class SplitConfig:
    val_fraction: float = 0.05
    """Fraction of documents (by a hash of their text) in the validation split."""
    seed: int = 0
    """Salt of that hash: another seed draws another validation set."""


@dataclass
class MixConfig:
    stopping_strategy: Literal["all_exhausted", "first_exhausted", "all_exhausted_without_replacement"] = \
        "all_exhausted"
    """How datasets.interleave_datasets ends a weighted mix of several sources."""
    seed: int = 0


@dataclass
class ChatConfig:
    """How `mode=chat` reads conversations and marks what the model learns (see chat.py)."""

    format: Literal["auto", "messages", "sharegpt", "prompt_completion", "instruction"] = "auto"
    """Record shape: `auto` detects it per record from its fields (messages, conversations,
    prompt+completion, instruction+output, in that order); the others force one (see chat_records.py)."""
    messages_field: str = "messages"
    """Field holding OpenAI-style messages: a list of {role, content}, roles system, user,
    assistant (with optional `tool_calls`; content may then be null) or tool."""
    conversations_field: str = "conversations"
    """Field holding ShareGPT turns: a list of {from, value}, from system, human, gpt (also user,
    assistant; tool/observation for tool replies, function_call for an assistant tool call)."""
    tools_field: str = "tools"
    """Record field holding the tools (JSON schemas, or a JSON string of them) passed to the template
    as `apply_chat_template(..., tools=...)`."""
    role_map: dict[str, str] = field(default_factory=dict)
    """Extra role (or ShareGPT `from`) names -> system, user, assistant or tool, e.g. {bot: assistant}."""
    prompt_field: str = "prompt"
    """Prompt/completion pairs: the user turn's field..."""
    completion_field: str = "completion"
    """...and the assistant turn's field."""
    instruction_fields: list[str] = field(default_factory=lambda: ["instruction", "input"])
    """Instruction data: fields joined (blank line between, empty ones left out) into the user
    turn; a record needs the first of them and `output_field`."""
    output_field: str = "output"
    """Instruction data: the assistant turn's field."""
    system_field: str | None = "system"
    """Instruction data: an optional system turn's field (null = none)."""
    template: str | None = None
    """A Jinja chat template (or the path of a file holding one) replacing the tokenizer's; it is
    written into the output tokenizer, so exports carry it. null = the tokenizer's own (a
    tokenizer trained by prepare gets chat.DEFAULT_CHAT_TEMPLATE, ChatML)."""
    masks: Literal["auto", "render", "markers"] = "auto"
    """How assistant tokens are found: `render` renders the conversation turn by turn with the
    template (any template), `markers` reads its {% generation %} markers (transformers'
    return_assistant_tokens_mask), `auto` = markers when the template has them, else render."""
    on_history_change: Literal["split", "skip"] = "split"
    """A template that renders earlier turns differently once later turns follow (drops earlier
    reasoning, moves the system prompt; chat.masks=render): `split` trains each such turn in a sample
    of its own, as the template renders that history; `skip` refuses the record (counted, or named
    with on_bad_record=raise)."""
    train_on: Literal["assistant", "all", "last_assistant"] = "assistant"
    """Which tokens are targets: every assistant turn, every token, or the last assistant turn."""
    max_len: int = 2048
    """Tokens per conversation at most; must be <= trainer.seq_len of the runs that read it."""
    on_long: Literal["truncate", "skip"] = "truncate"
    """A longer conversation is cut to max_len (skipped if no assistant token is left) or skipped;
    both are counted in the closing report."""


@dataclass
class PrepareLimits:
    """When a prepare that ran to the end still fails."""

    max_dropped_frac: float = 0.01
    """More than this fraction of the records dropped (every skip reason but blank lines/empty
    documents) ends prepare with exit 2 and the counts by reason; nothing is written."""


@dataclass
class PreferenceConfig:
    """How `mode=preference` bounds its pairs (see prepare/preference.py)."""

    max_len: int = 2048
    """Tokens of prompt + completion at most, for each of chosen and rejected; must be <=
    trainer.seq_len of the runs that read them."""
    on_long: Literal["truncate", "skip"] = "truncate"
    """A longer pair has its completions cut (TRL's keep_start; skipped if the prompt alone fills
    max_len) or is skipped; both are counted in the closing report."""


@dataclass
class PrepareConfig:
    mode: Literal["text", "chat", "preference"] = "text"
    """`text`: documents + EOS, every token trained. `chat`: conversations rendered with the
    tokenizer's chat template, with a per-token label mask (settings under `chat`)."""
    chat: ChatConfig = field(default_factory=ChatConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """`mode=preference`: pairs (prompt, chosen, rejected) for objective=dpo."""
    source: SourceConfig = field(default_factory=SourceConfig)
    sources: list[dict] = field(default_factory=list)
    """Several weighted sources ({path, weight, format, text_field, ...}); replaces `source`."""
    out: str = "data/stdlib"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shard: ShardSettings = field(default_factory=ShardSettings)
    split: SplitConfig = field(default_factory=SplitConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    on_bad_utf8: Literal["replace", "skip"] = "replace"
    """Documents with invalid UTF-8: `replace` (U+FFFD, counted) or `skip` (counted)."""
    on_bad_record: Literal["raise", "skip"] = "skip"
    """A JSONL line that is not JSON or lacks the field, a non-text value: `skip` (counted)
    or `raise` (error naming file and line)."""
    num_proc: int = 0
    """Tokenizer processes (0 = one per CPU, at most 8)."""
    batch_docs: int = 64
    """Documents per task sent to a tokenizer process."""
    progress: bool = True
    force: bool = False
    """Rebuild even when `out` already holds the same sources and settings."""
    prepare: PrepareLimits = field(default_factory=PrepareLimits)
    storage: StorageConfig = field(default_factory=StorageConfig)
    """For a remote `out` (s3://, fsspec): endpoint and timeout; credentials from standard chains."""

    def source_list(self) -> list[SourceConfig]:
        if not self.sources:
            return [self.source]
        return [build(SourceConfig, s, f"sources[{i}]", []) for i, s in enumerate(self.sources)]


def _source_problems(s: SourceConfig, key: str) -> list[str]:
    p = []
    if s.path != "stdlib":
        exists = Path(s.path).exists() if not glob.has_magic(s.path) else bool(glob.glob(s.path, recursive=True))
        if not exists:
            p.append(f"{key}.path={s.path!r} does not exist (or matches nothing): point it at a "
                     "file, directory or glob of your corpus, or use stdlib for the demo corpus")
    if not s.weight > 0:
        p.append(f"{key}.weight={s.weight}: must be > 0")
    if s.max_files is not None and s.max_files < 1:
        p.append(f"{key}.max_files={s.max_files}: must be >= 1 or null")
    if not s.text_field:
        p.append(f"{key}.text_field is empty: name the field that holds the text")
    return p


def _chat_problems(cfg: PrepareConfig) -> list[str]:
    c, p = cfg.chat, []
    if c.max_len < 2:
        p.append(f"chat.max_len={c.max_len}: must be >= 2")
    if c.template is not None and "{" not in c.template and not Path(c.template).is_file():
        p.append(f"chat.template={c.template!r} is neither a file nor a Jinja template: point it at "
                 "a template file, or give the template text")
    if not c.instruction_fields:
        p.append("chat.instruction_fields is empty: name at least the instruction field")
    bad = {k: v for k, v in c.role_map.items() if v not in ("system", "user", "assistant", "tool")}
    if bad:
        p.append(f"chat.role_map={bad}: map each name to system, user, assistant or tool")
    return p


def validate(cfg: PrepareConfig) -> list[str]:
    p: list[str] = []
    if not cfg.sources:
        p.extend(_source_problems(cfg.source, "source"))
    for i, raw in enumerate(cfg.sources):
        p.extend(_source_problems(build(SourceConfig, raw, f"sources[{i}]", p), f"sources[{i}]"))
    t = cfg.tokenizer
    if t.path and t.train:
        p.append(f"tokenizer.path={t.path!r} and tokenizer.train=true: choose one (set "
                 "tokenizer.path=null to train, or tokenizer.train=false to use the path)")
    if t.path is None and t.train is False:
        p.append("tokenizer.train=false needs tokenizer.path=DIR (a local Hugging Face tokenizer)")
    if t.path and not (Path(t.path) / "tokenizer.json").is_file() and \
            not (Path(t.path) / "tokenizer_config.json").is_file():
        p.append(f"tokenizer.path={t.path!r} has no tokenizer.json or tokenizer_config.json: point "
                 "it at a local Hugging Face tokenizer directory (nothing is downloaded)")
    if (t.path is None) and t.vocab_size < 300:
        p.append(f"tokenizer.vocab_size={t.vocab_size}: must be >= 300 (256 byte tokens + EOS + merges)")
    if cfg.shard.max_bytes < 4096:
        p.append(f"shard.max_bytes={cfg.shard.max_bytes}: must be >= 4096")
    if not 0 <= cfg.split.val_fraction < 1:
        p.append(f"split.val_fraction={cfg.split.val_fraction}: must be in [0, 1)")
    if cfg.mode == "chat":
        p.extend(_chat_problems(cfg))
    if not 0 <= cfg.prepare.max_dropped_frac <= 1:
        p.append(f"prepare.max_dropped_frac={cfg.prepare.max_dropped_frac}: must be in [0, 1] (1 = never fail)")

    if cfg.mode == "preference":
        if cfg.preference.max_len < 2:
            p.append(f"preference.max_len={cfg.preference.max_len}: must be >= 2")
        if not t.path:
            p.append("mode=preference needs tokenizer.path=DIR: the tokenizer (and chat template) of "
                     "the model being tuned, usually the SFT run's export")
    if cfg.num_proc < 0 or cfg.batch_docs < 1:
        p.append(f"num_proc={cfg.num_proc}, batch_docs={cfg.batch_docs}: need num_proc >= 0, batch_docs >= 1")
    if not cfg.out:
        p.append("out is empty: set out=DIR for the shards")
    elif is_remote(cfg.out):
        problem = backend_problem(cfg.out)
        if problem or scheme(cfg.out) in ("http", "https"):
            p.append(f"out={cfg.out!r}: {problem or 'http(s) is read-only'}; write to a local "
                     "directory or s3:// (serve that directory over http for readers)")
    elif Path(cfg.out).exists() and (not Path(cfg.out).is_dir() or (
            any(Path(cfg.out).iterdir()) and not (Path(cfg.out) / "manifest.json").is_file())):
        p.append(f"out={cfg.out!r} exists and is not a prepare output (no manifest.json): choose "
                 "another out, or remove it")
    return p


def load_prepare_config(raw: dict[str, Any]) -> PrepareConfig:
    """Build and validate; raises PrepareConfigError listing every problem."""
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    return load(PrepareConfig, raw, validate, error=PrepareConfigError)
