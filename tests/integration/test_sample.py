"""`python -m train.sample EXPORT_DIR`: the greedy continuation printed is the argmax chain."""
from __future__ import annotations

import subprocess

import torch

from tests.helpers import PY, REPO, child_env
from tests.helpers.export_checkpoints import make_tokenizer


def test_sample_prints_the_greedy_continuation_of_an_export(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         initializer_range=0.5, eos_token_id=None, bos_token_id=None))
    model.save_pretrained(tmp_path)
    ids = tok("the quick", return_tensors="pt")["input_ids"]
    with torch.no_grad():  # greedy by hand: append the argmax token, 8 times, no cache
        for _ in range(8):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = tok.decode(ids[0], skip_special_tokens=True)
    assert len(set(ids[0, -8:].tolist())) > 1  # a continuation that says something about the argmax

    proc = subprocess.run([PY, "-m", "train.sample", str(tmp_path), "--prompt", "the quick", "--max-new-tokens", "8"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1:-1] == expected.splitlines()


def test_sample_names_a_directory_that_is_not_an_export(tmp_path):
    proc = subprocess.run([PY, "-m", "train.sample", str(tmp_path)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not an export with a tokenizer" in proc.stderr
    assert "Traceback" not in proc.stderr
