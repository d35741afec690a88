"""`d4k_jax.io`'s loader for the offline tools: the same, plus component folders of torch-pickled weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import flax.linen as nn

from conversion import pickled
from d4k_jax.io import load


def load_with_config(path: str | os.PathLike, **kwargs: Any) -> tuple[dict[str, Any], nn.Module, dict]:
    """`d4k_jax.io.load.load_with_config`; a folder holding only a .bin/.pt/.pth state dict is read too."""
    weights = pickled.folder_weights(Path(path))
    return load.load_with_config(path, weights=weights, **kwargs)


def load_component(path: str | os.PathLike, **kwargs: Any) -> tuple[nn.Module, dict]:
    """`d4k_jax.io.load_component` (same arguments) that also reads torch-pickled component folders."""
    _, module, params = load_with_config(path, **kwargs)
    return module, params
