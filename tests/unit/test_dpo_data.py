"""`prepare mode=preference` and the pair reader: TRL's three input forms and its rendering rule,
pairs kept whole in one micro-batch, bad input counted or refused with file and line."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.prepare import PrepareError
from data_pipeline.read.config import WebDatasetConfig
from data_pipeline.read.loader import WebDatasetLoader
from tests.support.data import build_llama3_tokenizer, write_jsonl
from tests.support.pairs import prepare_pairs, sample_pairs


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_llama3_tokenizer(d)
    return d


def trl_rendering(tok, rec):
    """TRL's DPOTrainer tokenize_fn (1.16), written out: prompt ids, chosen ids, rejected ids."""
    if "prompt" not in rec:
        from trl.data_utils import extract_prompt

        rec = extract_prompt(dict(rec))
    if isinstance(rec["prompt"], list):
        def ids(m, **kw):
            return tok.apply_chat_template(m, tokenize=True, return_dict=True, **kw)["input_ids"]
        p, pc, pr = ids(rec["prompt"], add_generation_prompt=True), ids(rec["prompt"] + rec["chosen"]), \
            ids(rec["prompt"] + rec["rejected"])
    else:
        e = tok.eos_token
        p = tok(rec["prompt"])["input_ids"]
        pc = tok(rec["prompt"] + rec["chosen"] + e)["input_ids"]
        pr = tok(rec["prompt"] + rec["rejected"] + e)["input_ids"]
    from trl.data_utils import common_prefix_length

    n = min(common_prefix_length(p, pc), common_prefix_length(p, pr))
    return p[:n], pc[n:], pr[n:]


@pytest.mark.parametrize("form", ["conversational", "standard", "implicit"])
def test_pairs_render_as_trl_and_batch_together(tmp_path, tok_dir, form):
    from transformers import AutoTokenizer

    recs = sample_pairs(6, form=form)
    src = write_jsonl(tmp_path / "pairs.jsonl", recs)
    m = prepare_pairs(tmp_path / "out", src, tok_dir, **{"split.val_fraction": 0.0})
    assert m["mode"] == "preference" and m["splits"]["train"]["samples"] == 6
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = WebDatasetConfig(urls=str(tmp_path / "out"), shuffle=False, num_workers=0)
    loader = WebDatasetLoader(cfg, rank=0, world_size=1, micro_batch_size=3, seq_len=128)
    assert loader.pairs
    got = {}
    for batch in [b for _, b in zip(range(2), loader)]:
        assert batch["input_ids"].shape == (6, 128) and batch["pair_index"].shape == (3,)
        for i, doc in enumerate(batch["pair_index"].tolist()):
            rows = []
            for row in (i, 3 + i):
                lab = batch["labels"][row]
                first = int((lab != -100).nonzero()[0])
                last = int((lab != -100).nonzero()[-1])
                rows.append((batch["input_ids"][row, :first + 1].tolist(), lab[first:last + 1].tolist()))
            assert rows[0][0] == rows[1][0]  # one prompt for both
            got[doc] = (rows[0][0], rows[0][1], rows[1][1])
    expected = {i: tuple(map(list, trl_rendering(tok, r))) for i, r in enumerate(recs)}
    assert sorted(got.values()) == sorted(expected.values())


def test_bad_pairs_counted_or_refused_with_file_and_line(tmp_path, tok_dir):
    good = sample_pairs(3)
    bad = [
        {"prompt": "q", "rejected": "b"},                                        # no chosen
        {"prompt": "q", "chosen": " ", "rejected": "b"},                          # empty completion
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "same"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "same"},
                      {"role": "user", "content": "more"}]},                      # prompt ends with a reply
        {"prompt": "q", "chosen": "same", "rejected": "same"},                     # identical
    ]
    src = write_jsonl(tmp_path / "pairs.jsonl", good + bad)
    m = prepare_pairs(tmp_path / "out", src, tok_dir)
    r = m["report"]["skipped"]
    assert (r["missing_field"], r["empty_completion"], r["prompt_has_reply"], r["identical"]) == (1, 1, 1, 1)
    assert m["totals"]["samples"] == 3
    with pytest.raises(PrepareError, match=r"pairs\.jsonl:4.*no 'chosen'"):
        prepare_pairs(tmp_path / "out2", src, tok_dir, on_bad_record="raise")


def test_long_pairs_truncate_or_skip(tmp_path, tok_dir):
    recs = [{"prompt": "q " * 5, "chosen": " yes" * 40, "rejected": " no" * 40}]
    src = write_jsonl(tmp_path / "pairs.jsonl", recs + sample_pairs(2, form="standard"))
    m = prepare_pairs(tmp_path / "a", src, tok_dir, **{"preference.max_len": 24, "split.val_fraction": 0.0})
    assert m["report"]["truncated"] >= 1
    cfg = WebDatasetConfig(urls=str(tmp_path / "a"), num_workers=0)
    batch = next(iter(WebDatasetLoader(cfg, rank=0, world_size=1, micro_batch_size=3, seq_len=24)))
    assert int((batch["input_ids"] != 0).sum(1).max()) <= 24
    m = prepare_pairs(tmp_path / "b", src, tok_dir, **{"preference.max_len": 24, "preference.on_long": "skip"})
    assert m["report"]["skipped"]["too_long"] == 1
    with pytest.raises(ValueError, match="trainer.seq_len=16"):
        next(iter(WebDatasetLoader(cfg, rank=0, world_size=1, micro_batch_size=3, seq_len=16)))
    assert torch.is_tensor(batch["pair_index"])
