"""T5 encoder parity with transformers' T5EncoderModel; relative position buckets; tied embeddings; bf16."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import LAYER_TOL, MODEL_TOL, rel_err
from helpers import edited_copy, save_component
from transformers import T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from conversion import ConversionError, export_component, load_component, load_config
from d4k_jax import sharding
from d4k_jax.io.safetensors_io import TensorSource
from d4k_jax.models.t5 import relative_position_buckets
from d4k_jax.models.t5_keys import config_from_transformers

WEIGHTS = "model.safetensors"
VOCAB = 64
CONFIGS = {
    # T5 v1.1 (T5-XXL's form) with few buckets, so that T = 40 reaches the log-spaced and the clipped ones
    "v1_1_gated_gelu": dict(
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=20
    ),
    "original_relu": dict(
        feed_forward_proj="relu", relative_attention_num_buckets=32, relative_attention_max_distance=128
    ),
}


def make_t5(name: str, seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=3,
        num_heads=4,
        layer_norm_epsilon=1e-6,
        **CONFIGS[name],
    )
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layer_norm" in n:  # not the identity transformers initialises
                p.normal_(1.0, 0.2)
    return model


def batch(lengths, t, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, (len(lengths), t))
    mask = (np.arange(t)[None] < np.array(lengths)[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, 0), mask  # pad id 0


def reference(model, ids, mask=None):
    with torch.no_grad():
        m = None if mask is None else torch.from_numpy(mask)
        return model(torch.from_numpy(ids), attention_mask=m).last_hidden_state.numpy()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    model = make_t5(request.param)
    folder = save_component(model, tmp_path_factory.mktemp(request.param))
    module, params = load_component(folder)
    return model, module, params, folder


@pytest.mark.parametrize(
    "lengths, t, masked",
    [((40, 23, 9), 40, True), ((7, 5), 7, True), ((150,), 150, False)],
    ids=["padded", "short", "long"],
)
def test_matches_transformers(pair, lengths, t, masked):
    model, module, params, _ = pair
    ids, mask = batch(lengths, t)
    mask = mask if masked else None
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))
    assert rel_err(out.last_hidden_state, reference(model, ids, mask)) < MODEL_TOL


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (16, 16), (6, 9)])
def test_relative_position_buckets_equal_transformers(num_buckets, max_distance):
    t = 400
    rel = torch.arange(t)[None, :] - torch.arange(t)[:, None]
    want = T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance).numpy()
    got = relative_position_buckets(t, num_buckets, max_distance)
    assert len(np.unique(want)) == num_buckets - 1  # every bucket but (forward, distance 0), which cannot occur
    np.testing.assert_array_equal(got, want)


def test_padding_mask_matters(pair):
    _, module, params, _ = pair
    ids, mask = batch((5, 9), 9)
    with_mask = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state
    without = module.apply({"params": params}, jnp.asarray(ids)).last_hidden_state
    np.testing.assert_allclose(with_mask[1], without[1], rtol=1e-6, atol=1e-6)  # unpadded row: the same
    assert not np.allclose(with_mask[0, :5], without[0, :5], atol=1e-3)  # bidirectional: tokens see padding


def _rms_err(ours, ref) -> float:
    """sqrt(mean((ours - ref)²)) / sqrt(mean(ref²)): the typical bf16 error, not one tail element."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((ours - ref) ** 2) / np.mean(ref**2)))


def test_bf16_compute_stays_close_to_fp32(pair):
    """bf16 rounds to 2^-9 ~ 2e-3 relative per step: three layers stay inside 2e-2 of fp32, and (float32 wo and
    residual stream) no further from it than transformers' own bf16 model is. That comparison is made on the
    RMS error over every output (ours 0.0047-0.0066, transformers' 0.0085-0.0089 on the two configs): it was
    made on the max error, a tail statistic of both models (ours 0.0078-0.011 against transformers' 0.012-0.019),
    which left 1.6x between them and moved with the rounding of single elements."""
    _, module, params, folder = pair
    ids, mask = batch((40, 23, 9), 40)
    want = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state
    torch_bf16 = T5EncoderModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        theirs = torch_bf16(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.float()
    torch_err = _rms_err(theirs.numpy(), want)
    for param_dtype in (jnp.float32, jnp.bfloat16):
        bf16, p16 = load_component(folder, dtype=jnp.bfloat16, param_dtype=param_dtype)
        assert jax.tree.leaves(p16)[0].dtype == param_dtype
        got = jax.jit(bf16.apply)({"params": p16}, jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state
        assert got.dtype == jnp.bfloat16 and bool(jnp.isfinite(got).all())
        assert rel_err(got, want) < 2e-2
        assert _rms_err(got, want) < torch_err


def test_save_pretrained_writes_one_embedding_name(pair):
    _, _, _, folder = pair
    keys = set(TensorSource([folder / WEIGHTS]))
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys


@pytest.mark.parametrize("layout", ["both", "embed_tokens_only"])
def test_tied_embedding_under_either_name(pair, tmp_path, layout):
    _, _, want, folder = pair

    def edit(state):
        state["encoder.embed_tokens.weight"] = state["shared.weight"].copy()
        if layout == "embed_tokens_only":
            del state["shared.weight"]

    _, got = load_component(edited_copy(folder, tmp_path, edit))
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_differing_tied_embeddings_are_an_error(pair, tmp_path):
    _, _, _, folder = pair
    edit = lambda s: s.update({"encoder.embed_tokens.weight": s["shared.weight"] + 1})
    with pytest.raises(ValueError, match=r"encoder\.embed_tokens\.weight is not equal to shared\.weight"):
        load_component(edited_copy(folder, tmp_path, edit))


def test_removed_layer_tensor_is_named(pair, tmp_path):
    _, _, _, folder = pair
    key = "encoder.block.2.layer.1.DenseReluDense.wo.weight"
    with pytest.raises(ConversionError, match=rf"missing from the checkpoint \(1\):\n\s+{key}"):
        load_component(edited_copy(folder, tmp_path, lambda s: s.pop(key)))


def test_export_round_trip_is_exact(pair, tmp_path):
    model, _, params, folder = pair
    out = export_component(load_config(folder), params, tmp_path / "out")
    original, exported = TensorSource([folder / WEIGHTS]), TensorSource([out / WEIGHTS])
    assert set(exported) == set(original)
    for k in original:
        np.testing.assert_array_equal(exported[k], original[k], err_msg=k)
    again, info = T5EncoderModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    ids, mask = batch((6, 4), 6)
    np.testing.assert_array_equal(reference(again.eval(), ids, mask), reference(model, ids, mask))


def test_config_translation_and_errors():
    base = make_t5("v1_1_gated_gelu").config.to_dict() | {"architectures": ["T5EncoderModel"]}
    ours = config_from_transformers(base)
    assert (ours.dense_act_fn, ours.is_gated_act, ours.relative_attention_num_buckets) == ("gelu_new", True, 8)
    relu = config_from_transformers(base | {"feed_forward_proj": "relu"})
    assert (relu.dense_act_fn, relu.is_gated_act) == ("relu", False)
    assert config_from_transformers(base | {"feed_forward_proj": "gated-silu"}).dense_act_fn == "silu"
    with pytest.raises(ValueError, match="feed_forward_proj 'gated-swiglu'"):
        config_from_transformers(base | {"feed_forward_proj": "gated-swiglu"})
    with pytest.raises(ValueError, match="is_decoder=True"):
        config_from_transformers(base | {"is_decoder": True})


def test_every_parameter_has_logical_axes(pair):
    _, module, _, _ = pair
    boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    specs = sharding.params_sharding(sharding.make_mesh(), sharding.DEFAULT_RULES, {"params": boxed})
    assert len(jax.tree.leaves(specs)) == len(leaves)


def test_remat_changes_nothing(pair):
    _, module, params, folder = pair
    ids, mask = batch((6, 4), 6)
    remat, _ = load_component(folder, remat="full")
    assert remat.config.remat == "full"
    loss = lambda m, p: m.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state.sum()
    grads = [jax.grad(functools.partial(loss, m))(params) for m in (module, remat)]
    flat = [jnp.concatenate([g.ravel() for g in jax.tree.leaves(gs)]) for gs in grads]
    assert rel_err(*flat) < LAYER_TOL  # recomputation only reorders fp32 sums
