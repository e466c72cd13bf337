"""`prepare mode=chat`: render conversations with the tokenizer's own chat template and mark
the tokens the model should learn (the per-token label mask stored beside the tokens).

The tokens are exactly what `tokenizer.apply_chat_template(messages, tokenize=True)` gives:
no EOS is appended. The mask is what `apply_chat_template(..., return_assistant_tokens_mask=True)`
marks for a template with `{% generation %}` markers (an assistant turn's content and its
end-of-turn token, never the role header); `chat.train_on=last_assistant` keeps only the last
marked run, `all` marks every token. `mask[j] = 1` means token j is a target: the position
before it is trained to predict it (see batches.py for how labels are built).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.prepare.chat_records import (
    BadRecord,
    RecordFields,
    parse_payload,
    to_messages,
)
from data_pipeline.prepare.encode import Encoded, is_val

CHAT_SKIP_REASONS = ("empty", "bad_utf8", "bad_json", "missing_field", "bad_messages", "unknown_role",
                     "not_text", "empty_assistant", "template_error", "no_assistant", "too_long",
                     "truncated_away")

# The template a tokenizer trained by prepare gets (ChatML, as Qwen and others use it). The
# {% generation %} block marks what the model learns: the assistant's content and <|im_end|>.
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def template_text(setting: str) -> str:
    """chat.template is a Jinja string or the path of a file holding one."""
    p = Path(setting)
    if len(setting) < 4096 and "{" not in setting and p.is_file():
        return p.read_text()
    return setting


def check_template(template: Any, train_on: str, where: str) -> str | None:
    """A problem sentence when this template cannot produce the mask train_on needs."""
    if not template:
        return (f"{where} has no chat template: set chat.template=PATH_OR_JINJA (a Jinja chat "
                "template with {% generation %} markers around each assistant turn; see README "
                "'Fine-tuning'), or use a tokenizer whose tokenizer_config.json has one")
    if not isinstance(template, str):
        return f"{where} has several named chat templates: choose one with chat.template=PATH_OR_JINJA"
    if train_on != "all" and not _GENERATION.search(template):
        return (f"the chat template of {where} has no {{% generation %}} markers, so the assistant "
                f"tokens for chat.train_on={train_on} cannot be found: set chat.template=PATH_OR_JINJA "
                "to a copy of it with {% generation %}...{% endgeneration %} around each assistant "
                "turn's content and end-of-turn token, or chat.train_on=all")
    return None


@dataclass
class ChatSettings:
    """What every chat tokenizer process needs; picklable."""

    tokenizer_dir: str
    dtype: str
    kinds: list[str]            # per source: raw_jsonl or value
    fields: RecordFields
    train_on: str
    max_len: int
    on_long: str
    on_bad_utf8: str
    val_fraction: float
    split_seed: int


_state: dict = {}


def init(settings: ChatSettings) -> None:
    from transformers import AutoTokenizer

    _state["settings"] = settings
    _state["tokenizer"] = AutoTokenizer.from_pretrained(settings.tokenizer_dir, local_files_only=True)


def last_run(mask: np.ndarray) -> np.ndarray:
    """Only the last contiguous run of ones (the last assistant turn's tokens)."""
    ones = np.flatnonzero(mask)
    out = np.zeros_like(mask)
    if len(ones):
        end = ones[-1]
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        out[start:end + 1] = 1
    return out


def _marks(ids: list[int], assistant: list[int] | None, train_on: str) -> np.ndarray:
    if train_on == "all":
        return np.ones(len(ids), np.uint8)
    mask = np.asarray(assistant, np.uint8)
    return last_run(mask) if train_on == "last_assistant" else mask


def render(conversations: list[list[dict[str, str]]], train_on: str) -> list:
    """(token ids, target mask) of each conversation (see the module docstring), or the
    BadRecord of one the template refuses. One batched call; one call per conversation only
    when the batch fails, to find which one."""
    tok = _state["tokenizer"]
    kw = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=train_on != "all")
    try:
        out = tok.apply_chat_template(conversations, **kw)
        return [(list(ids), _marks(ids, out["assistant_masks"][i] if train_on != "all" else None,
                                   train_on)) for i, ids in enumerate(out["input_ids"])]
    except Exception:  # jinja2 errors, raise_exception() in templates: some record is bad
        if len(conversations) == 1:
            raise
    results = []
    for conv in conversations:
        try:
            results.append(render([conv], train_on)[0])
        except Exception as e:
            results.append(BadRecord("template_error", f"the chat template refused it: {e}"))
    return results


def _bounded(ids: list[int], mask: np.ndarray, s: ChatSettings) -> tuple[list[int], np.ndarray, bool]:
    if not mask.any():
        raise BadRecord("no_assistant", "conversation has no assistant tokens to train on")
    if len(ids) <= s.max_len:
        return ids, mask, False
    if s.on_long == "skip":
        raise BadRecord("too_long", f"conversation has {len(ids)} tokens > chat.max_len={s.max_len}")
    ids, mask = ids[:s.max_len], mask[:s.max_len]
    if not mask.any():
        raise BadRecord("truncated_away", f"truncated to chat.max_len={s.max_len} tokens, no "
                        "assistant token is left")
    return ids, mask, True


def encode(records: list[tuple[int, str | None, str]]) -> Encoded:
    """Render one task's records (source index, payload, where); docs carry (tokens, mask)."""
    s: ChatSettings = _state["settings"]
    out = Encoded()
    parsed = []
    for src, payload, where in records:
        try:
            rec, replaced = parse_payload(payload, s.kinds[src], s.on_bad_utf8)
            out.replaced_utf8 += replaced
            parsed.append((where, to_messages(rec, s.fields)))
        except BadRecord as e:
            out.skipped.append((e.reason, where, str(e)))
    rendered = render([m for _, m in parsed], s.train_on) if parsed else []
    for (where, messages), result in zip(parsed, rendered):
        try:
            if isinstance(result, BadRecord):
                raise result
            ids, mask, cut = _bounded(*result, s)
        except BadRecord as e:
            out.skipped.append((e.reason, where, str(e)))
            continue
        out.truncated += cut
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        data = np.asarray(ids, dtype=s.dtype).tobytes()
        out.docs.append((is_val(key, s.val_fraction, s.split_seed), data, mask.tobytes()))
        out.tokens += len(ids)
        out.trained += int(mask.sum())
    return out


def fingerprint(chat: Any, template: str) -> dict:
    """What of the chat settings changes the output (for prepare's no-op check)."""
    from dataclasses import asdict

    return {**asdict(chat), "template": hashlib.sha256(template.encode()).hexdigest()}
