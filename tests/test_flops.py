"""Model FLOPs for MFU: matmuls and convolutions counted on the jaxpr, loops counted per iteration."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from d4k_jax import flops
from d4k_jax.models.mmdit import MMDiT, MMDiTConfig
from d4k_jax.nn import attention

f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)


def test_matmul_and_convolution_counts():
    assert flops.forward_flops(lambda a, b: jnp.einsum("bmk,bkn->bmn", a, b), f32(3, 5, 7), f32(3, 7, 11)) == (
        2 * 3 * 5 * 7 * 11
    )
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
    )
    # output [2, 4, 4, 6]; each output element: 3x3 window x 4 input channels of its group
    assert flops.forward_flops(conv, f32(2, 8, 8, 8), f32(3, 3, 4, 6)) == 2 * (2 * 4 * 4 * 6) * (3 * 3 * 4)


def test_loops_count_every_iteration_and_one_branch():
    def scanned(x, w):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

    def branches(p, x, w):
        return jax.lax.cond(p, lambda: x @ w @ w, lambda: x @ w)

    one = 2 * 4 * 8 * 8
    assert flops.forward_flops(scanned, f32(4, 8), f32(8, 8)) == 5 * one
    assert flops.forward_flops(branches, jax.ShapeDtypeStruct((), bool), f32(4, 8), f32(8, 8)) == 2 * one
    with pytest.raises(ValueError, match="while loop"):
        flops.forward_flops(lambda x: jax.lax.while_loop(lambda c: c.sum() < 9, lambda c: c @ c, x), f32(3, 3))


def test_attention_counts_its_two_matmuls_whatever_the_kernel():
    q = f32(2, 300, 3, 16)
    expected = 2 * (2 * 2 * 3 * 300 * 300 * 16)  # scores and weighted values, 2 FLOPs per multiply-add
    for impl in ("xla", "chunked"):  # the chunked form's 5 query chunks are a loop: counted per chunk
        fn = lambda q, k, v, impl=impl: attention.dot_product_attention(q, k, v, implementation=impl, chunk_size=60)
        assert flops.forward_flops(fn, q, q, q) == expected
    with attention.forced("chunked"):  # forward_flops traces the plain form whatever is forced outside
        assert flops.forward_flops(lambda q, k, v: attention.dot_product_attention(q, k, v), q, q, q) == expected


def test_scanned_transformer_layers_each_count():
    """XLA's cost analysis counts a scanned layer once; the jaxpr count grows by one layer's FLOPs per layer:
    image and text streams' q, k, v, out and 4x MLP (12 D² per token), attention (2 T² D), adaLN (2 x 6 D²)."""
    d, image, text = 64, 64, 5

    def count(layers):
        cfg = MMDiTConfig(
            num_layers=layers, num_attention_heads=2, attention_head_dim=32, caption_projection_dim=d,
            joint_attention_dim=32, pooled_projection_dim=16, pos_embed_max_size=16, sample_size=8,
        )  # fmt: skip
        m = MMDiT(cfg)
        args = (f32(1, 16, 16, 16), f32(1), f32(1, text, 32), f32(1, 16))
        params = jax.eval_shape(lambda: nn.unbox(m.init(jax.random.key(0), *map(jnp.zeros_like, args)))["params"])
        return flops.forward_flops(lambda p, *a: m.apply({"params": p}, *a), params, *args)

    tokens = image + text
    layer = 2 * (12 * d * d * tokens + 2 * tokens * tokens * d + 2 * 6 * d * d)
    assert count(4) - count(2) == 2 * layer
