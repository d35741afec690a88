"""The attention dispatch: every implementation equals torch's scaled_dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import LAYER_TOL, rel_err

from d4k_jax.nn import attention


def _qkv(b=2, lq=37, lk=53, n=3, k=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(b, length, n, k)).astype(np.float32) for length in (lq, lk, lk)]


def _torch_sdpa(q, k, v, mask=None, bias=None):
    t = lambda a: torch.from_numpy(a).transpose(1, 2)
    attn_mask = None
    if mask is not None:
        attn_mask = torch.from_numpy(np.asarray(mask))
    if bias is not None:
        attn_mask = torch.from_numpy(np.asarray(bias))
    out = torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=attn_mask)
    return out.transpose(1, 2).numpy()


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_matches_torch(impl):
    q, k, v = _qkv()
    out = attention.dot_product_attention(jnp.asarray(q), k, v, implementation=impl, chunk_size=8)
    assert rel_err(out, _torch_sdpa(q, k, v)) < LAYER_TOL


def test_mask_and_bias_match_torch():
    q, k, v = _qkv()
    mask = np.random.default_rng(1).random((2, 1, 1, 53)) > 0.3
    out = attention.dot_product_attention(q, k, v, mask=jnp.asarray(mask))
    assert rel_err(out, _torch_sdpa(q, k, v, mask=mask)) < LAYER_TOL
    bias = np.random.default_rng(2).normal(size=(1, 3, 37, 53)).astype(np.float32)
    out = attention.dot_product_attention(q, k, v, bias=jnp.asarray(bias))
    assert rel_err(out, _torch_sdpa(q, k, v, bias=bias)) < LAYER_TOL


def test_long_sequences_take_the_chunked_path_on_cpu():
    q = jax.ShapeDtypeStruct((1, 65536, 1, 512), jnp.bfloat16)
    assert attention.choose_implementation(q, q, has_bias=False, has_mask=False) == "chunked"
    assert attention.choose_implementation(q, q, has_bias=False, has_mask=True) == "xla"
    short = jax.ShapeDtypeStruct((1, 77, 8, 64), jnp.float32)
    assert attention.choose_implementation(short, short, has_bias=False, has_mask=False) == "xla"


def test_chunked_never_builds_the_full_score_matrix():
    q = jax.ShapeDtypeStruct((1, 16384, 1, 64), jnp.float32)
    fn = lambda q: attention.dot_product_attention(q, q, q, implementation="chunked", chunk_size=512)
    mem = jax.jit(fn).lower(q).compile().memory_analysis()
    full_scores = 16384 * 16384 * 4
    assert mem.temp_size_in_bytes < full_scores / 8


def test_chunked_gradient_matches_xla():
    q, k, v = _qkv(lq=20, lk=20)
    loss = lambda impl: lambda q: attention.dot_product_attention(q, k, v, implementation=impl, chunk_size=6).sum()
    g_chunked = jax.grad(loss("chunked"))(jnp.asarray(q))
    g_xla = jax.grad(loss("xla"))(jnp.asarray(q))
    assert rel_err(g_chunked, g_xla) < LAYER_TOL


def test_shape_errors_are_clear():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q \\[B, L, N, K\\]"):
        attention.dot_product_attention(q[0], k, v)
    with pytest.raises(ValueError, match="no bias or mask"):
        attention.dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 1, 53), bool), implementation="chunked")
