"""One training step: loss and gradients equal a PyTorch reference (diffusers model + the reference WLF
loss written here, autograd), for Flux and SD3; sharded step equals the single-device step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import MODEL_TOL, rel_err
from flax import traverse_util
from helpers import save_component
from pytorch_wavelets import DWTForward
from torch_flux import make_flux
from torch_sd3 import make_sd3

from d4k_jax import train_step as ts
from d4k_jax.io import load_component
from d4k_jax.io.components import kind_of_module
from d4k_jax.models.keymap import to_torch


def _reference_loss(velocity, x0, eps, sigma):
    """REFERENCE.md §2 in torch (NCHW)."""
    s = sigma[:, None, None, None]
    x0_hat = (1 - s) * x0 + s * eps - s * velocity
    dwt = DWTForward(J=1, mode="zero", wave="haar").to(x0.dtype)

    def bands(x):
        low, high = dwt(x)
        return torch.cat([low, high[0].flatten(1, 2)], dim=1)

    return ((bands(x0_hat) - bands(x0)) ** 2).mean(dim=(1, 2, 3)).mean()


def _torch_loss(model_kind, model, x0, eps, sigma, text, pooled):
    from diffusers import FluxPipeline

    dtype = next(model.parameters()).dtype  # the test runs the reference in float64
    t = lambda a: torch.from_numpy(np.asarray(a)).to(dtype)
    x0_t, eps_t, s = t(x0.transpose(0, 3, 1, 2)), t(eps.transpose(0, 3, 1, 2)), t(sigma)
    x_t = (1 - s[:, None, None, None]) * x0_t + s[:, None, None, None] * eps_t
    b, c, h, w = x_t.shape
    if model_kind == "flux":
        out = model(
            hidden_states=FluxPipeline._pack_latents(x_t, b, c, h, w),
            timestep=s,
            guidance=torch.full((b,), 3.5, dtype=dtype),
            pooled_projections=t(pooled),
            encoder_hidden_states=t(text),
            txt_ids=torch.zeros(text.shape[1], 3, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", dtype),
            return_dict=False,
        )[0]
        v = FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)
    else:
        v = model(
            hidden_states=x_t,
            timestep=s * 1000,
            encoder_hidden_states=t(text),
            pooled_projections=t(pooled),
            return_dict=False,
        )[0]
    return _reference_loss(v, x0_t, eps_t, s)


def _float64_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                                max_period=10000):  # fmt: skip
    """diffusers' get_timestep_embedding in float64 (diffusers computes it in float32 even in a float64 model)."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
    emb = scale * timesteps[:, None].double() * torch.exp(exponent)[None]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_loss_and_gradients_equal_torch(tmp_path, kind, monkeypatch):
    """Both sides in float64: ours under jax.enable_x64 with float64 parameters, the reference a float64 diffusers
    model whose sinusoidal timestep / guidance embedding is float64 too. In float32 the comparison measured
    rounding, not the implementation: at t·1000 = 3500 one ulp of a float32 frequency moves sin() by 2e-4, and
    torch's float32 exp rounds 2 of the 128 frequencies differently from ours on an AVX-512 CPU (which ones
    depends on the CPU), so the guidance embedder's gradient error moved between 2.6e-5 and 1.0e-4 from machine
    to machine. What is left here are float32 islands both implementations keep (RoPE, the reference's float32
    Haar taps): about 2e-7."""
    import diffusers.models.embeddings

    monkeypatch.setattr(diffusers.models.embeddings, "get_timestep_embedding", _float64_timestep_embedding)
    model = (make_flux(seed=3) if kind == "flux" else make_sd3(seed=3)).double()
    folder = save_component(model, tmp_path / kind)
    rng = np.random.default_rng(0)
    b = 2
    x0 = rng.normal(size=(b, 8, 8, 4))
    eps = rng.normal(size=x0.shape)
    sigma = np.array([0.3, 0.9])
    text = rng.normal(size=(b, 7, 24 if kind == "flux" else 20))
    pooled = rng.normal(size=(b, 12))

    ref_loss = _torch_loss(kind, model, x0, eps, sigma, text, pooled)
    ref_loss.backward()
    ref_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}

    cfg = ts.LossConfig(model=kind)
    with jax.enable_x64(True):
        module, params = load_component(folder, dtype=jnp.float64, param_dtype=jnp.float64)
        batch = {"x0": jnp.asarray(x0), "text": jnp.asarray(text), "pooled": jnp.asarray(pooled)}
        loss_fn = lambda p: ts.loss_from_noise(module, p, batch, jnp.asarray(eps), jnp.asarray(sigma), cfg)
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)  # one compile, not one per op
        flat = {p: np.asarray(g) for p, g in traverse_util.flatten_dict(grads).items()}
    assert loss.dtype == jnp.float64 and all(g.dtype == np.float64 for g in flat.values())
    assert rel_err(loss, ref_loss.item()) < MODEL_TOL
    shapes = {p: g.shape for p, g in flat.items()}
    ours = to_torch(flat, kind_of_module(module).rules(module.config, shapes))
    ours.pop("pos_embed.pos_embed", None)  # a buffer in diffusers: no gradient there
    assert set(ours) == set(ref_grads)
    errs = sorted(((rel_err(ours[k], ref_grads[k]), k) for k in ours), reverse=True)
    assert errs[0][0] < MODEL_TOL, errs[:3]  # measured: 1.9e-7 (Flux, a qk-norm weight), 6.8e-8 (SD3)


def test_the_frozen_position_table_is_not_differentiated(tmp_path):
    """SD3's sincos table (a buffer in diffusers): no gradient of it, the logged grad_norm is the norm of
    the trainable gradients (the one the optimizer clips), and it leaves every step bit-identical."""
    import flax.linen as nn
    from jax.sharding import PartitionSpec

    module, params = load_component(save_component(make_sd3(seed=2), tmp_path / "sd3"))
    table = params["pos_embed"]["pos_embed"]
    boxed = jax.eval_shape(module.init, jax.random.key(0), *kind_of_module(module).init_inputs(module.config))
    assert nn.get_partition_spec(boxed)["params"]["pos_embed"]["pos_embed"] == PartitionSpec(None, None, "embed")

    cfg = ts.LossConfig(model="sd3")
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    batch = {"x0": x0, "text": jnp.ones((2, 5, 20)), "pooled": jnp.ones((2, 12))}
    inputs = {**batch, "noise": jnp.ones_like(x0), "sigma": jnp.array([0.3, 0.7])}
    trainable, frozen = ts.partition(params, ts.trainable_mask(params))
    _, grads = jax.jit(lambda t, f, i: ts.loss_and_grads(module, t, f, i, cfg))(trainable, frozen, inputs)
    assert grads["pos_embed"]["pos_embed"] is None and grads["pos_embed"]["proj"]["kernel"] is not None

    # an unmasked SGD (lr 1) exposes the gradients as the update, and would move the table if it had one
    tx = optax.sgd(1.0)
    step = jax.jit(lambda s, b, k: ts.train_step(s, b, k, model=module, tx=tx, cfg=cfg))
    state = ts.TrainState(jnp.int32(0), params, tx.init(params))
    mask = ts.trainable_mask(params)
    moved = jax.jit(lambda a, b: optax.global_norm(ts.partition(jax.tree.map(jnp.subtract, a, b), mask)[0]))
    for i in range(2):
        new, metrics = step(state, batch, jax.random.key(i))
        np.testing.assert_array_equal(new.params["pos_embed"]["pos_embed"], table)
        assert rel_err(metrics["grad_norm"], moved(state.params, new.params)) < 1e-5
        state = new
    assert bool(jnp.any(state.params["proj_out"]["kernel"] != params["proj_out"]["kernel"]))


def test_sharded_step_equals_single_device(tmp_path):
    """A step moves every parameter and is deterministic; data x fsdp over 8 fake devices gives the same loss and
    parameters after it as one device."""
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec

    from d4k_jax import sharding

    module, params = load_component(save_component(make_flux(seed=5), tmp_path / "flux"))
    # plain SGD (lr 1): the new params expose the gradients; Adam's first step, lr * g / (|g| + eps), would
    # turn reduction-order differences in near-zero gradients into differences of up to lr
    tx = optax.sgd(1.0)
    rng = np.random.default_rng(0)
    batch = {
        "x0": rng.normal(size=(8, 8, 8, 4)),
        "text": rng.normal(size=(8, 5, 24)),
        "pooled": rng.normal(size=(8, 12)),
    }
    batch = {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}
    step = lambda s, b, k: ts.train_step(s, b, k, model=module, tx=tx, cfg=ts.LossConfig())
    state = ts.TrainState(jnp.int32(0), params, tx.init(params))
    want, want_metrics = jax.jit(step)(state, batch, jax.random.key(0))
    again, _ = jax.jit(step)(state, batch, jax.random.key(0))  # deterministic: the same key, the same step
    jax.tree.map(np.testing.assert_array_equal, again.params, want.params)
    assert int(want.step) == 1 and float(want_metrics["grad_norm"]) > 0
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != y)), want.params, params)))

    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    abstract = jax.eval_shape(
        module.init, jax.random.key(0), batch["x0"], jnp.zeros(8), batch["text"], batch["pooled"], jnp.zeros(8)
    )
    p_shard = sharding.params_sharding(mesh, sharding.DEFAULT_RULES, abstract)["params"]
    sharded_state = ts.TrainState(state.step, jax.device_put(params, p_shard), tx.init(jax.device_put(params, p_shard)))
    data = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        got, got_metrics = jax.jit(step, donate_argnums=0)(
            sharded_state, jax.device_put(batch, data), jax.random.key(0)
        )
    assert got.params["x_embedder"]["kernel"].sharding.spec != PartitionSpec()  # really FSDP-sharded
    assert rel_err(got_metrics["loss"], want_metrics["loss"]) < 1e-5
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
        assert rel_err(a, b) < 1e-5


def _tiny_vae():
    from d4k_jax.models.vae import AutoencoderKL, VAEConfig

    vae = AutoencoderKL(VAEConfig(latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4, stride=2))
    params = jax.jit(vae.init)(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))["params"]
    return vae, params


def test_encode_images_is_a_normalised_posterior_sample_whatever_the_passes():
    from d4k_jax.models.vae import normalize_latents

    vae, params = _tiny_vae()
    images = jax.random.uniform(jax.random.key(2), (4, 16, 16, 3), minval=-1, maxval=1)
    key = jax.random.key(3)
    encode = jax.jit(
        lambda x, passes=1, use_shift=True: ts.encode_images(vae, params, x, key, passes=passes, use_shift=use_shift),
        static_argnums=(1, 2),
    )
    one, two = encode(images), encode(images, 2)
    assert one.shape == (4, 4, 4, 4)
    assert rel_err(two, one) < 1e-6
    mean, logvar = jax.jit(lambda x: vae.apply({"params": params}, x, method="encode"))(images)
    eps = jax.random.normal(key, one.shape)
    want = normalize_latents(mean + jnp.exp(0.5 * logvar) * eps, vae.config)
    assert rel_err(one, want) < 1e-6
    quirk = encode(images, 1, False)  # SD3 script: z * scale
    np.testing.assert_allclose(quirk - one, vae.config.shift_factor * vae.config.scaling_factor, atol=1e-5)


def test_uint8_images_are_normalised_on_the_device_as_on_the_host():
    """The loader ships uint8; the step's x / 127.5 - 1 equals numpy's float32 one for every value (bit for
    bit), so encoding uint8 pixels is encoding the host-normalised floats, in one pass or several (up to the
    fusion of the two programs)."""
    pixels = np.arange(256, dtype=np.uint8)
    host = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1)
    np.testing.assert_array_equal(np.asarray(jax.jit(ts.to_unit_range)(pixels)), host)
    vae, params = _tiny_vae()
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    floats = images.astype(np.float32) / np.float32(127.5) - np.float32(1)
    key = jax.random.key(3)
    for passes in (1, 2):
        encode = jax.jit(lambda x, p=passes: ts.encode_images(vae, params, x, key, passes=p))
        assert rel_err(encode(images), encode(floats)) < 1e-6


def test_image_batches_and_microbatches_give_the_one_pass_step(tmp_path):
    """Images encoded inside the step, gradients accumulated over 2 microbatches: the same update."""
    module, params = load_component(save_component(make_flux(seed=4), tmp_path / "flux"))
    vae, vae_params = _tiny_vae()
    tx = optax.sgd(1.0)  # the new params expose the gradients
    rng = np.random.default_rng(1)
    batch = {
        "image": jnp.asarray(rng.uniform(-1, 1, size=(4, 32, 32, 3)), jnp.float32),
        "text": jnp.asarray(rng.normal(size=(4, 5, 24)), jnp.float32),
        "pooled": jnp.asarray(rng.normal(size=(4, 12)), jnp.float32),
    }
    state = ts.TrainState(jnp.int32(0), params, tx.init(params))

    def step(micro):
        fn = lambda s, b, k, v: ts.train_step(s, b, k, v, model=module, tx=tx, cfg=ts.LossConfig(), vae=vae, **micro)
        return jax.jit(fn)(state, batch, jax.random.key(0), vae_params)

    want, want_metrics = step({})
    got, got_metrics = step({"microbatches": 2, "encode_passes": 2})
    assert rel_err(got_metrics["loss"], want_metrics["loss"]) < 1e-6
    assert rel_err(got_metrics["grad_norm"], want_metrics["grad_norm"]) < 1e-5
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
        assert rel_err(a, b) < 1e-5
    with pytest.raises(ValueError, match="microbatches"):
        step({"microbatches": 3})
