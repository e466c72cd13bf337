"""The tokenizer half of a GGUF file: vocabulary, merges, pre-tokenizer name, special ids, chat template.

llama.cpp does not read tokenizer.json: it splits text with the regex it associates with the
`tokenizer.ggml.pre` name, then applies the merges. A wrong name makes a served model see
different tokens than it was trained on, silently. So the name is chosen the way llama.cpp's
own converter does where it can (a hash of the token ids of a fixed check text identifies a
known vocabulary), and otherwise from the split pattern in tokenizer.json, which is the only
thing that can identify a vocabulary trained locally. Anything else is refused, naming what
was found, instead of guessing. BOS/EOS/padding ids and add_bos/add_eos are read off what the
Hugging Face tokenizer actually does when asked to add special tokens.
"""
from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

# From ggml-org/llama.cpp convert_hf_to_gguf.py, TextModel.get_vocab_base_pre (MIT licence):
# the check text, and the hashes of sha256(str(tokenizer.encode(CHKTXT))) of the vocabularies
# relevant to Llama-architecture exports, with the names llama.cpp gives them.
CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
          "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
          "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
          "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
KNOWN_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # Falcon3-7B-Base
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # starcoder2-3b
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # Xenova/gpt-4o
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
}

# The split regexes as tokenizer.json writes them, with the `tokenizer.ggml.pre` name whose
# regex llama.cpp's src/llama-vocab.cpp (llm_tokenizer_bpe) documents as that original
# ("original regex from tokenizer.json" comments), and whether that pre type makes llama.cpp
# take a word that is itself a vocabulary entry whole (`ignore_merges`).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LETTERS_UP = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LETTERS_LOW = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
SPLIT_PATTERNS = {
    GPT2_PATTERN: ("gpt-2", False),
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        ("llama-bpe", True),
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        ("qwen2", False),
    (rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UP}*{_LETTERS_LOW}+{_CONTRACTIONS}?|"
     rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UP}+{_LETTERS_LOW}*{_CONTRACTIONS}?|"
     r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"): ("gpt-4o", False),
    (rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UP}*{_LETTERS_LOW}+|[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UP}+{_LETTERS_LOW}*|"
     r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"): ("tekken", True),
}
# Normalizers llama.cpp's own conversions accept for these families (Qwen2 ships NFC).
_NORMALIZERS = (None, "NFC")


class TokenizerFidelityError(ValueError):
    """llama.cpp would tokenize differently from the Hugging Face tokenizer; nothing is guessed."""


def chkhsh(tokenizer: Any) -> str:
    """convert_hf_to_gguf.py's vocabulary fingerprint: sha256 of str(ids of CHKTXT)."""
    return sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()


def pre_tokenizer_name(tokenizer: Any, spec: dict[str, Any], source: str) -> tuple[str, str]:
    """(tokenizer.ggml.pre, how it was recognised) for a fast tokenizer and its tokenizer.json."""
    known = KNOWN_HASHES.get(chkhsh(tokenizer))
    if known:
        return known, "vocabulary hash (llama.cpp convert_hf_to_gguf.py)"
    pattern = split_pattern(spec, source)
    entry = SPLIT_PATTERNS.get(pattern)
    if entry is None:
        raise TokenizerFidelityError(
            f"{source}: pre-tokenizer split pattern {pattern!r} is not one llama.cpp implements "
            f"(known: {', '.join(n for n, _ in SPLIT_PATTERNS.values())}); its GGUF would tokenize "
            "differently. Train the tokenizer with one of those patterns, or set export.gguf=null")
    name, ignore_merges = entry
    check_merges(tokenizer, spec, ignore_merges, name, source)
    return name, "split pattern in tokenizer.json"


def split_pattern(spec: dict[str, Any], source: str) -> str:
    """The one regex a byte-level BPE pre-tokenizer splits with; refuse any other shape."""
    pre = spec.get("pre_tokenizer") or {}
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in _NORMALIZERS:
        raise TokenizerFidelityError(f"{source}: normalizer {normalizer!r} has no llama.cpp equivalent; "
                                     "set export.gguf=null")
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PATTERN
    if (kinds == ["Split", "ByteLevel"] and "Regex" in (steps[0].get("pattern") or {})
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        return steps[0]["pattern"]["Regex"]
    raise TokenizerFidelityError(
        f"{source}: unknown pre-tokenizer {json.dumps(pre)[:300]}: llama.cpp splits text only with "
        "ByteLevel (GPT-2 regex) or a Split regex followed by ByteLevel(use_regex=false), both without "
        "add_prefix_space. Set export.gguf=null, or convert with llama.cpp's convert_hf_to_gguf.py")


def check_merges(tokenizer: Any, spec: dict[str, Any], ignore_merges: bool, name: str, source: str) -> None:
    """llama.cpp's `ignore_merges` for `name` must give the same tokens as the HF BPE model.

    They differ only for a word that is itself a vocabulary entry but which the merges would
    split: check every entry when the two settings disagree.
    """
    if bool((spec.get("model") or {}).get("ignore_merges")) == ignore_merges:
        return
    model = tokenizer.backend_tokenizer.model
    added = set(tokenizer.get_added_vocab())
    split = [t for t in (spec.get("model") or {}).get("vocab", {})
             if t not in added and [x.value for x in model.tokenize(t)] != [t]]
    if split:
        raise TokenizerFidelityError(
            f"{source}: llama.cpp's {name!r} takes a word that is in the vocabulary whole "
            f"(ignore_merges={ignore_merges}), but this BPE (ignore_merges={not ignore_merges}) "
            f"splits {len(split)} such entries, e.g. {split[:3]}; set export.gguf=null")


def special_tokens(tokenizer: Any, source: str) -> dict[str, Any]:
    """bos/eos/pad ids and add_bos/add_eos as the HF tokenizer behaves with add_special_tokens=True.

    A vocabulary without a BOS (GPT-2 style) gets its EOS as BOS, as llama.cpp's GPT-2 GGUFs do;
    the padding id is the tokenizer's pad, else its EOS.
    """
    probe = "Hello world"
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
    prefix, suffix = (full[:starts[0]], full[starts[0] + len(plain):]) if starts else (full, [])
    eos = tokenizer.eos_token_id
    if not starts or len(prefix) > 1 or len(suffix) > 1 or (suffix and suffix[0] != eos):
        raise TokenizerFidelityError(
            f"{source}: with add_special_tokens=True the tokenizer adds {prefix} before and {suffix} after "
            f"the text; llama.cpp can only add one BOS before and its EOS ({eos}) after. Set export.gguf=null")
    bos = prefix[0] if prefix else (tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return {"bos": bos, "eos": eos, "pad": pad, "add_bos": bool(prefix), "add_eos": bool(suffix)}


def add_vocab(writer: Any, export_dir: Path, n_vocab: int) -> dict[str, Any]:
    """Write the gpt2-style BPE vocabulary of EXPORT/tokenizer.json; `no_vocab` when there is none."""
    import gguf

    from train.export.artifacts import load_tokenizer

    tok_file = export_dir / "tokenizer.json"
    if not tok_file.is_file():
        writer.add_tokenizer_model("no_vocab")
        return {"tokenizer": None, "note": "no tokenizer in the export (synthetic data): GGUF written "
                "with tokenizer.ggml.model=no_vocab; llama.cpp runs it on token ids, Ollama cannot chat"}
    spec = json.loads(tok_file.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise TokenizerFidelityError(f"{tok_file}: tokenizer model {model.get('type')!r} (byte_fallback="
                                     f"{model.get('byte_fallback')}) is not a byte-level BPE; export.gguf "
                                     "writes gpt2-style BPE vocabularies only (set export.gguf=null)")
    tokenizer = load_tokenizer(export_dir)
    tokens, types = _token_list(spec, n_vocab, tok_file)
    pre, how = pre_tokenizer_name(tokenizer, spec, str(tok_file))
    special = special_tokens(tokenizer, str(tok_file))
    merges = gguf.SpecialVocab(export_dir, load_merges=True, special_token_types=(), n_vocab=n_vocab).merges
    if not merges:
        raise TokenizerFidelityError(f"{tok_file} has no BPE merges: llama.cpp cannot tokenize without them")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "pad"):
        if special[kind] is not None:
            getattr(writer, f"add_{kind}_token_id")(special[kind])
    writer.add_add_bos_token(special["add_bos"])
    writer.add_add_eos_token(special["add_eos"])
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template if isinstance(template, str) else
                                 [{"name": k, "template": v} for k, v in template.items()])
    return {"tokenizer": "gpt2", "pre": pre, "pre_recognised_by": how, "tokens": n_vocab,
            "merges": len(merges), "special_ids": special, "chat_template": bool(template)}


def _token_list(spec: dict[str, Any], n_vocab: int, tok_file: Path) -> tuple[list[str], list[int]]:
    """Tokens by id (holes as [PADi], UNUSED) and their llama.cpp types, as convert_hf_to_gguf does."""
    import gguf

    vocab: dict[int, str] = {i: t for t, i in spec["model"]["vocab"].items()}
    control = {}
    for added in spec.get("added_tokens") or []:
        vocab[added["id"]] = added["content"]
        control[added["id"]] = added.get("special", False)
    if max(vocab) >= n_vocab:
        raise TokenizerFidelityError(f"{tok_file}: token id {max(vocab)} does not fit the model's "
                                     f"vocab_size {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in vocab:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(vocab[i])
            types.append(gguf.TokenType.NORMAL if i not in control else
                         gguf.TokenType.CONTROL if control[i] else gguf.TokenType.USER_DEFINED)
    return tokens, types
