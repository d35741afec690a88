"""Small conversions between torch NCHW and our NHWC, and saving torch models as component folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy().transpose(0, 2, 3, 1)


def save_component(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def assert_maps_onto(torch_shapes: dict, rules, flax_shapes: dict) -> None:
    """Every torch tensor maps onto exactly one Flax parameter of the right shape, checked without
    building full-size arrays: one pass with each kernel's input dim cut to 1 and one with its output
    dim cut to 1 (biases and norms stay whole), under the strict accounting of `to_flax`. A weight split
    along its inputs (a rule with `windows`) keeps them whole: its output is cut in both passes."""
    from d4k_jax.models.keymap import to_flax

    windowed = [r for r in rules if (r.layers or (r,))[0].windows]
    keys = {k for r in windowed for k in r.src}
    paths = {p for r in windowed for p in r.dst}
    for keep in ("out", "in"):
        mine = lambda split, keep=keep: "in" if split else keep
        cut_torch = {
            k: _cut(s, mine(k in keys), torch_layout=True) if k.endswith(".weight") else s
            for k, s in torch_shapes.items()
        }
        cut_flax = {
            p: _cut(s, mine(p in paths), torch_layout=False) if p[-1] == "kernel" else s for p, s in flax_shapes.items()
        }
        source = {k: np.zeros(s, np.float32) for k, s in cut_torch.items()}
        out = to_flax(source, rules, cut_flax)
        assert {p: a.shape for p, a in out.items()} == cut_flax


def _cut(shape: tuple, keep: str, torch_layout: bool) -> tuple:
    if len(shape) < 2:
        return tuple(shape)
    # torch (out, in, ...) vs Flax kernels (..., in, out), with an optional leading layer axis on Flax
    out_axis, in_axis = (0, 1) if torch_layout else (len(shape) - 1, len(shape) - 2)
    shape = list(shape)
    shape[in_axis if keep == "out" else out_axis] = 1
    return tuple(shape)


def edited_copy(folder: Path, tmp_path: Path, edit) -> Path:
    """A copy of a single-file component folder whose state dict went through `edit(dict)`."""
    import shutil

    from d4k_jax.io.safetensors_io import TensorSource, save_file

    (weights,) = folder.glob("*.safetensors")
    state = dict(TensorSource([weights]))
    edit(state)
    out = tmp_path / "edited"
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    save_file(state, out / weights.name)
    return out


def assert_sharded_forward_matches(module, params, args, mesh_shape=None) -> None:
    """The forward with params sharded by their logical axes (FSDP x tensor over 8 fake devices) equals
    the single-device forward, and the weights really are split."""
    import flax.linen as nn
    import jax

    from d4k_jax import sharding

    want = jax.jit(module.apply)({"params": params}, *args)
    mesh = sharding.make_mesh(mesh_shape or {"fsdp": 4, "tensor": 2})
    abstract = jax.eval_shape(module.init, jax.random.key(0), *args)
    sharded_params = jax.device_put(params, sharding.params_sharding(mesh, sharding.DEFAULT_RULES, abstract)["params"])
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded_params))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        got = jax.jit(module.apply)({"params": sharded_params}, *args)
    err = float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max())
    assert err < 1e-5, err


def sequence_degrees(monkeypatch) -> list[int]:
    """The sequence-parallel degrees that tracing sees from now on (nn.ulysses.sequence_axis), to check that a
    run really split its attention."""
    from d4k_jax.nn import ulysses

    seen, axis = [], ulysses.sequence_axis
    monkeypatch.setattr(ulysses, "sequence_axis", lambda: seen.append(axis()[1]) or axis())
    return seen
