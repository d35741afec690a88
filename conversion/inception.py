"""d4k_jax's FID Inception variables -> a safetensors file with torch-fidelity's key names."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import traverse_util

from d4k_jax.io.safetensors_io import save_file
from d4k_jax.models.inception_keys import checkpoint_rules
from d4k_jax.models.keymap import to_torch


def export(variables: Mapping, dst: str | os.PathLike) -> Path:
    """Write `variables` as a safetensors file with torch-fidelity's key names (which
    `d4k_jax.io.metric_nets.load_inception` and torch's `load_state_dict` both read)."""
    flat = {p: np.asarray(a, np.float32) for p, a in traverse_util.flatten_dict(dict(variables)).items()}
    tensors = to_torch(flat, checkpoint_rules({p: a.shape for p, a in flat.items()}))
    save_file(tensors, Path(dst), metadata={"format": "pt"})
    return Path(dst)
