"""cuDNN attention at odd sequence lengths (nn/attention.py's `even_lengths`): jax 0.10.2's cuDNN attention refuses an
odd q or kv length under jax.grad, so the "cudnn" path pads to even lengths with exact masking. Traced on the CPU
with jax's real cuDNN primitives (its version probe stubbed; lowering would need a GPU), the padding checked exact
through an XLA stand-in kernel, and the real kernel compared with XLA on a GPU."""

import collections
import importlib

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYER_TOL, rel_err
from jax._src.ad_checkpoint import saved_residuals
from jax._src.cudnn import fused_attention_stablehlo as jax_cudnn

from d4k_jax import sharding
from d4k_jax.nn import attention, ulysses

remat = importlib.import_module("d4k_jax.nn.stack")  # d4k_jax.nn exports a function `stack` of the same name

B, N, K = 2, 2, 64
FWD, BWD = remat.CUDNN_ATTENTION_FWD, "dot_product_attention_bwd_wrapper"


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
    """jax's cuDNN attention traces on the CPU: only its version probe needs a GPU (lowering would need one too)."""
    monkeypatch.setattr(jax_cudnn, "check_cudnn_version", lambda: 91000)


def _qkv(lq, lk, dtype=jnp.float32, seed=0, n=N, d=K):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(B, length, n, d)), dtype) for length in (lq, lk, lk)]


def _loss(attend):
    return lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()


def _value_and_grads(f, q, k, v, cotangent):
    out, vjp = jax.vjp(f, q, k, v)
    return out, *vjp(cotangent)


def _bindings(program: jax.extend.core.ClosedJaxpr, name: str) -> list:
    """Every equation binding the primitive `name`, in nested jaxprs too (pjit, custom_vjp, shard_map bodies)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == name:
                found.append(eqn)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(program.jaxpr)
    return found


def test_jax_cudnn_still_rejects_odd_lengths_under_grad(cudnn_on_cpu):
    """The jax bug that `even_lengths` works around, raised while tracing (no GPU needed):
    `NotImplementedError: Unsupported sequence length Q 37, KV 37.` (jax 0.10.2, check_is_flash_attention: the
    custom_vjp forward rule passes `bias is not None` for its size-0 bias placeholder). When this test fails, jax has
    fixed it and the padding can go. Without a gradient the same call traces."""
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    q, k, v = _qkv(37, 37, jnp.bfloat16)
    jax.make_jaxpr(_loss(cudnn))(q, k, v)
    with pytest.raises(NotImplementedError, match="Unsupported sequence length Q 37, KV 37"):
        jax.make_jaxpr(jax.grad(_loss(cudnn), argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize(
    ("lq", "lk", "masked", "padded", "mask_type"),
    [
        (37, 37, False, (38, 38), "PADDING"),  # the padded key masked by cuDNN's padding mask (kv lengths)
        (37, 36, False, (38, 36), "NO_MASK"),  # only q padded: its extra row needs no mask
        (36, 37, False, (36, 38), "PADDING"),
        (37, 37, True, (38, 38), "NO_MASK"),  # a dense mask (cuDNN's bias input) masks the padded key itself
    ],
)
def test_odd_lengths_trace_under_grad_at_padded_lengths(lq, lk, masked, padded, mask_type, cudnn_on_cpu):
    """Before the fix this raised the error above; now jax's cuDNN forward and backward both bind even lengths."""
    q, k, v = _qkv(lq, lk, jnp.bfloat16)
    mask = jnp.ones((B, 1, lq, lk), bool) if masked else None
    attend = lambda q, k, v: attention.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    program = jax.make_jaxpr(jax.grad(_loss(attend), argnums=(0, 1, 2)))(q, k, v)
    (fwd,), (bwd,) = _bindings(program, FWD), _bindings(program, BWD)
    for eqn in (fwd, bwd):
        assert [x.aval.shape[1] for x in eqn.invars[:3]] == [padded[0], *padded[1:] * 2]
        assert eqn.params["mask_type"].name == mask_type
        assert eqn.params["variadic_args"][0] == masked  # a bias only for the dense mask
    seqlens = [x.aval.shape for x in fwd.invars[4:6]]  # q_seqlen, kv_seqlen: [B] with the padding mask, else unused
    assert seqlens == ([(B,), (B,)] if mask_type == "PADDING" else [(0,), (0,)])
    assert [g.shape for g in jax.eval_shape(jax.grad(_loss(attend), argnums=(0, 1, 2)), q, k, v)] == [
        (B, lq, N, K),
        (B, lk, N, K),
        (B, lk, N, K),
    ]


def _xla_kernel(calls):
    """A stand-in with the cuDNN path's kernel contract: jax's XLA attention honours key_value_seq_lengths."""

    def kernel(q, k, v, mask, lengths):
        calls.append((q.shape[1], k.shape[1], None if mask is None else mask.shape, lengths is not None))
        return jax.nn.dot_product_attention(q, k, v, mask=mask, key_value_seq_lengths=lengths, implementation="xla")

    return kernel


@pytest.mark.parametrize(
    ("lq", "lk", "masked", "call"),
    [
        (37, 37, False, (38, 38, None, True)),
        (37, 36, False, (38, 36, None, False)),
        (36, 37, False, (36, 38, None, True)),
        (37, 37, True, (38, 38, (B, 1, 38, 38), False)),
        (36, 36, False, (36, 36, None, False)),  # even: passed through
    ],
)
def test_the_padding_is_exact(lq, lk, masked, call):
    """Forward and gradients equal the unpadded attention (fp32), through the same XLA kernel."""
    q, k, v = _qkv(lq, lk)
    cotangent = _qkv(lq, lk, seed=1)[0]
    rng = np.random.default_rng(2)
    mask = jnp.asarray((rng.random((B, 1, lq, lk)) < 0.6) | (np.arange(lk) == 0)) if masked else None  # no empty row
    calls = []
    ours = lambda q, k, v: attention.even_lengths(_xla_kernel(calls), q, k, v, mask)
    want = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    got, ref = (jax.jit(_value_and_grads, static_argnums=0)(f, q, k, v, cotangent) for f in (ours, want))
    assert calls == [call]
    for a, b in zip(got, ref, strict=True):
        assert rel_err(a, b) < LAYER_TOL


def test_save_attention_keeps_the_padded_outputs(cudnn_on_cpu):
    """Under the remat policy "save_attention", at an odd length (37 -> 38) exactly cuDNN's padded O and softmax
    statistics are added to what "full" keeps: its forward primitive is still the one matched by name."""
    q, k, v = _qkv(37, 37, jnp.bfloat16)
    f = _loss(lambda q, k, v: attention.dot_product_attention(jnp.tanh(q), k, v, implementation="cudnn"))

    def residuals(policy):
        checkpointed = jax.checkpoint(f, policy=remat.REMAT_POLICIES[policy])
        return collections.Counter(
            (aval.str_short(), src.split(" from ")[0]) for aval, src in saved_residuals(checkpointed, q, k, v)
        )

    full, saved = residuals("full"), residuals("save_attention")
    assert not full - saved
    assert saved - full == {
        (f"bfloat16[{B},38,{N},{K}]", f"output of {FWD}"): 1,
        (f"float32[{B},{N},38]", f"output of {FWD}"): 1,
    }


def test_ulysses_pads_the_whole_sequence_on_each_device(cudnn_on_cpu):
    """Inside the Ulysses shard_map each device attends all 7 + 16 = 23 tokens of its heads: padded to 24 there."""
    text, image = _qkv(7, 7, jnp.bfloat16, n=4), _qkv(16, 16, jnp.bfloat16, n=4)

    def loss(text, image):
        out_text, out_image = ulysses.joint_attention(text, image)
        return out_text.astype(jnp.float32).sum() + out_image.astype(jnp.float32).sum()

    with attention.forced("cudnn"), sharding.active(sharding.make_mesh({"sequence": 2}, jax.devices()[:2])):
        program = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(text, image)
    (fwd,), (bwd,) = _bindings(program, FWD), _bindings(program, BWD)
    for eqn in (fwd, bwd):
        assert eqn.invars[0].aval.shape == (B, 24, 2, K)  # 4 heads over 2 devices
        assert eqn.params["mask_type"].name == "PADDING"


@pytest.mark.accelerator
@pytest.mark.parametrize(("length", "head_dim", "masked"), [(333, 64, False), (1037, 128, False), (77, 64, True)])
def test_cudnn_at_odd_lengths_equals_xla_on_a_gpu(length, head_dim, masked):
    """On a GPU: cuDNN at an odd length (padded) equals XLA's fp32 attention of the same bf16 inputs, forward and
    gradients; the masked case is CLIP's (77 tokens, a causal [B, 1, T, T] mask, cuDNN's bias input)."""
    if jax.devices()[0].platform != "gpu":
        pytest.skip(f"needs a GPU, not {jax.devices()[0].device_kind}")
    q, k, v = _qkv(length, length, jnp.bfloat16, d=head_dim)
    cotangent = _qkv(length, length, jnp.bfloat16, seed=1, d=head_dim)[0]
    mask = jnp.tril(jnp.ones((B, 1, length, length), bool)) if masked else None
    cudnn = lambda *a: attention.dot_product_attention(*a, mask=mask, implementation="cudnn")
    up = lambda a: [x.astype(jnp.float32) for x in a]
    xla = lambda *a: attention.dot_product_attention(*up(a), mask=mask, implementation="xla")
    ours, want = (jax.jit(_value_and_grads, static_argnums=0)(f, q, k, v, cotangent) for f in (cudnn, xla))
    for got, ref in zip(ours, want, strict=True):
        assert np.isfinite(np.asarray(got, np.float32)).all()
        assert rel_err(got, ref) < 2**-7  # bf16 inputs and outputs
