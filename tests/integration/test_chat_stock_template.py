"""A stock (marker-free) Llama-3-style template, prepared through the CLI and trained: the step-1 loss
of the run equals transformers' cross-entropy over the tokens HF's marked template masks; the CLI
exits 2 naming prepare.max_dropped_frac, and the override on the command line lets it through."""
from __future__ import annotations

import subprocess

import pytest
import torch

from tests.helpers import PY, REPO, child_env, losses, run_train, save_tiny_llama
from tests.support.chat_templates import build_family_tokenizer, family_conversations
from tests.support.data import write_jsonl

N, MAX_LEN = 4, 96


def _prepare(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "data_pipeline.prepare", "mode=chat", "progress=false", "num_proc=1", *args],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(400)
def test_step1_loss_of_a_run_on_a_stock_template_is_the_cross_entropy_over_hf_masked_tokens(tmp_path):
    from transformers import AutoModelForCausalLM

    stock = build_family_tokenizer(tmp_path / "tok", "llama3")
    marked = build_family_tokenizer(tmp_path / "marked", "llama3", marked=True)
    recs = [r for r in family_conversations("llama3", 40, seed=6)
            if len(stock.apply_chat_template(r["messages"])["input_ids"]) <= MAX_LEN][:N]
    src = write_jsonl(tmp_path / "chats.jsonl", [*recs, "{bad"])
    common = [f"source.path={src}", f"tokenizer.path={tmp_path / 'tok'}", f"out={tmp_path / 'data'}",
              f"chat.max_len={MAX_LEN}", "split.val_fraction=0"]
    res = _prepare(common)      # 1 of 5 records is bad JSON: 20% > 1%
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "1 of 5 records dropped (20.0% > prepare.max_dropped_frac=0.01; bad_json=1)" in res.stderr
    assert not (tmp_path / "data").exists()
    res = _prepare([*common, "prepare.max_dropped_frac=0.25"])
    assert res.returncode == 0, res.stderr
    assert "masks from render" in res.stdout

    base = save_tiny_llama(tmp_path / "base", vocab_size=len(stock))
    run_train(["model=hf_local", f"model.path={base}", "data=webdataset", f"data.urls={tmp_path / 'data'}",
               f"trainer.seq_len={MAX_LEN}", "trainer.max_steps=1", f"trainer.micro_batch_size={N}",
               "data.pack=false", "trainer.log_every=1", f"run.dir={tmp_path / 'run'}"], timeout=300)
    step1 = losses(tmp_path / "run")[1]

    model = AutoModelForCausalLM.from_pretrained(base).eval()   # the oracle: HF's mask of the marked template
    nll, count = 0.0, 0
    for r in recs:   # step 1 is one row per conversation: all N of them
        out = marked.apply_chat_template(r["messages"], return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = torch.tensor([out["input_ids"]]), torch.tensor(out["assistant_masks"])
        labels = torch.where(mask.bool(), ids[0], -100)[1:]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        nll += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    assert step1 == pytest.approx(nll / count, rel=2e-5)
