"""Trained d4k_jax parameters -> a diffusers / transformers component folder (exact inverse of loading)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax import traverse_util

from d4k_jax.io.components import kind_for
from d4k_jax.io.safetensors_io import save_file
from d4k_jax.models.keymap import to_torch

STORAGE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def export_component(
    config: Mapping[str, Any], params: Mapping, dst: str | os.PathLike, *, dtype: str | None = None
) -> Path:
    """Write config.json and the safetensors weights for `params` into the folder `dst`.

    `dtype` ("float32", "bfloat16", "float16") casts the weights; None keeps each parameter's dtype.
    """
    kind = kind_for(config)
    flat = {p: np.asarray(a) for p, a in traverse_util.flatten_dict(dict(params)).items()}
    tensors = to_torch(flat, kind.rules(kind.config_from(config), {p: a.shape for p, a in flat.items()}))
    if dtype is not None:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"export dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        tensors = {k: v.astype(STORAGE_DTYPES[dtype]) for k, v in tensors.items()}
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dst / kind.weights_name, metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(kind.export_config(config), indent=2) + "\n")
    return dst
