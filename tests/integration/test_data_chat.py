"""`prepare mode=chat` and chat batches: the label mask against transformers' own assistant mask,
the loss against a hand-computed cross-entropy and HF's own loss, packing against the
conversation alone, pack=false padding, exact resume, bad input, max_len and the trainer's
seq_len check, and an end-to-end `python -m train` on a chat prepare output."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipeline.prepare import PrepareError
from data_pipeline.read.config import WebDatasetConfig
from data_pipeline.read.loader import WebDatasetLoader
from tests.helpers import TINY, losses, run_train
from tests.support.data import (
    LLAMA3_CHAT_TEMPLATE,
    build_llama3_tokenizer,
    make_shards,
    prepare_chat,
    sample_conversations,
    write_jsonl,
)

MAX_LEN = 128


@pytest.fixture(scope="module")
def tok(llama3_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_tokenizer, local_files_only=True)


@pytest.fixture(scope="module")
def records():
    return sample_conversations(60, seed=3, max_words=6)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, llama3_tokenizer, records):
    root = tmp_path_factory.mktemp("chat")
    src = write_jsonl(root / "chats.jsonl", records)
    prepare_chat(root / "out", src, llama3_tokenizer, **{"chat.max_len": MAX_LEN, "split.val_fraction": 0.0})
    return root / "out"


def oracle(tok, messages):
    """transformers' rendering and assistant mask of one conversation (the oracle)."""
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def read_samples(root):
    """(tokens, mask) of every train sample, read with the webdataset library (not our reader)."""
    urls = [str(p) for p in sorted((root / "train").glob("*.tar"))]
    return [(np.frombuffer(s["u16"], "<u2").tolist(), list(s["mask"]))
            for s in wds.WebDataset(urls, shardshuffle=False)]


def loader(root, *, rows=2, seq_len=MAX_LEN, world_size=1, rank=0, **cfg):
    cfg = {"urls": str(root), "num_workers": 0, "shuffle_buffer": 8, **cfg}
    return WebDatasetLoader(WebDatasetConfig(**cfg), rank=rank, world_size=world_size,
                            micro_batch_size=rows, seq_len=seq_len)


def take(ld, n):
    it = iter(ld)
    return [next(it) for _ in range(n)]


def conversations_of(batch):
    """(row, start, end) of each conversation in a batch, from its restarting position ids
    and the padding (position ids restart on padding too, so padding is told by its tokens)."""
    out = []
    for r, pos in enumerate(batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        out += [(r, a, b) for a, b in zip(starts, starts[1:])]
    return out


def test_tokens_and_mask_are_exactly_what_apply_chat_template_gives(corpus, tok, records):
    want = {tuple(ids): mask for ids, mask in (oracle(tok, r["messages"]) for r in records)}
    samples = read_samples(corpus)
    assert len(samples) == len(records)   # no val split, nothing skipped or truncated
    for ids, mask in samples:
        assert tuple(ids) in want, "tokens differ from apply_chat_template (an extra EOS?)"
        assert mask == want[tuple(ids)]
        assert ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>") and mask[-1] == 1
    m = json.loads((corpus / "manifest.json").read_text())
    assert m["mode"] == "chat" and m["chat"]["max_len"] == MAX_LEN and m["chat"]["mask_ext"] == "mask"
    assert m["report"]["truncated"] == 0


def test_labels_are_minus_100_exactly_where_the_next_token_is_not_an_assistant_token(corpus, tok):
    want = {}
    for ids, mask in read_samples(corpus):
        want[tuple(ids)] = mask
    seen = 0
    for batch in take(loader(corpus, pack=False), 10):
        for r, a, b in conversations_of(batch):
            ids = tuple(batch["input_ids"][r, a:b].tolist())
            if ids not in want:
                continue  # padding segment
            mask = want[ids]
            expect = [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]
            assert batch["labels"][r, a:b].tolist() == expect
            assert all(p == -100 for p in batch["labels"][r, b:].tolist())
            seen += 1
    assert seen >= 15


@pytest.fixture(scope="module")
def tiny_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      use_cache=False)  # as train/model.py: with a cache transformers ignores packing
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"  # as train/model.py sets it
    return model


def test_loss_is_cross_entropy_over_assistant_tokens_only(corpus, tok, tiny_model):
    from train.loss import lm_loss

    batch = take(loader(corpus, rows=2), 1)[0]
    masks = {tuple(ids): mask for ids, mask in read_samples(corpus)}
    nll, count = 0.0, 0
    for r, a, b in conversations_of(batch):
        ids = batch["input_ids"][r, a:b].tolist()
        if tuple(ids) not in masks:
            continue
        mask = masks[tuple(ids)]
        with torch.no_grad():   # the conversation alone, by hand
            logp = torch.log_softmax(tiny_model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                nll -= float(logp[t, ids[t + 1]])
                count += 1
    assert count > 0 and len(conversations_of(batch)) > 2   # several packed conversations
    with torch.no_grad():
        ours = float(lm_loss(tiny_model, batch))
    assert ours == pytest.approx(nll / count, rel=1e-5)


def test_loss_equals_transformers_own_loss_with_assistant_labels(corpus, tok, tiny_model, records):
    from train.loss import lm_loss

    ids, mask = oracle(tok, records[0]["messages"])
    hf_labels = torch.tensor([[i if m else -100 for i, m in zip(ids, mask)]])  # HF shifts inside
    with torch.no_grad():
        hf = float(tiny_model(input_ids=torch.tensor([ids]), labels=hf_labels).loss)
    shifted = [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([shifted]),
             "position_ids": torch.arange(len(ids))[None]}
    with torch.no_grad():
        assert float(lm_loss(tiny_model, batch)) == pytest.approx(hf, rel=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_conversation_logits_equal_the_conversation_alone(corpus, tiny_model, attn):
    tiny_model.config._attn_implementation = attn
    try:
        batch = next(b for b in take(loader(corpus, rows=1), 10) if len(conversations_of(b)) >= 3)
        convs = conversations_of(batch)   # two conversations or more, then padding
        with torch.no_grad():
            packed = tiny_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
            for _, a, b in convs:
                alone = tiny_model(input_ids=batch["input_ids"][:, a:b]).logits[0]
                torch.testing.assert_close(packed[a:b], alone, rtol=1e-5, atol=1e-5)
            # the twin: without restarting position ids, later conversations see earlier ones
            plain = tiny_model(input_ids=batch["input_ids"]).logits[0]
        _, a, b = convs[1]
        assert not torch.allclose(plain[a:b], packed[a:b], atol=1e-3)
    finally:
        tiny_model.config._attn_implementation = "sdpa"


def test_pack_false_one_conversation_per_row_right_padded_with_eos(corpus, tok, tmp_path):
    eos = tok.eos_token_id
    assert tok.pad_token_id is None
    lengths = {len(ids) for ids, _ in read_samples(corpus)}
    for batch in take(loader(corpus, rows=3, pack=False), 4):
        for r in range(3):
            pos = batch["position_ids"][r].tolist()
            n = next((i for i in range(1, len(pos)) if pos[i] == 0), len(pos))
            assert n in lengths                         # exactly one conversation, then padding
            assert set(batch["input_ids"][r, n:].tolist()) <= {eos}
            assert set(batch["labels"][r, n - 1:].tolist()) == {-100}
            assert pos[n:] == list(range(len(pos) - n))
    packed = take(loader(corpus, rows=3), 1)[0]
    assert len(conversations_of(packed)) > 3 + 1        # the twin: packing puts several per row
    text = make_shards(tmp_path, vocab_size=256)
    with pytest.raises(ValueError, match="data.pack=false pads one conversation per row, but these shards are text"):
        loader(text.root, pack=False)


def test_resume_is_exact_with_masks_also_with_workers_and_on_another_world_size(corpus):
    ref = take(loader(corpus, rows=2), 12)
    first = loader(corpus, rows=2, num_workers=2)
    take(first, 5)
    state = first.state_dict()
    again = loader(corpus, rows=2, num_workers=2)
    again.load_state_dict(state)
    for a, b in zip(take(again, 7), ref[5:]):
        for k in ("input_ids", "labels", "position_ids"):
            assert torch.equal(a[k], b[k]), k
    # two ranks consume 3 rounds each (global batches 0..5), then one rank continues at 6
    states = []
    for rank in range(2):
        ld = loader(corpus, rows=2, world_size=2, rank=rank)
        got = take(ld, 3)
        assert torch.equal(got[1]["labels"], ref[2 + rank]["labels"])
        states.append(ld.state_dict())
    one = loader(corpus, rows=2)
    one.load_elastic(states)
    assert torch.equal(take(one, 1)[0]["input_ids"], ref[6]["input_ids"])
    text_state = {**state, "unit": "tokens"}
    with pytest.raises(ValueError, match="counts tokens but these shards are chat"):
        loader(corpus, rows=2).load_state_dict(text_state)


BAD = {
    "unknown_role": {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    "empty_assistant": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
    "not_text": {"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]},
    "missing_field": {"text": "no conversation here"},
    "bad_json": "{not json",
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_record_is_refused_with_file_and_line(tmp_path, llama3_tokenizer, reason):
    src = write_jsonl(tmp_path / "in.jsonl", [*sample_conversations(2), BAD[reason]])
    with pytest.raises(PrepareError, match=r"in\.jsonl:3: .*on_bad_record=skip"):
        prepare_chat(tmp_path / "out", src, llama3_tokenizer, on_bad_record="raise")
    assert not (tmp_path / "out").exists()


def test_bad_records_are_counted_and_the_good_ones_kept(tmp_path, llama3_tokenizer):
    good = sample_conversations(3, max_words=4)
    refused = {"messages": [{"role": "assistant", "content": "I start"}]}  # the template raises
    strict = ("{%- if messages[0]['role'] == 'assistant' %}{{ raise_exception('user first') }}"
              "{%- endif %}" + LLAMA3_CHAT_TEMPLATE)
    src = write_jsonl(tmp_path / "in.jsonl", [good[0], *BAD.values(), refused, *good[1:], ""])
    m = prepare_chat(tmp_path / "out", src, llama3_tokenizer, **{
        "split.val_fraction": 0.0, "chat.template": strict, "prepare.max_dropped_frac": 1.0})
    skipped = m["report"]["skipped"]
    assert {k: v for k, v in skipped.items() if v} == {**{r: 1 for r in BAD}, "empty": 1,
                                                        "template_error": 1}
    assert m["splits"]["train"]["samples"] == 3


def test_prompt_completion_instruction_and_parquet_records(tmp_path, llama3_tokenizer, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"prompt": "what is a shard", "completion": "a tar file"},
            {"instruction": "add", "input": "2 and 3", "output": "5", "system": "be brief"}]
    want = [[{"role": "user", "content": "what is a shard"}, {"role": "assistant", "content": "a tar file"}],
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add\n\n2 and 3"},
             {"role": "assistant", "content": "5"}]]
    pq.write_table(pa.Table.from_pylist([{"messages": w} for w in want]), tmp_path / "in.parquet")
    for name, src in (("jsonl", write_jsonl(tmp_path / "in.jsonl", recs)), ("parquet", tmp_path / "in.parquet")):
        prepare_chat(tmp_path / name, src, llama3_tokenizer, **{"split.val_fraction": 0.0})
        got = sorted(read_samples(tmp_path / name))
        assert got == sorted(tuple(oracle(tok, w)) for w in want), name


def test_train_on_all_and_last_assistant(tmp_path, llama3_tokenizer, tok):
    conv = sample_conversations(40, seed=5, max_words=3)
    conv = [c for c in conv if sum(m["role"] == "assistant" for m in c["messages"]) >= 2][:3]
    src = write_jsonl(tmp_path / "in.jsonl", conv)
    for mode in ("all", "last_assistant"):
        prepare_chat(tmp_path / mode, src, llama3_tokenizer, **{"chat.train_on": mode, "split.val_fraction": 0.0})
    for c in conv:
        ids, mask = oracle(tok, c["messages"])
        samples = {tuple(i): m for i, m in read_samples(tmp_path / "all")}
        assert samples[tuple(ids)] == [1] * len(ids)
        last = {tuple(i): m for i, m in read_samples(tmp_path / "last_assistant")}[tuple(ids)]
        # the last assistant turn: the oracle mask after the last header of an assistant turn
        hdr = len(ids) - 1 - ids[::-1].index(tok.convert_tokens_to_ids("<|end_header_id|>"))
        assert last == [m if t > hdr else 0 for t, m in enumerate(mask)] and 0 < sum(last) < sum(mask)


def test_max_len_truncate_and_skip_are_counted(tmp_path, llama3_tokenizer, tok):
    recs = sample_conversations(30, seed=7, max_words=10)
    recs.append({"messages": [{"role": "user", "content": "data shards " * 30},   # answer cut away
                              {"role": "assistant", "content": "yes"}]})
    lens = [len(oracle(tok, r["messages"])[0]) for r in recs]
    masks = [oracle(tok, r["messages"])[1] for r in recs]
    limit = 40
    longer = sum(n > limit for n in lens)
    away = sum(n > limit and not any(m[:limit]) for n, m in zip(lens, masks))
    assert longer > away > 0
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    t = prepare_chat(tmp_path / "t", src, llama3_tokenizer, **{"chat.max_len": limit, "split.val_fraction": 0.0,
                                                            "prepare.max_dropped_frac": 1.0})
    assert t["report"]["truncated"] == longer - away and t["report"]["skipped"]["truncated_away"] == away
    assert max(len(i) for i, _ in read_samples(tmp_path / "t")) == limit
    assert all(any(m) for _, m in read_samples(tmp_path / "t"))
    s = prepare_chat(tmp_path / "s", src, llama3_tokenizer,
                     **{"chat.max_len": limit, "chat.on_long": "skip", "split.val_fraction": 0.0,
                        "prepare.max_dropped_frac": 1.0})
    assert s["report"]["skipped"]["too_long"] == longer and s["report"]["truncated"] == 0
    assert s["splits"]["train"]["samples"] == len(recs) - longer


def test_trainer_refuses_chat_shards_longer_than_seq_len(corpus, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from data_pipeline.schema import ConfigError
    from tests.helpers import REPO
    from train.config import load_config

    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        def cfg(seq_len):
            raw = compose("train", [*TINY, "data=webdataset", f"data.urls={corpus}",
                                    f"trainer.seq_len={seq_len}", f"run.dir={tmp_path}"])
            return load_config(OmegaConf.to_container(raw, resolve=True), world_size=1)
        with pytest.raises(ConfigError, match=rf"chat.max_len={MAX_LEN} .* trainer.seq_len={MAX_LEN - 1}"):
            cfg(MAX_LEN - 1)
        assert cfg(MAX_LEN).trainer.seq_len == MAX_LEN
    with pytest.raises(ValueError, match="> trainer.seq_len=16"):  # the loader checks real lengths
        loader(corpus, seq_len=16)


def test_template_missing_or_markers_required_but_absent_is_refused_before_any_work(tmp_path):
    bare = tmp_path / "bare"
    build_llama3_tokenizer(bare, template=None)
    src = write_jsonl(tmp_path / "in.jsonl", sample_conversations(2))
    with pytest.raises(ValueError, match="has no chat template: set chat.template="):
        prepare_chat(tmp_path / "out", src, bare)
    no_markers = LLAMA3_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(ValueError, match="no {% generation %} markers, but chat.masks=markers"):
        prepare_chat(tmp_path / "out", src, bare, **{"chat.template": no_markers, "chat.masks": "markers"})
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="chat.template='t.jinja' is neither a file nor a Jinja"):
        prepare_chat(tmp_path / "out", src, bare, **{"chat.template": "t.jinja"})
    (tmp_path / "t.jinja").write_text(LLAMA3_CHAT_TEMPLATE)   # a template file is accepted
    prepare_chat(tmp_path / "out", src, bare, **{"chat.template": str(tmp_path / "t.jinja")})
    saved = json.loads((tmp_path / "out" / "tokenizer" / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == LLAMA3_CHAT_TEMPLATE


def test_trained_tokenizer_gets_the_default_template_in_its_config(tmp_path):
    from transformers import AutoTokenizer

    from data_pipeline.prepare.chat import DEFAULT_CHAT_TEMPLATE

    src = write_jsonl(tmp_path / "in.jsonl", sample_conversations(40))
    m = prepare_chat(tmp_path / "out", src, None, **{"tokenizer.vocab_size": 320})
    saved = json.loads((tmp_path / "out" / "tokenizer" / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == DEFAULT_CHAT_TEMPLATE
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    assert tok.eos_token == "<|im_end|>" and m["chat"]["pad_token_id"] == tok.pad_token_id is not None
    msgs = sample_conversations(1)[0]["messages"]
    ids, mask = oracle(tok, msgs)
    marked = tok.decode([i for i, k in zip(ids, mask) if k])
    assert marked == "".join(x["content"] + "<|im_end|>" for x in msgs if x["role"] == "assistant")


@pytest.mark.timeout(300)
def test_train_runs_on_a_chat_prepare_output(corpus, tmp_path):
    run_train([*TINY, "data=webdataset", f"data.urls={corpus}", f"trainer.seq_len={MAX_LEN}",
               "trainer.max_steps=12", "trainer.micro_batch_size=2", "schedule=constant",
               "optim.lr=3e-3", "data.shuffle_buffer=8", f"run.dir={tmp_path}"], timeout=240)
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 13))
    assert np.mean([got[s] for s in (10, 11, 12)]) < np.mean([got[s] for s in (1, 2, 3)])
    last = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]
    assert last["data_rows"] == 12 * 2


def test_chat_shards_without_manifest_or_index_are_scanned(corpus, tmp_path):
    import shutil

    shard = next((corpus / "train").glob("*.tar"))
    shutil.copy(shard, tmp_path / "only.tar")       # no manifest.json, no .idx.npy
    vocab = json.loads((corpus / "manifest.json").read_text())["vocab_size"]
    scanned = take(loader(str(tmp_path / "only.tar"), vocab_size=vocab), 3)
    for a, b in zip(scanned, take(loader(corpus), 3)):
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["position_ids"], b["position_ids"])


def test_a_mask_of_the_wrong_size_is_a_bad_shard(tmp_path):
    from data_pipeline.read.shard_table import ShardError

    ok = {"__key__": "000", "u16": np.arange(1, 9, dtype="<u2").tobytes(), "mask": bytes([0, 1] * 4)}
    bad = {"__key__": "001", "u16": np.arange(1, 9, dtype="<u2").tobytes(), "mask": bytes(7)}
    for name, samples in (("good.tar", [ok]), ("bad.tar", [ok, bad])):
        with wds.TarWriter(str(tmp_path / name)) as w:
            for s in samples:
                w.write(s)
    with pytest.raises(ShardError, match=r"001\.mask has 7 bytes for 8 tokens"):
        loader(str(tmp_path / "bad.tar"), vocab_size=16, seq_len=8)
    with pytest.warns(UserWarning, match="skipping shard"):
        ld = loader(f"{tmp_path}/good.tar::{tmp_path}/bad.tar", vocab_size=16, seq_len=8, on_error="skip")
    assert ld.table.names == [str(tmp_path / "good.tar")]
    assert take(ld, 1)[0]["labels"][0].tolist() == [2, -100, 4, -100, 6, -100, 8, -100]
