"""The tiny tokenizers of tools/tiny_tokenizers.py over the test vocabulary (words the test prompts use)."""

from __future__ import annotations

import functools

from tools import tiny_tokenizers

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

clip_tokenizer = functools.partial(tiny_tokenizers.clip_tokenizer, words=WORDS)
t5_tokenizer = functools.partial(tiny_tokenizers.t5_tokenizer, words=WORDS)
