"""Flux checkpoints: BFL single-file map checked against diffusers' own converter, round trips."""

import dataclasses

import numpy as np
import torch
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from flax import traverse_util
from helpers import save_component
from torch_flux import TINY, make_flux

from d4k_jax.io import load_component
from d4k_jax.io.components import _flux_inputs
from d4k_jax.io.safetensors_io import save_file
from d4k_jax.models import flux_keys as flux_map
from d4k_jax.models.flux import Flux, FluxConfig
from d4k_jax.models.keymap import param_shapes, to_flax, to_torch

FLUX_DEV = FluxConfig()  # FLUX.1-dev: 19 + 38 blocks, 24 heads x 128, guidance embedding


def _narrow(shapes, seed=0):
    """Random params whose kernels have one input row: the maps split / swap output rows and transpose, so
    this checks every row of every tensor at the real sizes in a few MB. The single blocks' proj_out parts
    are split off their torch kernel's inputs: those keep their inputs and get one output instead."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, shape in shapes.items():
        if path[-1] == "kernel" and path[-2] in flux_map.SINGLE_PROJ_OUT:
            shape = (*shape[:-1], 1)
        elif path[-1] == "kernel":
            shape = (*shape[:-2], 1, shape[-1])
        out[path] = rng.normal(size=shape).astype(np.float32)
    return out


def test_bfl_map_equals_diffusers_single_file_converter():
    shapes = param_shapes(Flux(FLUX_DEV), _flux_inputs(FLUX_DEV))
    assert sum(int(np.prod(s)) for s in shapes.values()) == 11_901_408_320
    params = _narrow(shapes)
    bfl = to_torch(params, flux_map.bfl_rules(FLUX_DEV, shapes))
    assert {
        "double_blocks.18.img_attn.qkv.weight",
        "single_blocks.37.linear1.weight",
        "guidance_in.in_layer.bias",
    } <= set(bfl)
    checkpoint = {f"model.diffusion_model.{k}": torch.from_numpy(v) for k, v in bfl.items()}
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint, f"keys diffusers' converter did not consume: {sorted(checkpoint)[:5]}"
    narrow_shapes = {p: a.shape for p, a in params.items()}
    source = {k: v.numpy() for k, v in converted.items()}
    back = to_flax(source, flux_map.rules(FLUX_DEV, shapes), narrow_shapes)
    for path, value in params.items():
        np.testing.assert_array_equal(back[path], value, err_msg="/".join(path))


def test_single_file_loads_like_the_diffusers_folder(tmp_path):
    model = make_flux(seed=3)
    _, want = load_component(save_component(model, tmp_path / "diffusers"))
    cfg = FluxConfig(**{k: v for k, v in TINY.items() if k != "patch_size"})
    flat = {p: np.asarray(a) for p, a in traverse_util.flatten_dict(want).items()}
    bfl = to_torch(flat, flux_map.bfl_rules(cfg, {p: a.shape for p, a in flat.items()}))
    save_file({f"model.diffusion_model.{k}": v for k, v in bfl.items()}, tmp_path / "flux1-tiny.safetensors")
    module, got = load_component(tmp_path / "flux1-tiny.safetensors", axes_dims_rope=[4, 6, 6])
    assert module.config == dataclasses.replace(cfg, out_channels=16)  # read off final_layer's shape
    for path, value in traverse_util.flatten_dict(got).items():
        np.testing.assert_array_equal(value, flat[path], err_msg="/".join(path))
