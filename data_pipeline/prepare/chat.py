"""`prepare mode=chat`: render conversations with the tokenizer's own chat template and mark
the tokens the model should learn (the per-token label mask stored beside the tokens).

The tokens are exactly what `tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)`
gives: no EOS is appended. The mask marks each assistant turn's tokens (its content and its
end-of-turn token, never the role header), found either by rendering the conversation turn by turn
with the template itself (chat_masks.py; any template) or, for a template with `{% generation %}`
markers, by transformers' `return_assistant_tokens_mask` (`chat.masks=auto` picks the markers when
there are some; tests show both agree token for token). `chat.train_on=last_assistant` keeps only
the last marked run, `all` marks every token. `mask[j] = 1` means token j is a target: the position
before it is trained to predict it (see batches.py for how labels are built).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.prepare.chat_masks import Sample, render_masks, special_ids
from data_pipeline.prepare.chat_records import (
    BadRecord,
    Conversation,
    RecordFields,
    parse_payload,
    to_conversation,
)
from data_pipeline.prepare.encode import Encoded, is_val

CHAT_SKIP_REASONS = ("empty", "bad_utf8", "bad_json", "missing_field", "bad_messages", "unknown_role",
                     "not_text", "empty_assistant", "template_error", "history_changed", "no_assistant",
                     "too_long", "truncated_away")
FATAL_REASONS = ("tools_unsupported",)
"""Never counted away: a template that cannot render a record's tools is an error naming file and line."""

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


def has_markers(template: str) -> bool:
    return bool(_GENERATION.search(template))


def check_template(template: Any, train_on: str, where: str, masks: str = "auto") -> str | None:
    """A problem sentence when this template cannot produce the mask train_on needs."""
    if not template:
        return (f"{where} has no chat template: set chat.template=PATH_OR_JINJA (a Jinja chat "
                "template; see README 'Fine-tuning'), or use a tokenizer whose tokenizer_config.json "
                "has one")
    if not isinstance(template, str):
        return f"{where} has several named chat templates: choose one with chat.template=PATH_OR_JINJA"
    if train_on != "all" and masks == "markers" and not has_markers(template):
        return (f"the chat template of {where} has no {{% generation %}} markers, but chat.masks=markers "
                "reads the assistant tokens from them: set chat.masks=auto (found by rendering the "
                "conversation turn by turn) or chat.template=PATH_OR_JINJA to a copy with markers")
    return None


PROBE = [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": "Probe reply 7."}]


def probe_problem(tok: Any, where: str) -> str | None:
    """A problem sentence when the template cannot render an assistant turn at all (checked once,
    before any record is read)."""
    try:
        text = tok.apply_chat_template(PROBE, tokenize=False)
    except Exception as e:
        return (f"the chat template of {where} cannot render a user turn followed by an assistant turn "
                f"({e}): set chat.template=PATH_OR_JINJA to a chat template with an assistant role")
    if PROBE[1]["content"] not in text:
        return (f"the chat template of {where} has no assistant role: a user turn followed by an "
                f"assistant turn renders as {text[:120]!r}, without the assistant's text; set "
                "chat.template=PATH_OR_JINJA to a chat template with an assistant role")
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
    masks: str = "auto"
    on_history_change: str = "split"


_state: dict = {}


def init(settings: ChatSettings) -> None:
    from transformers import AutoTokenizer

    _state["settings"] = settings
    _state["tokenizer"] = tok = AutoTokenizer.from_pretrained(settings.tokenizer_dir, local_files_only=True)
    _state["method"] = mask_method(settings.masks, tok.chat_template, settings.train_on)
    _state["specials"] = special_ids(tok)


def mask_method(masks: str, template: str, train_on: str) -> str:
    """How assistant tokens are found: `markers` (HF's return_assistant_tokens_mask of a template
    with {% generation %}), `render` (incremental rendering, chat_masks.py), or `none` (train_on=all)."""
    if train_on == "all":
        return "none"
    if masks == "auto":
        return "markers" if has_markers(template) else "render"
    return masks


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


def _marked(convs: list[Conversation], want_mask: bool) -> list:
    """[Sample] of each conversation from one apply_chat_template call (HF's assistant mask of the
    {% generation %} markers, or no mask), or the BadRecord of one the template refuses. Batched
    (one call per conversation with tools, or when the batch fails, to find which one)."""
    tok = _state["tokenizer"]
    kw = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=want_mask)

    def one_call(batch: list[Conversation]) -> list:
        out = tok.apply_chat_template([c.messages for c in batch], tools=batch[0].tools, **kw)
        return [[Sample(list(ids), np.asarray(out["assistant_masks"][i] if want_mask else [1] * len(ids),
                                              np.uint8))] for i, ids in enumerate(out["input_ids"])]

    plain = [i for i, c in enumerate(convs) if not c.tools]
    results: list = [None] * len(convs)
    groups = ([plain] if plain else []) + [[i] for i, c in enumerate(convs) if c.tools]
    for group in groups:
        try:
            for i, r in zip(group, one_call([convs[i] for i in group])):
                results[i] = r
            continue
        except Exception:  # jinja2 errors, raise_exception() in templates: some record is bad
            pass
        for i in group:
            try:
                results[i] = one_call([convs[i]])[0]
            except Exception as e:
                results[i] = BadRecord("template_error", f"the chat template refused it: {e}")
    return results


def render(convs: list[Conversation], s: ChatSettings) -> list:
    """The samples of each conversation (token ids, target mask; see the module docstring), or
    the BadRecord of one that cannot be rendered."""
    method = _state["method"]
    if method == "render":
        return render_masks(_state["tokenizer"], convs, s.on_history_change, _state["specials"])
    return _marked(convs, method == "markers")


def _tools_problem(conv: Conversation, ids: list[int]) -> str | None:
    """Why this conversation's tools were not rendered (a template without tool support drops
    them silently), or None: every tool name, called name and tool reply must show in the text."""
    text = _state["tokenizer"].decode(ids)
    want = [t.get("function", t).get("name") for t in conv.tools or []]
    want += [c["function"]["name"] for m in conv.messages for c in m.get("tool_calls") or []]
    missing = [f"tool {n!r}" for n in want if isinstance(n, str) and n not in text]
    missing += [f"the tool reply {m['content'][:40]!r}" for m in conv.messages
                if m["role"] == "tool" and m["content"].strip() not in text]
    if not missing:
        return None
    return (f"the record has tool calls or tools, but the chat template does not render them ({missing[0]} "
            "is not in its rendering): set chat.template=PATH_OR_JINJA to a template with tool support "
            "(one that renders `tools`, assistant `tool_calls` and `tool` turns, as Qwen 2.5's and "
            "Llama 3.1's do)")


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


def _train_on(mask: np.ndarray, train_on: str) -> np.ndarray:
    if train_on == "all":
        return np.ones(len(mask), np.uint8)
    return last_run(mask) if train_on == "last_assistant" else mask


def encode(records: list[tuple[int, str | None, str]]) -> Encoded:
    """Render one task's records (source index, payload, where); docs carry (tokens, mask)."""
    s: ChatSettings = _state["settings"]
    out = Encoded()
    parsed = []
    for src, payload, where in records:
        try:
            rec, replaced = parse_payload(payload, s.kinds[src], s.on_bad_utf8)
            out.replaced_utf8 += replaced
            conv = to_conversation(rec, s.fields)
            parsed.append((where, conv))
            for name in conv.ignored:
                out.ignored.append((name, where))
        except BadRecord as e:
            out.skipped.append((e.reason, where, str(e)))
    rendered = render([c for _, c in parsed], s) if parsed else []
    for (where, conv), result in zip(parsed, rendered):
        try:
            if isinstance(result, BadRecord):
                raise result
            if conv.has_tools and (problem := _tools_problem(conv, result[0].ids)):
                raise BadRecord("tools_unsupported", problem)
            if s.train_on == "last_assistant":
                result = result[:1]     # the whole conversation; split-off earlier turns are not wanted
            bounded = [_bounded(x.ids, _train_on(x.mask, s.train_on), s) for x in result]
        except BadRecord as e:
            out.skipped.append((e.reason, where, str(e)))
            continue
        out.split += len(bounded) > 1
        key = conv.key()
        for ids, mask, cut in bounded:
            out.truncated += cut
            data = np.asarray(ids, dtype=s.dtype).tobytes()
            out.docs.append((is_val(key, s.val_fraction, s.split_seed), data, mask.tobytes()))
            out.tokens += len(ids)
            out.trained += int(mask.sum())
    return out


def fingerprint(chat: Any, template: str) -> dict:
    """What of the chat settings changes the output (for prepare's no-op check)."""
    from dataclasses import asdict

    return {**asdict(chat), "template": hashlib.sha256(template.encode()).hexdigest()}
