"""The remat policy "save_attention" (nn/stack.py): full remat that keeps each attention kernel's outputs for the
backward pass. Checked on the residuals jax saves for the backward (traced, never run): jax's real cuDNN attention
primitives traced on the CPU (with jax's cuDNN version probe stubbed), splash, the chunked and XLA forms; inside
nn.scan, SD3's separate last block and the Ulysses shard_map; and gradients equal to "full" remat's."""

import collections
import dataclasses
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYER_TOL, rel_err

# jax.ad_checkpoint exports only print_saved_residuals, which prints this list
from jax._src.ad_checkpoint import saved_residuals
from jax._src.cudnn import fused_attention_stablehlo as jax_cudnn
from tiny_configs import tiny_flux, tiny_sd3

from d4k_jax import sharding
from d4k_jax.models.flux import Flux
from d4k_jax.models.mmdit import JointBlock, MMDiT
from d4k_jax.nn import attention, mgpu_attention

remat = importlib.import_module("d4k_jax.nn.stack")  # d4k_jax.nn exports a function `stack` of the same name

B, L, N, K = 2, 40, 2, 16  # the single-attention cases
# SD3-shaped: a scan of two blocks and the separate last block; 2x2 patches of 4x8 latents = 8 image tokens, 8 text
SD3 = tiny_sd3(heads=4, num_layers=3)
# Flux of the same attention shapes: one double-stream and one single-stream block; 2x2-packed latents
FLUX = tiny_flux(heads=4, text_dim=20)
TOKENS = 8 + 8
HEADS, HEAD_DIM, WIDTH = SD3.num_attention_heads, SD3.attention_head_dim, SD3.dim


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
    """jax's cuDNN attention traces on the CPU: only its version probe needs a GPU (lowering would need one too)."""
    monkeypatch.setattr(jax_cudnn, "check_cudnn_version", lambda: 91000)


def _residuals(f, *args) -> collections.Counter:
    """(type, producer) of each value that f's backward reads from its forward."""
    return collections.Counter((aval.str_short(), src.split(" from ")[0]) for aval, src in saved_residuals(f, *args))


def _extra_residuals(policy_to_residuals) -> collections.Counter:
    """What "save_attention" saves beyond "full"; asserts that it also saves everything "full" does."""
    full, saved = policy_to_residuals("full"), policy_to_residuals("save_attention")
    assert not full - saved
    return saved - full


def _projected_attention(impl: str):
    """w [4, D, D], x [B, L, D] -> a scalar through q, k, v projections, `impl` attention and an output projection."""

    def f(w, x):
        q, k, v = ((x @ w[i]).reshape(B, L, N, K) for i in range(3))
        o = attention.dot_product_attention(q, k, v, implementation=impl, chunk_size=16)
        return jnp.tanh(o.reshape(B, L, N * K) @ w[3]).astype(jnp.float32).sum()

    return f


def _weights_and_tokens(dtype):
    return jnp.ones((4, N * K, N * K), dtype), jnp.ones((B, L, N * K), dtype)


def test_the_policy_names_a_primitive_of_jax_cudnn_attention():
    primitives = {v.name for v in vars(jax_cudnn).values() if isinstance(v, jax.extend.core.Primitive)}
    assert remat.CUDNN_ATTENTION_FWD in primitives


@pytest.mark.parametrize(
    ("impl", "dtype", "expected"),
    [
        (
            "cudnn",
            jnp.bfloat16,
            {
                (f"bfloat16[{B},{L},{N},{K}]", f"output of {remat.CUDNN_ATTENTION_FWD}"): 1,
                (f"float32[{B},{N},{L}]", f"output of {remat.CUDNN_ATTENTION_FWD}"): 1,  # softmax statistics
            },
        ),
        # O and the logsumexp, named inside the kernel's jitted forward: padded to its 128-row blocks, heads first
        (
            "splash",
            jnp.float32,
            {
                (f"float32[{B},{N},128,{K}]", "output of jitted function '_splash_attention'"): 1,
                (f"float32[{B},{N},128]", "output of jitted function '_splash_attention'"): 1,
            },
        ),
        ("chunked", jnp.float32, {(f"float32[{B},{L},{N},{K}]", "named 'attention_out'"): 1}),
        ("xla", jnp.float32, {(f"float32[{B},{L},{N},{K}]", "named 'attention_out'"): 1}),
    ],
)
def test_each_kernel_keeps_its_outputs(impl, dtype, expected, cudnn_on_cpu):
    f, (w, x) = _projected_attention(impl), _weights_and_tokens(dtype)
    checkpointed = lambda policy: _residuals(jax.checkpoint(f, policy=remat.REMAT_POLICIES[policy]), w, x)
    assert _extra_residuals(checkpointed) == expected


def test_the_mgpu_wrapper_keeps_the_kernel_output_and_lse():
    """The Mosaic-GPU path (its CPU stand-in kernel, same wrapper): the corrected O and log-sum-exp it hands its
    backward, padded to the kernel's tiles (40 -> 48 rows), so the kernel's forward does not run again."""
    kernel = mgpu_attention.reference_kernel(q_multiple=16, kv_multiple=16, dtype=jnp.float16)

    def f(w, x):
        q, k, v = ((x @ w[i]).reshape(B, L, N, K) for i in range(3))
        o = mgpu_attention.attention(q, k, v, K**-0.5, kernel, attention.ATTENTION_OUT)
        return jnp.tanh(o.reshape(B, L, N * K) @ w[3]).astype(jnp.float32).sum()

    w, x = _weights_and_tokens(jnp.bfloat16)
    checkpointed = lambda policy: _residuals(jax.checkpoint(f, policy=remat.REMAT_POLICIES[policy]), w, x)
    named = "named 'attention_out'"
    assert _extra_residuals(checkpointed) == {
        (f"float16[{B},48,{N},{K}]", named): 1,
        (f"float32[{B},{N},48]", named): 1,
    }


@pytest.mark.parametrize(("policy", "forward_kernels"), [("full", 2), ("save_attention", 1)])
def test_the_cudnn_forward_kernel_runs_again_in_the_backward_only_under_full(policy, forward_kernels, cudnn_on_cpu):
    f, (w, x) = _projected_attention("cudnn"), _weights_and_tokens(jnp.bfloat16)
    program = str(jax.make_jaxpr(jax.grad(jax.checkpoint(f, policy=remat.REMAT_POLICIES[policy])))(w, x))
    assert program.count(remat.CUDNN_ATTENTION_FWD) == forward_kernels
    assert program.count("dot_product_attention_bwd_wrapper") == 1


def _model_loss(model: str, policy: str):
    """The tiny model's loss (remat `policy`) as a function of its params, and params (zeros: only traced)."""
    x = lambda *shape: jax.device_put(np.ones(shape, np.float32))
    if model == "sd3":
        module = MMDiT(dataclasses.replace(SD3, remat=policy), dtype=jnp.bfloat16)
        args = (x(B, 4, 8, 4), x(B), x(B, 8, SD3.joint_attention_dim), x(B, SD3.pooled_projection_dim))
    else:
        module = Flux(dataclasses.replace(FLUX, remat=policy), dtype=jnp.bfloat16)
        args = (x(B, 4, 8, 4), x(B), x(B, 8, FLUX.joint_attention_dim), x(B, FLUX.pooled_projection_dim), x(B))
    abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])
    params = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype)), abstract)
    return (lambda p: jnp.mean(module.apply({"params": p}, *args).astype(jnp.float32) ** 2)), params


def _bytes(extra: collections.Counter) -> int:
    sizes = {"bfloat16": 2, "float32": 4}
    total = 0
    for (aval, _), count in extra.items():
        dtype, shape = aval.rstrip("]").split("[")
        total += count * sizes[dtype] * int(np.prod([int(s) for s in shape.split(",")]))
    return total


@pytest.mark.parametrize(("model", "sequence"), [("sd3", 1), ("sd3", 2), ("flux", 1)])
def test_models_on_cudnn_keep_o_and_statistics_of_every_attention(model, sequence, cudnn_on_cpu):
    """SD3: three attentions (two in a scan, the last block's); Flux: a double-stream and a single-stream block, one
    scan each. Exactly their O and statistics are added, also when Ulysses runs the kernel inside a shard_map
    (whose residuals come out stacked over the devices)."""
    mesh = sharding.make_mesh({"sequence": sequence}, jax.devices()[:sequence])

    def residuals(policy):
        loss, params = _model_loss(model, policy)
        with attention.forced("cudnn"), sharding.active(mesh):
            return _residuals(loss, params)

    extra = _extra_residuals(residuals)
    per_attention = B * TOKENS * HEADS * HEAD_DIM * 2 + B * HEADS * TOKENS * 4  # bf16 O, float32 statistics
    attentions = 3 if model == "sd3" else 2
    # one (O, statistics) pair per scan (stacked over its layers) and for SD3's last block
    assert sum(extra.values()) == 4 and _bytes(extra) == attentions * per_attention, extra
    if model == "sd3" and sequence == 1:
        fwd = f"output of {remat.CUDNN_ATTENTION_FWD}"
        assert extra == {
            (f"bfloat16[2,{B},{TOKENS},{HEADS},{HEAD_DIM}]", "output of scan"): 1,
            (f"float32[2,{B},{HEADS},{TOKENS}]", "output of scan"): 1,
            (f"bfloat16[{B},{TOKENS},{HEADS},{HEAD_DIM}]", fwd): 1,
            (f"float32[{B},{HEADS},{TOKENS}]", fwd): 1,
        }


def test_scanned_blocks_on_the_cpu_kernel_keep_the_attention_output_with_the_same_gradients():
    rng = np.random.default_rng(0)
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    args = ((f32(B, 8, WIDTH), f32(B, 8, WIDTH)), f32(B, WIDTH))  # image, text tokens; conditioning
    blocks = lambda policy: remat.stack(JointBlock, 2, remat=policy, num_broadcast=1)(SD3, name="blocks")
    abstract = nn.unbox(jax.eval_shape(blocks("full").init, jax.random.key(0), *args)["params"])
    params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.normal(size=a.shape), a.dtype), abstract)

    def loss(policy):
        def f(p):
            (img, txt), _ = blocks(policy).apply({"params": p}, *args)
            return jnp.mean(img**2) + jnp.mean(txt**2)

        return f

    extra = _extra_residuals(lambda policy: _residuals(loss(policy), params))
    assert extra == {(f"float32[2,{B},{TOKENS},{HEADS},{HEAD_DIM}]", "output of scan"): 1}  # O of both layers
    want, got = (jax.jit(jax.grad(loss(policy)))(params) for policy in ("full", "save_attention"))
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        assert rel_err(g, w) < LAYER_TOL, jax.tree_util.keystr(path)
