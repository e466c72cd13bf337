"""The tokenizer of a prepared corpus: a local Hugging Face tokenizer, or a byte-level BPE
trained on the corpus with `tokenizers`. Either way it is saved into OUT/tokenizer, loadable
offline with `AutoTokenizer.from_pretrained(OUT/tokenizer)`."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

EOS_TOKEN = "<|endoftext|>"


def pad_token_id(tok) -> int | None:
    """The id that pads chat and preference rows: the tokenizer's pad token, else its EOS."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, out_dir: Path,
              progress: bool = False, chat_tokens: tuple[str, ...] = ()):
    """Train a GPT-2 style byte-level BPE (every byte representable: no unknown tokens).

    chat_tokens (mode=chat): the template's special tokens, start and end of a turn; the end
    of a turn becomes the EOS (where generation stops) and EOS_TOKEN the pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN, *chat_tokens], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if chat_tokens:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=chat_tokens[-1],
                                       pad_token=EOS_TOKEN)
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN)
    fast.save_pretrained(str(out_dir))
    return fast


def copy_tokenizer(path: str, out_dir: Path):
    """Load a local tokenizer (fast, with an EOS token) and save it into out_dir."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer.path={path!r} has no fast (tokenizers) version; convert it "
                         "or let prepare train one (tokenizer.train=true)")
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer.path={path!r} has no eos_token; set one in its "
                         "tokenizer_config.json (prepare appends EOS to every document)")
    tok.save_pretrained(str(out_dir))
    return tok
