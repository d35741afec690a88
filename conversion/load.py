"""`load_component(path)`: a diffusers / transformers component folder or a converted one -> (module, params)."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from conversion import single_file
from conversion.components import Shapes, kind_for, override_problem, param_shapes
from conversion.rules import ConversionError, to_flax
from conversion.safetensors_io import TensorSource
from d4k_jax import checkpoint

PARAMS_DIR = "params"  # the orbax checkpoint inside a converted component folder


def load_config(path: str | os.PathLike, **overrides: Any) -> dict[str, Any]:
    """config.json of a component folder, updated with `overrides`."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a diffusers or transformers component folder)")
    cfg = json.loads(file.read_text())
    cfg.update(overrides)
    return cfg


def load_component(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    component: str = "transformer",
    **overrides: Any,
) -> tuple[nn.Module, dict]:
    """Build the model a component folder describes and load its weights, strictly.

    `path` holds config.json and either safetensors weights (single, or sharded with an index) or the
    orbax `params/` written by `python -m conversion.convert`; or it is a single-file checkpoint (BFL
    `flux1-dev.safetensors`), whose model and config are read off its tensor names and shapes.
    `overrides` update the config (`stride=2` gives the F16 VAE). `dtype` is the compute dtype,
    `param_dtype` the storage dtype. `component` picks a model inside a single file that holds several
    (SAI SD3 files: "transformer", "text_encoder", "text_encoder_2", "text_encoder_3").
    """
    _, module, params = load_with_config(path, dtype=dtype, param_dtype=param_dtype, component=component, **overrides)
    return module, params


def load_with_config(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    component: str = "transformer",
    **overrides: Any,
) -> tuple[dict[str, Any], nn.Module, dict]:
    """`load_component` that also returns the config dict the model was built from. `component` picks a
    model inside a single file holding several (SAI SD3: "text_encoder", "text_encoder_2", "text_encoder_3")."""
    path = Path(path)
    if path.is_file():
        cfg, rules_for, source = single_file.identify(TensorSource([path]), str(path), component)
        cfg.update(overrides)
    elif path.is_dir():
        cfg, rules_for, source = load_config(path, **overrides), None, None
    else:
        raise FileNotFoundError(f"{path}: no such component folder or checkpoint file")
    kind = kind_for(cfg, str(path))
    problem = override_problem(cfg, overrides, str(path))
    if problem:
        raise ValueError(problem)
    model_cfg = kind.config_from(cfg)
    module = kind.build(model_cfg, dtype=dtype, param_dtype=param_dtype)
    shapes = param_shapes(module, kind.init_inputs(model_cfg))
    if source is None and (path / PARAMS_DIR).is_dir():
        check_stored_shapes(path / PARAMS_DIR, shapes)
        target = {p: jax.ShapeDtypeStruct(s, param_dtype) for p, s in shapes.items()}
        return cfg, module, checkpoint.restore_params(path / PARAMS_DIR, _nest(target))
    source = source if source is not None else open_weights(path)
    rules = rules_for(model_cfg, shapes) if rules_for else kind.checkpoint_rules(model_cfg, shapes, frozenset(source))
    flat = to_flax(source, rules, shapes, what=str(path))
    return cfg, module, _nest({p: jnp.asarray(a, dtype=param_dtype) for p, a in flat.items()})


def check_stored_shapes(params_dir: Path, expected: Shapes) -> None:
    """The orbax checkpoint at `params_dir` holds exactly the parameters `expected` describes, or one
    ConversionError lists the missing, unexpected and mis-shaped ones (a `params/` written for another
    config.json), as for safetensors weights; orbax itself would fail on the first one, deep in a restore."""
    stored = checkpoint.stored_shapes(params_dir)
    name = "/".join
    missing = sorted(name(p) for p in expected.keys() - stored.keys())
    unexpected = sorted(name(p) for p in stored.keys() - expected.keys())
    misshaped = [
        f"{name(p)}: {stored[p]} -> {tuple(expected[p])}"
        for p in sorted(expected.keys() & stored.keys())
        if stored[p] != tuple(expected[p])
    ]
    if missing or unexpected or misshaped:
        raise ConversionError(f"{params_dir} (does config.json describe these params?)", missing, unexpected, misshaped)


def open_weights(folder: Path) -> TensorSource:
    """The weights of a component folder: `*.safetensors.index.json`, else its one `*.safetensors` file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = json.loads(indexes[0].read_text())
        files = sorted({folder / f for f in index["weight_map"].values()})
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{indexes[0]} names shards that do not exist: {absent}")
        source = TensorSource(files)
        listed = set(index["weight_map"])
        if listed != set(source):
            raise ValueError(
                f"{indexes[0]} and its shards disagree: only in the index {sorted(listed - set(source))[:10]}, "
                f"only in the shards {sorted(set(source) - listed)[:10]}"
            )
        return source
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return TensorSource(files)
    if not files:
        pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        if len(pickles) == 1:
            return _load_pickle(pickles[0])
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (and {len(pickles)} .bin/.pt files)")
    raise ValueError(f"{folder}: several safetensors files and no index: {[f.name for f in files]}")


def read_state_dict(path: str | os.PathLike, what: str = "weights") -> Mapping[str, np.ndarray]:
    """One weights file: .safetensors (no torch needed, read lazily) or a torch .pth/.pt/.bin state dict
    (torch.load with weights_only=True: no arbitrary unpickling). `what` names the file in errors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return TensorSource([path])
    if path.suffix in (".pth", ".pt", ".bin"):
        return _load_pickle(path)
    raise ValueError(f"{path}: expected {what} as a .safetensors or .pth/.pt/.bin file")


def _load_pickle(file: Path) -> dict[str, np.ndarray]:
    """A torch .bin/.pt state dict, read with weights_only=True (no arbitrary unpickling)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{file}: reading .bin/.pt weights needs torch; safetensors need nothing") from e
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # truncated, corrupt, unsafe
        raise ValueError(f"{file} is not a readable torch state dict ({type(e).__name__}: {e})") from None
    out = {}
    for k, t in state.items():
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            out[k] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = t.numpy()
    return out


def _nest(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat)
