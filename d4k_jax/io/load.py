"""`load_component(path)`: a diffusers / transformers component folder, a converted one or a single file ->
(module, params). Reads safetensors and orbax only: torch-pickled weights (.bin/.pt/.pth) are refused with
the command that converts them (`python -m conversion.pickled`), since unpickling has no place in the library."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from d4k_jax import checkpoint
from d4k_jax.io import placement, single_file
from d4k_jax.io.components import kind_for, override_problem
from d4k_jax.io.placement import Placement
from d4k_jax.io.safetensors_io import TensorSource
from d4k_jax.models.keymap import ConversionError, Shapes, abstract_params, check, shapes_of, to_flax

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
    sharding: Placement | None = None,
    **overrides: Any,
) -> tuple[nn.Module, dict]:
    """Build the model a component folder describes and load its weights, strictly.

    `path` holds config.json and either safetensors weights (single, or sharded with an index) or the
    orbax `params/` written by `python -m conversion.convert`; or it is a single-file checkpoint (BFL
    `flux1-dev.safetensors`), whose model and config are read off its tensor names and shapes.
    `overrides` update the config (`stride=2` gives the F16 VAE). `dtype` is the compute dtype,
    `param_dtype` the storage dtype. `component` picks a model inside a single file that holds several
    (SAI SD3 files: "transformer", "text_encoder", "text_encoder_2", "text_encoder_3").

    `sharding` places each parameter on its shards as it is read, so that no device holds the whole model:
    `(mesh, rules)` shards every parameter by its logical axis names (`(mesh, sharding.DEFAULT_RULES)`: FSDP),
    or a pytree of `jax.sharding.Sharding` like the params, or one `Sharding` for all (see `io.placement`).
    Each process reads only the slices its own devices hold, so every process must make the same call. The
    checkpoint is checked against the model (keys, shapes) before any tensor is read. Without it the params
    are single-device arrays on the default device.
    """
    _, module, params = load_with_config(
        path, dtype=dtype, param_dtype=param_dtype, component=component, sharding=sharding, **overrides
    )
    return module, params


def load_with_config(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    component: str = "transformer",
    weights: Mapping[str, np.ndarray] | None = None,
    sharding: Placement | None = None,
    **overrides: Any,
) -> tuple[dict[str, Any], nn.Module, dict]:
    """`load_component` that also returns the config dict the model was built from. `weights` (name -> array)
    stand in for a component folder's own files (conversion.load_component passes torch-pickled ones)."""
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
    abstract = abstract_params(module, kind.init_inputs(model_cfg))
    shapes = shapes_of(abstract)
    where = placement.resolve(sharding, abstract) if sharding is not None else dict.fromkeys(shapes)
    if source is None and weights is None and (path / PARAMS_DIR).is_dir():
        check_stored_shapes(path / PARAMS_DIR, shapes)
        # orbax reads onto the shards; by default onto one device, whatever devices the params were saved from
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = {p: jax.ShapeDtypeStruct(s, param_dtype, sharding=where[p] or one) for p, s in shapes.items()}
        return cfg, module, checkpoint.restore_params(path / PARAMS_DIR, _nest(target))
    source = source if source is not None else (weights if weights is not None else open_weights(path))
    rules = rules_for(model_cfg, shapes) if rules_for else kind.checkpoint_rules(model_cfg, shapes, frozenset(source))
    if sharding is not None:
        check(source, rules, shapes, str(path))
        return cfg, module, _nest(placement.place(source, rules, shapes, where, param_dtype))
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
        pickles = pickled_files(folder)
        if pickles:
            raise FileNotFoundError(
                f"{folder}: no *.safetensors weights, only torch-pickled {[f.name for f in pickles]}, which d4k_jax "
                f"does not unpickle; convert the folder once with `python -m conversion.convert --src={folder} "
                "--dst=NEW_DIR` (conversion.load_component also reads them)"
            )
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    raise ValueError(f"{folder}: several safetensors files and no index: {[f.name for f in files]}")


PICKLED = (".bin", ".pt", ".pth")  # torch.save'd state dicts: read by conversion.pickled only


def pickled_files(folder: Path) -> list[Path]:
    """The torch-pickled weight files of a component folder (diffusers' and transformers' legacy format)."""
    return sorted(f for f in folder.iterdir() if f.suffix in PICKLED and f.is_file())


def read_state_dict(path: str | os.PathLike, what: str = "weights") -> Mapping[str, np.ndarray]:
    """One safetensors weights file, read lazily (`what` names it in errors). A torch .pth/.pt/.bin file is
    refused with the command that converts it to a safetensors file with the same keys."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return TensorSource([path])
    if path.suffix in PICKLED:
        raise ValueError(
            f"{path}: {what} as a torch pickle, which d4k_jax does not unpickle; convert it once with "
            f"`python -m conversion.pickled {path}` (writes {path.with_suffix('.safetensors')}, the same tensors) "
            "and pass that file"
        )
    raise ValueError(f"{path}: expected {what} as a .safetensors file (or a .pth/.pt/.bin to convert first)")


def _nest(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat)
