"""Tiny CLIP and T5 tokenizers written locally (no hub): real tokenizer classes over a given word list.

Every word is one token in both (a whole-word BPE merge chain for CLIP, a Unigram piece for T5), so a
caption made of those words costs one token a word plus CLIP's start/end or T5's end token.
"""

from __future__ import annotations

import graphlib
import itertools
from collections.abc import Sequence
from pathlib import Path


def clip_tokenizer(folder: Path, model_max_length: int = 77, *, words: Sequence[str]) -> Path:
    """A CLIPTokenizer whose vocabulary is single characters plus whole words (byte-level BPE merges).

    Ids: <|startoftext|> 0, <|endoftext|> 1 (also pad and unk, as CLIP's)."""
    from transformers import CLIPTokenizer

    chars = sorted({c for w in words for c in w})
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for w in _merge_order(words):  # merge left to right: "c a" -> "ca", "ca t</w>" -> "cat</w>"
        parts = _symbols(w)
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = [tuple(m.split(" ")) for m in dict.fromkeys(merges)]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    split = {w: tok.tokenize(w) for w in words if tok.tokenize(w) != [w + "</w>"]}
    if split:
        raise ValueError(f"the tiny CLIP tokenizer splits words: {split}")
    tok.save_pretrained(folder)
    return folder


def _symbols(word: str) -> list[str]:
    return [*word[:-1], word[-1] + "</w>"]


def _merge_order(words: Sequence[str]) -> list[str]:
    """The words in an order whose merge chains all complete.

    BPE applies the earliest-ranked merge first, so a word whose chain ranks after another word's first merge
    ("r e" of "red") is split where that pair occurs inside it ("g" "re" ... in "green"): such words go first.
    """
    firsts = {w: tuple(_symbols(w)[:2]) for w in words if len(w) > 1}
    graph: dict[str, set[str]] = {w: set() for w in words}  # word -> the words whose chains rank before it
    for w in words:
        pairs = set(itertools.pairwise(_symbols(w)))
        for u, first in firsts.items():
            if u != w and first in pairs and first != firsts.get(w):
                graph[u].add(w)
    try:
        return list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise ValueError(f"no merge order tokenizes each of these words whole: {e.args[1]}") from e


def t5_tokenizer(folder: Path, model_max_length: int = 512, *, words: Sequence[str]) -> Path:
    """A T5TokenizerFast over a Unigram model of the words (pad 0, eos 1, unk 2, as T5)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words]
    pieces += [(c, -5.0) for c in sorted({c for w in words for c in w})] + [("▁", -3.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder
