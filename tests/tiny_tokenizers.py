"""Tiny CLIP and T5 tokenizers written locally (no hub): real tokenizer classes over small vocabularies."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "a",
    "the",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "on",
    "of",
    "with",
    "background",
    "small",
    "large",
    "photo",
    "cat",
    "dog",
    "sky",
)


def clip_tokenizer(folder: Path, model_max_length: int = 77) -> Path:
    """A CLIPTokenizer whose vocabulary is single characters plus whole words (byte-level BPE merges)."""
    from transformers import CLIPTokenizer

    chars = sorted({c for w in WORDS for c in w})
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for w in WORDS:  # merge left to right: "c a" -> "ca", "ca t</w>" -> "cat</w>"
        parts = [*w[:-1], w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    merges = [tuple(m.split(" ")) for m in dict.fromkeys(merges)]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tok.save_pretrained(folder)
    return folder


def t5_tokenizer(folder: Path) -> Path:
    """A T5TokenizerFast over a Unigram model of the words (pad 0, eos 1, unk 2, as T5)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in sorted({c for w in WORDS for c in w})] + [("▁", -3.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0, model_max_length=512
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder
