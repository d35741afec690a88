"""Tokenizers from a pipeline's tokenizer folders, padded and truncated as diffusers' pipelines do.

CLIP: padding to `model_max_length` (77), truncation; T5: padding to `max_sequence_length` (Flux: 512
at inference, 77 in the Diffusion-4K training scripts). Prompts longer than that are truncated with a
warning naming the removed text, as diffusers does. Nothing is downloaded: the folder must hold the
tokenizer files.

CLIP and T5 folders load through their transformers class, imported directly: `AutoTokenizer` would
get the same class, but importing it imports torch where torch is installed (~4 s in every command that
builds a pipeline). Any other tokenizer_class goes through `AutoTokenizer`.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import logging

# tokenizer_config.json's tokenizer_class -> the module and class AutoTokenizer resolves it to (transformers 5
# drops the "Fast" suffix: its one class per model is backed by the tokenizers library)
_CLASSES = {
    "CLIPTokenizer": ("transformers.models.clip.tokenization_clip", "CLIPTokenizer"),
    "T5Tokenizer": ("transformers.models.t5.tokenization_t5", "T5Tokenizer"),
}


def tokenizer_class(folder: str | os.PathLike) -> type:
    """The transformers class that loads `folder`: CLIP's or T5's without importing torch, else AutoTokenizer."""
    config_file = Path(folder) / "tokenizer_config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}); expected the tokenizer's settings") from e
    name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    if name in _CLASSES and "auto_map" not in config:  # auto_map: the folder's own code, which AutoTokenizer runs
        module, attr = _CLASSES[name]
        return getattr(importlib.import_module(module), attr)
    from transformers import AutoTokenizer  # tokenizers only; transformers 5 has no Flax models

    return AutoTokenizer


class Tokenizer:
    def __init__(self, folder: str | os.PathLike, max_length: int | None = None):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
        self.tokenizer = tokenizer_class(folder).from_pretrained(os.fspath(folder), local_files_only=True)
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
