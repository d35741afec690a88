"""FP8 sampling (nn.fp8, the models' `fp8` option): the matmul against a NumPy/ml_dtypes reference of the same
quantisation, what its per-token scales buy, which of the models' matmuls it takes, and what it does to the images
of the committed demo pipeline (a trained tiny Flux) from the same noise."""

import argparse
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import rel_err
from tiny_configs import tiny_flux, tiny_sd35

from d4k_jax import sharding
from d4k_jax.data import demo
from d4k_jax.models.flux import Flux
from d4k_jax.models.mmdit import MMDiT
from d4k_jax.nn import fp8
from tools import bench_gpu, fp8_psnr

DEMO = Path(demo.__file__).parent / "demo_pipeline"
# dB between the demo pipeline's fp32 images and its FP8 ones from the same noise; 45.2 measured (jax 0.10.2, CPU)
MIN_DEMO_PSNR = 40.0


def _e4m3(a: np.ndarray) -> np.ndarray:
    return np.clip(a, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def _reference(x: np.ndarray, w: np.ndarray, sx=None) -> np.ndarray:
    """E4M3 quantisation by ml_dtypes (round to nearest even) with per-token scales (or the given `sx`) and
    per-column ones, and an exact float64 product."""
    scale = lambda amax: np.maximum(amax / np.float32(448), np.finfo(np.float32).tiny)
    sx = scale(np.abs(x).max(-1, keepdims=True)) if sx is None else sx
    sw = scale(np.abs(w).max(0, keepdims=True))
    return (_e4m3(x / sx) @ _e4m3(w / sw)) * np.float64(sx) * sw.astype(np.float64)


def test_matmul_equals_the_rowwise_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 64)).astype(np.float32)
    x[0, 3] *= 1e5  # one outlier token, 2^17 above the others; x[1, 5] all zero
    x[1, 5] = 0.0
    w = (rng.normal(size=(64, 48)) * np.linspace(0.01, 3.0, 48)).astype(np.float32)  # columns of unlike scale
    got = np.asarray(jax.jit(fp8.matmul)(jnp.asarray(x), jnp.asarray(w)))
    assert rel_err(got, _reference(x, w)) < 1e-6
    assert not got[1, 5].any() and np.isfinite(got).all()
    # a kernel with several output axes ([D, heads, C]: the fused q/k/v) is the same product, reshaped
    got3 = jax.jit(fp8.matmul)(jnp.asarray(x), jnp.asarray(w.reshape(64, 4, 12)))
    np.testing.assert_array_equal(np.asarray(got3).reshape(got.shape), got)
    # each token's error against the exact product is E4M3's (3 mantissa bits: a few %); with one scale for the
    # whole tensor, the outlier would push every other token below E4M3's normal range (a ratio of about 2^15)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    error = lambda y: np.linalg.norm(y - exact, axis=-1) / np.maximum(np.linalg.norm(exact, axis=-1), 1e-30)
    assert error(got).max() < 0.06, error(got)
    per_tensor = error(_reference(x, w, sx=np.float32(np.abs(x).max() / 448)))
    assert np.median(per_tensor) > 0.25, per_tensor


def test_bf16_inputs_give_bf16_outputs_and_a_gradient_is_refused():
    x, w = jnp.ones((1, 4, 32), jnp.bfloat16), jnp.ones((32, 16), jnp.bfloat16)
    y = jax.jit(fp8.matmul)(x, w)
    assert y.dtype == jnp.bfloat16 and float(y[0, 0, 0]) == 32.0
    lowered = jax.jit(fp8.matmul).lower(x, w).as_text()
    assert re.search(r"dot_general.*tensor<1x4x32xf8E4M3FN>, tensor<32x16xf8E4M3FN>\) -> tensor<1x4x16xbf16>", lowered)
    with pytest.raises(TypeError, match="for sampling"):
        jax.grad(lambda x: fp8.matmul(x, w).astype(jnp.float32).sum())(x)


def _model(kind: str, **overrides) -> tuple[nn.Module, tuple]:
    rng = np.random.default_rng(3)
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    if kind == "flux":
        module = Flux(tiny_flux(heads=4, **overrides))
        return module, (f32(2, 4, 4, 4), jnp.full((2,), 0.5), f32(2, 5, 24), f32(2, 12), jnp.full((2,), 3.5))
    module = MMDiT(tiny_sd35(heads=4, **overrides))
    return module, (f32(2, 4, 4, 4), jnp.full((2,), 500.0), f32(2, 5, 20), f32(2, 12))


def _random_params(module: nn.Module, args: tuple) -> tuple[dict, dict]:
    """(random params of the module's tree, its abstract boxed variables): no eager init (one compile per op)."""
    abstract = jax.eval_shape(module.init, jax.random.key(0), *args)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), nn.unbox(abstract)["params"])
    return params, abstract


# the token-wise projections of the blocks, once per stream through them: Flux's double block 12 (q/k/v, out and
# MLP of each stream), its single block 6 (q/k/v, proj_mlp, proj_out's two parts) for the image and again for the
# text; SD3.5's dual block 16 (+ the second attention's q/k/v/out), its last block 9 (no text output or MLP)
F8_DOTS = {"flux": 12 + 2 * 6, "sd3": 16 + 9}


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_models_take_exactly_the_blocks_token_matmuls_in_fp8(kind):
    plain, args = _model(kind)
    params, _ = _random_params(plain, args)
    apply = lambda module: jax.jit(lambda p, *a: module.apply({"params": p}, *a))
    quantised, fused = _model(kind, fp8=True)[0], _model(kind, fp8=True, fused_qkv=True)[0]
    text = apply(quantised).lower(params, *args).as_text()
    # one dot per projection in each scanned block body (SD3's last block is its own), no embedder, no modulation
    f8_dots = [line for line in text.splitlines() if "dot_general" in line and "f8E4M3FN" in line]
    assert len(f8_dots) == F8_DOTS[kind], f8_dots
    want = np.asarray(apply(plain)(params, *args))
    got = np.asarray(apply(quantised)(params, *args))
    assert 1e-4 < rel_err(got, want) < 0.1, rel_err(got, want)
    # fusing q/k/v keeps each column's scale and each token's: the same FP8 product
    assert rel_err(np.asarray(apply(fused)(params, *args)), got) < 1e-5


def test_fp8_under_fsdp_and_tensor_sharding_equals_one_device():
    """The per-channel weight scales are maxima over the fsdp-split input axis, the per-token ones over features a
    tensor split leaves whole: GSPMD's reductions give the one-device result."""
    module, args = _model("flux", fp8=True)
    params, abstract = _random_params(module, args)
    want = jax.jit(module.apply)({"params": params}, *args)
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
    placed = jax.device_put(params, sharding.params_sharding(mesh, sharding.DEFAULT_RULES, abstract)["params"])
    with sharding.active(mesh):
        got = jax.jit(module.apply)({"params": placed}, *args)
    assert rel_err(np.asarray(got), np.asarray(want)) < 1e-5


def test_demo_pipeline_images_in_fp8():
    """The trained tiny Flux: FP8 against fp32 from the same noise, loaded as the sample CLI's `--config.fp8` loads
    it, through tools/fp8_psnr's functions (its bf16 figures: BENCHMARKS.md)."""
    images = {on: fp8_psnr.sample(str(DEMO), "flux", "float32", on, 64, 4, 4, 16) for on in (False, True)}
    psnr = fp8_psnr.psnr(images[True], images[False])
    print(f"demo pipeline, FP8 vs fp32 images: PSNR {psnr:.2f} dB")
    assert MIN_DEMO_PSNR < psnr < 80, psnr  # different (FP8 ran), and close


@pytest.mark.parametrize(("model", "f8_dots"), [("flux", 12 + 2 * 6), ("sd3", 12 + 9)])
def test_the_device_scripts_fp8_sampling_lowers_at_full_size(model, f8_dots):
    """tools/bench_gpu's sampling program (device_check.sh parts sample_*_fp8) for FLUX.1-dev and SD3-medium at 4096²,
    lowered from shapes alone: it runs on the pipelines' current signature, FP8 in exactly the blocks' projections
    (SD3-medium: 12 in the 23 scanned blocks, 9 in its last)."""
    options = argparse.Namespace(model=model, model_opt=["fp8=true"], layers=0)
    module, pooled_dim, text_len = bench_gpu._model(options, jnp.bfloat16, jnp.bfloat16, "none")
    vae, vae_params = bench_gpu._vae(model, jnp.bfloat16, abstract=True)
    batch = 1 if model == "flux" else 2  # SD3: CFG's two halves
    shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
    latents, text, pooled = shape(1, 256, 256, 16), shape(batch, text_len, 4096), shape(batch, pooled_dim)
    guidance = shape(1, dtype=jnp.float32) if model == "flux" else shape(dtype=jnp.float32)
    small = (jnp.zeros((1, 4, 4, 16), jnp.bfloat16), jnp.zeros((1,)), jnp.zeros((1, 8, 4096), jnp.bfloat16))
    small += (jnp.zeros((1, pooled_dim), jnp.bfloat16),) + ((jnp.ones((1,)),) if model == "flux" else ())
    params = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), *small))["params"])
    steps = (shape(5, dtype=jnp.float32), shape(4, dtype=jnp.float32))
    program = bench_gpu.sampling_program(model, module, vae)
    text = program.lower(params, vae_params, latents, text, pooled, guidance, *steps).as_text()
    assert sum("dot_general" in line and "f8E4M3FN" in line for line in text.splitlines()) == f8_dots
