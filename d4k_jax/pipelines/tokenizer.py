"""Tokenizers from a pipeline's tokenizer folders, padded and truncated as diffusers' pipelines do.

CLIP: padding to `model_max_length` (77), truncation; T5: padding to `max_sequence_length` (Flux: 512
at inference, 77 in the Diffusion-4K training scripts). Prompts longer than that are truncated with a
warning naming the removed text, as diffusers does. Nothing is downloaded: the folder must hold the
tokenizer files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import logging


class Tokenizer:
    def __init__(self, folder: str | os.PathLike, max_length: int | None = None):
        from transformers import AutoTokenizer  # tokenizers only; transformers 5 has no Flax models

        if not Path(folder).is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
        self.tokenizer = AutoTokenizer.from_pretrained(os.fspath(folder), local_files_only=True)
        self.max_length = max_length or self.tokenizer.model_max_length
        if self.max_length > 100_000:  # transformers' "no limit" sentinel
            raise ValueError(f"{folder}: the tokenizer sets no model_max_length; pass max_length")

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """input_ids [B, max_length] int32 (max_length defaults to the tokenizer's)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts to tokenize")
        tok, length = self.tokenizer, max_length or self.max_length
        ids = tok(prompts, padding="max_length", max_length=length, truncation=True).input_ids
        for prompt, full in zip(prompts, tok(prompts).input_ids, strict=True):
            if len(full) > length:
                removed = tok.decode(full[length - 1 : -1])
                logging.warning("prompt truncated to %d tokens; removed: %r (prompt: %r)", length, removed, prompt[:80])
        return np.asarray(ids, np.int32)
