"""RoPE tables built in the program (nn.rope): diffusers' FluxPosEmbed values at FLUX 4096² positions, and no
table-sized constant left in the compiled Flux program."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from tiny_configs import tiny_flux

from d4k_jax.models.flux import Flux, position_ids
from d4k_jax.nn.rope import rope_tables

BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "pred": 1, "s8": 1, "u8": 1}


def test_tables_equal_diffusers_at_4096():
    """FLUX.1 at 4096² with the F16 VAE: 128 x 128 packed latents (rows and columns up to 127, where a float32
    angle would be 4e-6 rad off), 512 text tokens, axes (16, 56, 56)."""
    h = w = 256  # latent side
    ids = torch.cat(
        [torch.zeros(512, 3), FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)]
    )
    np.testing.assert_array_equal(np.asarray(position_ids(h, w, 512)), ids.numpy())
    want = FluxPosEmbed(10000, [16, 56, 56])(ids)
    got = jax.jit(lambda: rope_tables(position_ids(h, w, 512), (16, 56, 56), 10000.0, (1, h // 2, w // 2)))()
    for g, t in zip(got, want, strict=True):
        assert g.dtype == jnp.float32 and g.shape == (512 + 128 * 128, 128)
        np.testing.assert_array_equal(np.asarray(g), t.numpy())


def test_bad_ids_are_named():
    with pytest.raises(ValueError, match=r"ids \(4, 2\) must be \[L, 3\]"):
        rope_tables(jnp.zeros((4, 2), jnp.int32), (2, 2, 4), 10000.0, (1, 2, 2))


def _constant_bytes(hlo: str) -> list[int]:
    found = re.findall(r"= (\w+)\[([\d,]*)\]\S* constant\(", hlo)
    return [BYTES[dtype] * int(np.prod([int(n) for n in shape.split(",") if n])) for dtype, shape in found]


def test_the_flux_program_holds_no_table_sized_constant():
    """The tables [T + L, K] x 2 were constants of the program (17 MB for FLUX.1 at 4096²); now only the
    per-axis tables are, and XLA does not fold the lookups back into one."""
    cfg = tiny_flux(heads=2)
    module, (h, w, t) = Flux(cfg), (64, 64, 8)
    args = (jnp.zeros((1, h, w, 4)), jnp.zeros(1), jnp.zeros((1, t, 24)), jnp.zeros((1, 12)), jnp.zeros(1))
    variables = jax.eval_shape(module.init, jax.random.key(0), *args)
    tables = 2 * (t + h * w // 4) * cfg.attention_head_dim * 4  # 66 KB
    consts = jax.make_jaxpr(module.apply)(variables, *args).consts
    assert sum(np.asarray(c).nbytes for c in consts) < tables / 10, [np.shape(c) for c in consts]
    constants = _constant_bytes(jax.jit(module.apply).lower(variables, *args).compile().as_text())
    assert constants and sum(constants) < tables / 10, sorted(constants)[-3:]
