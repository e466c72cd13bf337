"""Assistant masks from any chat template, without `{% generation %}` markers: incremental rendering.

For each assistant turn i of a conversation, the tokenizer's own template renders the messages
before it with `add_generation_prompt=True` (P_i) and the messages through it (Q_i). On token ids,
P_i must be a prefix of Q_i: the tokens Q_i adds are the turn's. They are marked up to and including
the turn's end-of-turn token (the last special token the turn adds: what follows it, such as ChatML's
newline, lies between turns and is not generated), never the role header, which P_i's generation
prompt holds. This is the span a `{% generation %}` block around the turn's content and end-of-turn
token marks, found from the template itself, whatever it is (tests compare the two token for token).

Q_i must also be a prefix of the whole conversation's tokens. Some templates render earlier turns
differently once later turns follow (Qwen3-style templates drop the reasoning of earlier assistant
turns; Mistral-style templates move the system prompt into the last user turn). Such a turn is
`unstable`: the whole rendering does not show it as the model generated it. With
`chat.on_history_change=split` each unstable turn is trained in a sample of its own, Q_i, exactly as
the template renders that history (unstable turns whose Q is a prefix of a later one share it); the
whole conversation trains the stable turns. With `skip` the record is refused naming the turn and
the first difference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipeline.prepare.chat_records import BadRecord, Conversation


@dataclass
class Sample:
    """One training sample of a conversation: token ids and their target mask."""

    ids: list[int]
    mask: np.ndarray


def _starts(ids: list[int], prefix: list[int]) -> bool:
    return len(prefix) <= len(ids) and ids[:len(prefix)] == prefix


def _first_difference(a: str, b: str) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {n}: {a[max(0, n - 20):n + 30]!r} alone, {b[max(0, n - 20):n + 30]!r} in the whole"


def special_ids(tok: Any) -> frozenset[int]:
    """Ids that can end a turn: the tokenizer's special tokens (<|im_end|>, <|eot_id|>, </s>, ...)."""
    ids = set(tok.all_special_ids)
    ids |= {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return frozenset(ids)


def _turn_span(p: list[int], q: list[int], specials: frozenset[int]) -> tuple[int, int]:
    """[start, end) of the tokens turn i adds, up to and including its last special token."""
    added = q[len(p):]
    last = max((j for j, t in enumerate(added) if t in specials), default=len(added) - 1)
    return len(p), len(p) + last + 1


def render_masks(tok: Any, convs: list[Conversation], on_history_change: str, specials: frozenset[int]
                 ) -> list[list[Sample] | BadRecord]:
    """The samples of each conversation (one, or one more per unstable turn under `split`), or the
    BadRecord that refuses it. Renders every prefix with the tokenizer's template, then tokenizes
    all texts of the task in one call."""
    texts: list[str] = []
    plans = []
    for conv in convs:
        try:
            plans.append(_render(tok, conv, texts))
        except BadRecord as e:
            plans.append(e)
        except Exception as e:  # jinja2 errors, raise_exception() in templates: this record is bad
            plans.append(BadRecord("template_error", f"the chat template refused it: {e}"))
    ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    out: list[list[Sample] | BadRecord] = []
    for plan in plans:
        if isinstance(plan, BadRecord):
            out.append(plan)
            continue
        try:
            out.append(_samples(plan, ids, texts, on_history_change, specials))
        except BadRecord as e:
            out.append(e)
    return out


def _render(tok: Any, conv: Conversation, texts: list[str]) -> tuple[int, list[tuple[int, int, int]]]:
    """Append the renderings one conversation needs to `texts`: (index of the whole, [(turn, P, Q)])."""
    msgs, kw = conv.messages, {"tools": conv.tools, "tokenize": False}

    def add(text: str) -> int:
        texts.append(text)
        return len(texts) - 1

    whole = add(tok.apply_chat_template(msgs, **kw))
    turns = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise BadRecord("template_error", "turn 0 is an assistant turn: with nothing before it there "
                            "is no prompt to render (start the conversation with a system or user turn)")
        p = add(tok.apply_chat_template(msgs[:i], add_generation_prompt=True, **kw))
        q = whole if i == len(msgs) - 1 else add(tok.apply_chat_template(msgs[:i + 1], **kw))
        turns.append((i, p, q))
    return whole, turns


def _samples(plan, ids: list[list[int]], texts: list[str], on_history_change: str,
             specials: frozenset[int]) -> list[Sample]:
    whole, turns = plan
    full = ids[whole]
    mask = np.zeros(len(full), np.uint8)
    unstable = []
    for turn, p, q in turns:
        if not _starts(ids[q], ids[p]):
            raise BadRecord("template_error", f"assistant turn {turn}: the template's generation prompt "
                            "is not where the turn starts (the rendering with add_generation_prompt=true "
                            f"is not a prefix of the turn's, {_first_difference(texts[p], texts[q])})")
        if _starts(full, ids[q]):
            a, b = _turn_span(ids[p], ids[q], specials)
            mask[a:b] = 1
        elif on_history_change == "skip":
            raise BadRecord("history_changed", f"assistant turn {turn}: the template renders the "
                            "conversation up to this turn differently once later turns follow ("
                            f"{_first_difference(texts[q], texts[whole])}); chat.on_history_change=split "
                            "trains such turns in samples of their own")
        else:
            unstable.append((turn, p, q))
    samples = [Sample(full, mask)] if mask.any() or not unstable else []
    while unstable:   # the latest unstable turn's rendering, with the earlier ones it shows unchanged
        _, p, q = unstable.pop()
        own = np.zeros(len(ids[q]), np.uint8)
        a, b = _turn_span(ids[p], ids[q], specials)
        own[a:b] = 1
        keep = []
        for t in unstable:
            if _starts(ids[q], ids[t[2]]):
                a, b = _turn_span(ids[t[1]], ids[t[2]], specials)
                own[a:b] = 1
            else:
                keep.append(t)
        unstable = keep
        samples.append(Sample(list(ids[q]), own))
    return samples
