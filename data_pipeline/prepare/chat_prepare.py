"""The `mode=chat` parts of `prepare` that run in the main process: choosing and checking the
chat template before any work, the tokenizer's training texts, the worker settings and the
manifest entry. The per-record work is in chat.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from data_pipeline.prepare import chat
from data_pipeline.prepare.chat_records import RecordFields, message_texts, parse_payload
from data_pipeline.prepare.config import ChatConfig, PrepareConfig
from data_pipeline.prepare.sources import Source, iter_mixed
from data_pipeline.prepare.tokenizer import pad_token_id
from data_pipeline.shards.format import MASK_EXT


def fields(c: ChatConfig) -> RecordFields:
    return RecordFields(c.messages_field, c.prompt_field, c.completion_field,
                        list(c.instruction_fields), c.output_field, c.system_field, c.format,
                        c.conversations_field, c.tools_field, dict(c.role_map))


def resolve_template(cfg: PrepareConfig) -> str:
    """The chat template the output tokenizer will carry; raises ValueError naming the fix.

    Runs before any file is read or written, so a tokenizer without a template fails fast.
    """
    c, tok = cfg.chat, None
    if cfg.tokenizer.path:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.tokenizer.path, local_files_only=True)
    if c.template:
        template, where = chat.template_text(c.template), f"chat.template={c.template[:60]!r}"
    elif tok is None:
        template, where = chat.DEFAULT_CHAT_TEMPLATE, "the default template"
    else:
        template, where = tok.chat_template, f"tokenizer.path={cfg.tokenizer.path!r}"
    problem = chat.check_template(template, c.train_on, where, c.masks)
    if problem is None and tok is not None:
        tok.chat_template = template
        problem = chat.probe_problem(tok, where)
    if problem:
        raise ValueError(problem)
    return template


def training_texts(sources: list[Source], cfg: PrepareConfig) -> Iterator[str]:
    """Message contents, for training a tokenizer on a chat corpus."""
    f, n = fields(cfg.chat), 0
    for src, payload, _ in iter_mixed(sources, cfg.mix):
        try:
            rec, _ = parse_payload(payload, sources[src].kind, cfg.on_bad_utf8)
        except ValueError:
            continue
        for text in message_texts(rec, f):
            yield text
        n += 1
        if cfg.tokenizer.max_train_docs and n >= cfg.tokenizer.max_train_docs:
            return


def save_with_template(tok, template: str, tok_dir: Path) -> None:
    """Write the template into tokenizer_config.json (not a side file), so every copy of this
    tokenizer (the trainer's, the exports') carries it."""
    tok.chat_template = template
    problem = chat.probe_problem(tok, "chat.template")
    if problem:
        raise ValueError(problem)
    for stale in ("chat_template.jinja", "chat_template.json"):
        (tok_dir / stale).unlink(missing_ok=True)
    tok.save_pretrained(str(tok_dir), save_jinja_files=False)


def settings(cfg: PrepareConfig, sources: list[Source], tok_dir: Path, dtype: str) -> chat.ChatSettings:
    c = cfg.chat
    return chat.ChatSettings(str(tok_dir), dtype, [s.kind for s in sources], fields(c), c.train_on,
                             c.max_len, c.on_long, cfg.on_bad_utf8, cfg.split.val_fraction,
                             cfg.split.seed, c.masks, c.on_history_change)


def manifest_entry(cfg: PrepareConfig, tok) -> dict:
    return {"max_len": cfg.chat.max_len, "mask_ext": MASK_EXT, "pad_token_id": pad_token_id(tok),
            "train_on": cfg.chat.train_on, "on_long": cfg.chat.on_long,
            "masks": chat.mask_method(cfg.chat.masks, tok.chat_template, cfg.chat.train_on)}
