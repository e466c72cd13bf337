"""GGUF tokenizer fidelity: the pre-tokenizer name llama.cpp needs, special ids as the Hugging Face
tokenizer behaves, the chat template, and refusals instead of guesses.

Oracles: the split patterns are written here as Meta's Llama 3, Qwen2 and GPT-2 tokenizers ship
them, and the expected names are llama.cpp's (src/llama-vocab.cpp); the GGUF is read back with
the `gguf` package's reader; add_bos/add_eos are compared with what transformers encodes."""
from __future__ import annotations

import json

import pytest

from tests.helpers.export_checkpoints import CHAT_TEMPLATE, make_bpe_tokenizer, make_checkpoint
from train.export.config import ExportConfig
from train.export.gguf_vocab import TokenizerFidelityError, add_vocab, chkhsh
from train.export.hf_export import export_checkpoint

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
FAMILIES = {  # name: (split pattern or None for ByteLevel's own GPT-2 regex, BOS added by the tokenizer)
    "gpt-2": (None, None),
    "llama-bpe": (LLAMA3, "<|begin_of_text|>"),
    "qwen2": (QWEN2, None),
}
N_VOCAB = 320


def field(reader, key):
    f = reader.fields[key]
    if f.types[0].name == "STRING":
        return bytes(f.parts[f.data[0]]).decode()
    return f.parts[f.data[0]].item()


def vocab_gguf(tok_dir, path):
    """A GGUF holding only the tokenizer metadata that add_vocab writes, read back with gguf's reader."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    info = add_vocab(writer, tok_dir, N_VOCAB)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return gguf.GGUFReader(path), info


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    return {name: make_bpe_tokenizer(root / name, pattern, bos, chat_template=CHAT_TEMPLATE)
            for name, (pattern, bos) in FAMILIES.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pre_tokenizer_and_special_ids_as_hf_behaves(tokenizers, tmp_path, family):
    from transformers import AutoTokenizer

    reader, info = vocab_gguf(tokenizers[family], tmp_path / "v.gguf")
    assert field(reader, "tokenizer.ggml.pre") == family
    assert info["pre_recognised_by"] == "split pattern in tokenizer.json"
    tok = AutoTokenizer.from_pretrained(tokenizers[family])
    bos, eos = field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")
    add_bos, add_eos = field(reader, "tokenizer.ggml.add_bos_token"), field(reader, "tokenizer.ggml.add_eos_token")
    assert eos == tok.eos_token_id and field(reader, "tokenizer.ggml.padding_token_id") == tok.eos_token_id
    for text in ["Hello world", "I've been told he's @debian.org there"]:
        plain = tok.encode(text, add_special_tokens=False)
        assert [bos] * add_bos + plain + [eos] * add_eos == tok.encode(text, add_special_tokens=True)
    if FAMILIES[family][1]:
        assert add_bos and bos == tok.bos_token_id
    else:  # no BOS in a GPT-2 style vocabulary: its EOS stands in, never some arbitrary id
        assert not add_bos and bos == tok.eos_token_id
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE


def test_export_of_a_llama3_tokenizer_writes_llama_bpe_and_carries_the_chat_template(tokenizers, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    ckpt = make_checkpoint(tmp_path / "run", tokenizer_dir=str(tokenizers["llama-bpe"]))
    out = tmp_path / "export"
    meta = export_checkpoint(ckpt.path, out, ExportConfig(kind="hf", gguf="f16", verify=False))
    assert meta["gguf"]["pre"] == "llama-bpe"
    reader = gguf.GGUFReader(out / "model-f16.gguf")
    assert field(reader, "tokenizer.ggml.pre") == "llama-bpe" and field(reader, "tokenizer.ggml.add_bos_token")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    source = AutoTokenizer.from_pretrained(tokenizers["llama-bpe"]).apply_chat_template(messages, tokenize=False)
    exported = AutoTokenizer.from_pretrained(out).apply_chat_template(messages, tokenize=False)
    assert exported == source == "<|user|>hi<|end_of_text|><|assistant|>hello<|end_of_text|>"
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE


def _edit_tokenizer(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    spec = json.loads((dst / "tokenizer.json").read_text())
    edit(spec)
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    return dst


@pytest.mark.parametrize("edit,named", [
    (lambda s: s["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+|[^\w\s]+"), r"\\w+|[^\\w\\s]+"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "Whitespace"),
    (lambda s: s["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "add_prefix_space"),
    (lambda s: s.update(normalizer={"type": "Lowercase"}), "Lowercase"),
])
def test_unknown_pre_tokenizer_is_refused_naming_it(tokenizers, tmp_path, edit, named):
    bad = _edit_tokenizer(tokenizers["llama-bpe"], tmp_path / "bad", edit)
    with pytest.raises(TokenizerFidelityError, match="export.gguf=null") as err:
        vocab_gguf(bad, tmp_path / "v.gguf")
    assert named in str(err.value) and "tokenizer.json" in str(err.value)


def test_merges_that_llama_cpp_would_skip_are_refused(tmp_path):
    """llama-bpe takes a word that is a vocabulary entry whole; this BPE's merges split 'abc'."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(["<|end_of_text|>", *sorted(alphabet), "bc", "ab", "abc"])}
    bpe = models.BPE(vocab=vocab, merges=[("b", "c"), ("a", "b"), ("ab", "c")], ignore_merges=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>").save_pretrained(tmp_path / "t")
    with pytest.raises(TokenizerFidelityError, match=r"'llama-bpe'.*splits 1 such entries.*'abc'"):
        vocab_gguf(tmp_path / "t", tmp_path / "v.gguf")


def test_a_known_vocabulary_is_named_by_its_hash_first(tokenizers, tmp_path, monkeypatch):
    """convert_hf_to_gguf's fingerprint wins over the pattern, as in llama.cpp's own converter."""
    from transformers import AutoTokenizer

    from train.export import gguf_vocab

    digest = chkhsh(AutoTokenizer.from_pretrained(tokenizers["gpt-2"]))
    monkeypatch.setitem(gguf_vocab.KNOWN_HASHES, digest, "smollm")
    reader, info = vocab_gguf(tokenizers["gpt-2"], tmp_path / "v.gguf")
    assert field(reader, "tokenizer.ggml.pre") == "smollm" and info["pre_recognised_by"].startswith("vocabulary hash")
