"""Chat prepare on stock templates: masks found by rendering turn by turn equal transformers' mask of
the same template with {% generation %} markers (four families); templates whose earlier turns render
differently later are split per turn or refused; ShareGPT = messages; tool calls rendered exactly as
apply_chat_template(..., tools=...) does, or refused by file and line; BOM; prepare.max_dropped_frac;
fix texts that name the setting."""
from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset as wds

from data_pipeline.prepare import PrepareError
from data_pipeline.prepare.chat import last_run
from data_pipeline.prepare.chat_masks import render_masks, special_ids
from data_pipeline.prepare.chat_records import Conversation
from tests.support.chat_templates import NO_ASSISTANT, build_family_tokenizer, family_conversations
from tests.support.data import prepare_chat, write_jsonl


def _pair(tmp_path, family):
    """(stock tokenizer dir, stock tokenizer, marked tokenizer)."""
    stock = build_family_tokenizer(tmp_path / f"{family}-stock", family)
    return tmp_path / f"{family}-stock", stock, build_family_tokenizer(tmp_path / f"{family}-marked", family,
                                                                          marked=True)


def oracle(marked, messages, tools=None):
    out = marked.apply_chat_template(messages, tools=tools, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def samples(root):
    """(tokens, mask) of every sample of train and val, read with the webdataset library, in order."""
    out = []
    for split in ("train", "val"):
        urls = [str(p) for p in sorted((root / split).glob("*.tar"))]
        out += [(np.frombuffer(s["u16"], "<u2").tolist(), list(s["mask"]))
                for s in (wds.WebDataset(urls, shardshuffle=False) if urls else [])]
    return out


@pytest.mark.parametrize("family", ["chatml", "llama3", "mistral", "gemma"])
def test_masks_from_the_stock_template_equal_hf_masks_of_the_marked_one(tmp_path, family):
    _, stock, marked = _pair(tmp_path, family)
    recs = family_conversations(family, 24, seed=2)
    assert sum(len(r["messages"]) >= 4 for r in recs) >= 8          # multi-turn
    assert family == "mistral" or sum(r["messages"][0]["role"] == "system" for r in recs) >= 8
    got = render_masks(stock, [Conversation(r["messages"]) for r in recs], "skip", special_ids(stock))
    for r, g in zip(recs, got):
        ids, mask = oracle(marked, r["messages"])
        assert len(g) == 1 and g[0].ids == ids and g[0].mask.tolist() == mask
        assert g[0].mask.sum() > 0 and g[0].mask[0] == 0     # never the role header / BOS


def test_stock_template_through_prepare_and_sharegpt_equals_messages(tmp_path):
    """One Llama-3-style stock tokenizer: ShareGPT and the same conversations as messages give identical
    shards, whose tokens and masks are transformers' (marked template) exactly."""
    tok_dir, _, marked = _pair(tmp_path, "llama3")
    recs = family_conversations("llama3", 30, seed=4)
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    gpt = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in r["messages"]]}
           for r in recs]
    kw = {"split.val_fraction": 0.2}
    a = prepare_chat(tmp_path / "msgs", write_jsonl(tmp_path / "m.jsonl", recs), tok_dir, **kw)
    b = prepare_chat(tmp_path / "gpt", write_jsonl(tmp_path / "g.jsonl", gpt), tok_dir, **kw)
    assert samples(tmp_path / "msgs") == samples(tmp_path / "gpt") and len(samples(tmp_path / "gpt")) == 30
    assert a["splits"] == b["splits"] and b["chat"]["masks"] == "render"
    want = sorted(tuple(map(tuple, oracle(marked, r["messages"]))) for r in recs)
    assert sorted((tuple(i), tuple(m)) for i, m in samples(tmp_path / "gpt")) == want


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def _tool_records():
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    msgs = [{"role": "system", "content": "you answer with tools"},
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": call}]},
            {"role": "tool", "content": "{\"temp\": 21}"},
            {"role": "assistant", "content": "It is 21 degrees."}]
    gpt = {"system": "you answer with tools", "tools": json.dumps([WEATHER]),
           "conversations": [{"from": "human", "value": "weather in Paris?"},
                             {"from": "function_call", "value": json.dumps(call)},   # arguments as JSON text too
                             {"from": "observation", "value": "{\"temp\": 21}"},
                             {"from": "gpt", "value": "It is 21 degrees."}]}
    return {"messages": msgs, "tools": [WEATHER]}, gpt


def test_tool_calls_render_exactly_as_apply_chat_template_with_tools(tmp_path):
    tok_dir, stock, marked = _pair(tmp_path, "chatml")
    rec, gpt = _tool_records()
    plain = family_conversations("chatml", 3, seed=1)
    kw = {"split.val_fraction": 0.0}
    prepare_chat(tmp_path / "m", write_jsonl(tmp_path / "m.jsonl", [*plain, rec]), tok_dir, **kw)
    prepare_chat(tmp_path / "g", write_jsonl(tmp_path / "g.jsonl", [*plain, gpt]), tok_dir, **kw)
    got = samples(tmp_path / "m")
    assert got == samples(tmp_path / "g") and len(got) == 4            # nothing counted away
    ids, mask = oracle(marked, rec["messages"], tools=[WEATHER])
    assert ids == list(stock.apply_chat_template(rec["messages"], tools=[WEATHER])["input_ids"])
    assert (ids, mask) in got
    text = stock.decode(ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n{\"temp\": 21}\n</tool_response>" in text and '"name": "get_weather"' in text
    trained = stock.decode([i for i, m in zip(ids, mask) if m])
    assert trained.startswith("<tool_call>") and "It is 21 degrees.<|im_end|>" in trained
    assert "weather in Paris" not in trained and "temp" not in trained
    # a template with no tool support: an error naming file, line and the setting, never a silent drop
    llama_dir, *_ = _pair(tmp_path, "llama3")
    src = write_jsonl(tmp_path / "mixed.jsonl", [*plain, rec])
    with pytest.raises(PrepareError, match=r"mixed\.jsonl:4: the record has tool calls or tools, but the "
                                           r"chat template does not render them .*chat\.template="):
        prepare_chat(tmp_path / "x", src, llama_dir, **{**kw, "prepare.max_dropped_frac": 1.0})
    assert not (tmp_path / "x").exists()


def _reasoning_records():
    msgs = [{"role": "system", "content": "think first"}]
    for k in range(3):
        msgs += [{"role": "user", "content": f"question {k}"},
                 {"role": "assistant", "content": f"answer {k}", "reasoning_content": f"because {k}"}]
    return [{"messages": msgs}]


@pytest.mark.parametrize("family", ["qwen3", "mistral_v3"])
def test_templates_that_rerender_earlier_turns_are_split_per_turn_exactly(tmp_path, family):
    tok_dir, stock, marked = _pair(tmp_path, family)
    recs = _reasoning_records() if family == "qwen3" else [
        r for r in family_conversations(family, 12, seed=3)
        if r["messages"][0]["role"] == "system" and len(r["messages"]) >= 5][:2]
    assert recs
    m = prepare_chat(tmp_path / "out", write_jsonl(tmp_path / "in.jsonl", recs), tok_dir,
                     **{"split.val_fraction": 0.0})
    want = []   # each assistant turn once, in the rendering of the history up to it (the marked oracle)
    for r in recs:
        msgs = r["messages"]
        for i in [i for i, x in enumerate(msgs) if x["role"] == "assistant"]:
            ids, mask = oracle(marked, msgs[:i + 1])
            want.append((ids, last_run(np.asarray(mask, np.uint8)).tolist()))
    assert sorted(samples(tmp_path / "out")) == sorted(want)
    assert m["report"]["split_conversations"] == len(recs)
    if family == "qwen3":   # the twin: the whole conversation alone loses the earlier reasoning
        full = stock.decode(oracle(marked, recs[0]["messages"])[0])
        assert "because 0" not in full and "because 2" in full
        assert any("because 0" in stock.decode(i) for i, _ in samples(tmp_path / "out"))
    with pytest.raises(PrepareError, match=r"in\.jsonl:1: assistant turn 2: the template renders the "
                                           r"conversation up to this turn differently .*on_history_change=split"):
        prepare_chat(tmp_path / "refused", tmp_path / "in.jsonl", tok_dir,
                     **{"chat.on_history_change": "skip", "on_bad_record": "raise"})


def test_a_template_without_an_assistant_role_is_a_clear_error(tmp_path):
    tok_dir, *_ = _pair(tmp_path, "chatml")
    src = write_jsonl(tmp_path / "in.jsonl", family_conversations("chatml", 2))
    with pytest.raises(ValueError, match="chat.template=.* has no assistant role: a user turn followed by an "
                                         "assistant turn renders as"):
        prepare_chat(tmp_path / "out", src, tok_dir, **{"chat.template": NO_ASSISTANT})
    assert not (tmp_path / "out").exists()


def test_a_bom_does_not_cost_the_first_record_in_chat_and_text_mode(tmp_path):
    from data_pipeline.prepare import prepare
    from data_pipeline.prepare.config import load_prepare_config

    tok_dir, *_ = _pair(tmp_path, "llama3")
    recs = family_conversations("llama3", 5)
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in recs).encode())
    m = prepare_chat(tmp_path / "chat", src, tok_dir, **{"split.val_fraction": 0.0})
    assert m["splits"]["train"]["samples"] == 5 and m["report"]["skipped"]["bad_json"] == 0
    (tmp_path / "t.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n')
    t = prepare(load_prepare_config({"source": {"path": str(tmp_path / "t.jsonl")}, "out": str(tmp_path / "text"),
                                     "tokenizer": {"path": str(tok_dir)}, "split": {"val_fraction": 0.0},
                                     "num_proc": 1, "progress": False}))
    assert t["totals"]["samples"] == 2 and sum(t["report"]["skipped"].values()) == 0


def test_max_dropped_frac_fails_with_counts_and_fix_and_can_be_raised(tmp_path):
    tok_dir, *_ = _pair(tmp_path, "llama3")
    src = write_jsonl(tmp_path / "in.jsonl", [*family_conversations("llama3", 19), "{not json", ""])
    with pytest.raises(PrepareError) as err:
        prepare_chat(tmp_path / "out", src, tok_dir)
    msg = str(err.value)
    assert msg.startswith("1 of 20 records dropped (5.0% > prepare.max_dropped_frac=0.01; bad_json=1)")
    assert "set prepare.max_dropped_frac=0.06 to accept that" in msg and "in.jsonl:20" in msg
    assert not (tmp_path / "out").exists()
    m = prepare_chat(tmp_path / "out", src, tok_dir, **{"prepare.max_dropped_frac": 0.05})
    assert m["report"]["skipped"]["bad_json"] == 1 and m["report"]["skipped"]["empty"] == 1


def test_every_conversation_truncated_away_names_chat_max_len(tmp_path):
    tok_dir, *_ = _pair(tmp_path, "llama3")
    src = write_jsonl(tmp_path / "in.jsonl", family_conversations("llama3", 4))
    with pytest.raises(PrepareError, match=r"gave no documents \(4 records read, skipped truncated_away=4\)"
                                           r":\n  truncated_away: 4 .*chat\.max_len=N: raise it") as err:
        prepare_chat(tmp_path / "out", src, tok_dir, **{"chat.max_len": 4})
    assert "point source.path at" not in str(err.value)
