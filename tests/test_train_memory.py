"""The full train step (images encoded by the frozen VAE inside it, AdamW, remat) lowers and compiles
FSDP-sharded from abstract shapes alone, with a memory analysis: what `tools.bench train_memory` does at
full size (figures in BENCHMARKS.md), here on a tiny Flux and VAE over the fake CPU devices."""

import jax
import jax.numpy as jnp

from d4k_jax import train_step as ts
from d4k_jax.models.flux import Flux, FluxConfig
from d4k_jax.models.vae import AutoencoderKL, VAEConfig
from d4k_jax.sharding import make_mesh
from tools.bench import _per_device_bytes, train_step_lowered


def _compile(n: int, per_device: int = 2):
    cfg = FluxConfig(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=12,
        axes_dims_rope=(2, 2, 4),
        remat="full",
    )
    module = Flux(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    vae = AutoencoderKL(
        VAEConfig(latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4, stride=2), dtype=jnp.bfloat16
    )
    small = (jnp.zeros((1, 2, 2, 4)), jnp.zeros(1), jnp.zeros((1, 5, 24)), jnp.zeros((1, 12)), jnp.zeros(1))
    b, sds = per_device * n, jax.ShapeDtypeStruct
    batch = {
        "image": sds((b, 32, 32, 3), jnp.float32),
        "text": sds((b, 5, 24), jnp.bfloat16),
        "pooled": sds((b, 12), jnp.bfloat16),
    }
    mesh = make_mesh({"data": 1, "fsdp": n}, jax.devices()[:n])
    lowered, state = train_step_lowered(
        module,
        small,
        ts.optimizer(),
        ts.LossConfig(),
        mesh,
        batch,
        vae=vae,
        vae_small=(jnp.zeros((1, 16, 16, 3)),),
        encode_passes=per_device,
    )
    return lowered.compile(), state


def test_sharded_train_step_with_images_compiles_with_a_memory_analysis():
    compiled, state = _compile(8)
    m = compiled.memory_analysis()
    held = _per_device_bytes((state.params, state.opt_state))
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, state.opt_state)))
    assert m.argument_size_in_bytes >= held > 0  # the state is an argument of the step...
    assert m.alias_size_in_bytes >= 0.9 * held  # ...donated: the new state reuses its buffers
    assert m.temp_size_in_bytes > 0
    # FSDP: the fp32 params and AdamW moments are spread over the 8 devices (at this tiny width the
    # replicated biases, norms and 256-wide timestep kernels are a large share; at full size they are not)
    assert held < whole / 2
    kernel = state.params["x_embedder"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) == (16, 2)
