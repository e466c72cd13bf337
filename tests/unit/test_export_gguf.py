"""GGUF export: f16 and q8_0 round trips, checked against transformers' own GGUF reader (which
undoes llama.cpp's q/k permutation independently), tokenizer metadata, and refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.export_checkpoints import (
    TINY_LLAMA,
    export_tensors,
    logits,
    make_checkpoint,
    make_tokenizer,
)
from train.export.config import ExportConfig
from train.export.gguf_export import GGUFExportError, permute_qk, unpermute_qk
from train.export.hf_export import export_checkpoint
from train.export.verify import verify_batch


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    tok = make_tokenizer(root / "tokenizer")
    return make_checkpoint(root / "run", tokenizer_dir=str(tok)), tok


def _field(reader, key):
    f = reader.fields[key]
    values = [f.parts[i] for i in f.data]
    if f.types and f.types[0].name == "STRING":
        return bytes(values[0]).decode()
    if f.types and f.types[0].name == "ARRAY":
        return values
    return values[0].item()


@pytest.mark.parametrize("kind,rel_tol", [("f16", 2e-3), ("q8_0", 3e-2)])
def test_gguf_round_trip_matches_the_hf_export(run, tmp_path, kind, rel_tol):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ckpt, tok_dir = run
    out = tmp_path / "export"
    meta = export_checkpoint(ckpt.path, out, ExportConfig(kind="hf", gguf=kind))
    info = meta["gguf"]
    path = out / f"model-{kind}.gguf"
    assert info["file"] == path.name and path.name in meta["files"]
    assert info["verification"]["tensors_checked"] == len(export_tensors(out))

    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == ("Q8_0" if kind == "q8_0" else "F16")
    assert types["blk.1.ffn_down.weight"] == ("Q8_0" if kind == "q8_0" else "F16")
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_output.weight"} <= set(types)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == 2 and _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    source_tok = AutoTokenizer.from_pretrained(tok_dir)
    assert _field(reader, "tokenizer.ggml.eos_token_id") == source_tok.eos_token_id
    tokens = [bytes(t).decode() for t in _field(reader, "tokenizer.ggml.tokens")]
    assert len(tokens) == TINY_LLAMA["vocab_size"]
    vocab = source_tok.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert len(_field(reader, "tokenizer.ggml.merges")) == info["merges"] > 0

    # transformers reads GGUF with its own name map and reverse q/k permutation
    hf_model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf_model)
    assert parsed["config"]["num_hidden_layers"] == 2
    exported = export_tensors(out)
    for name in exported:  # GGUF is made from the checkpoint's fp32 weights, not the bf16 export
        t = ckpt.state_dict[name].float()
        got = torch.as_tensor(np.asarray(parsed["tensors"][name])).float()
        bound = 1e-3 if kind == "f16" else 0.6 * t.abs().max().item() / 127 + 1e-6
        assert (got - t).abs().max().item() <= bound, name
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    reloaded.load_state_dict({k: torch.as_tensor(np.asarray(v)).float() for k, v in parsed["tensors"].items()},
                             strict=False)
    ids = verify_batch(TINY_LLAMA["vocab_size"])
    ref = logits(ckpt.model, ids)
    diff = (logits(reloaded, ids) - ref).abs().max().item()
    assert diff <= rel_tol * ref.abs().max().item(), diff


def test_gguf_without_tokenizer_is_no_vocab(tmp_path):
    import gguf

    ckpt = make_checkpoint(tmp_path / "run")
    meta = export_checkpoint(ckpt.path, tmp_path / "e", ExportConfig(kind="hf", gguf="f16", verify=False))
    assert meta["gguf"]["tokenizer"] is None and "no_vocab" in meta["gguf"]["note"]
    reader = gguf.GGUFReader(tmp_path / "e" / "model-f16.gguf")
    assert _field(reader, "tokenizer.ggml.model") == "no_vocab"
    assert _field(reader, "llama.vocab_size") == TINY_LLAMA["vocab_size"]


def test_non_llama_model_exports_to_hf_but_gguf_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    ckpt = make_checkpoint(tmp_path / "run", config=config)
    with pytest.raises(GGUFExportError, match="Llama-architecture models only.*'gpt2'.*GPT2LMHeadModel"):
        export_checkpoint(ckpt.path, tmp_path / "g", ExportConfig(kind="hf", gguf="q8_0"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    meta = export_checkpoint(ckpt.path, tmp_path / "hf", ExportConfig(kind="hf", dtype="fp32"))
    assert meta["verification"]["passed"] and meta["architectures"] == ["GPT2LMHeadModel"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    ids = verify_batch(128, 64)
    assert torch.equal(logits(model, ids), logits(ckpt.model, ids))


def test_qk_permutation_is_llama_cpp_layout_and_invertible():
    rows = np.arange(2 * 8)[:, None] * np.ones((1, 3))  # 2 heads of head_dim 8
    permuted = permute_qk(rows, n_head=2)
    # per head, rotate-half pairs (i, i + 4) become adjacent rows (2i, 2i + 1)
    assert permuted[:8, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert permuted[8:, 0].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]
    assert np.array_equal(unpermute_qk(permuted, 2), rows)
