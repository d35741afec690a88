"""CLIP text encoder parity with transformers' CLIPTextModel / CLIPTextModelWithProjection; its key map."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import LAYER_TOL, MODEL_TOL, rel_err
from helpers import edited_copy, save_component
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from conversion import ConversionError, export_component, load_component, load_config
from d4k_jax import sharding
from d4k_jax.io.safetensors_io import TensorSource
from d4k_jax.models.clip_keys import config_from_transformers

WEIGHTS = "model.safetensors"
VOCAB, MAX_POS = 99, 12
PAD = 1
CONFIGS = {
    # CLIP-L style: quick_gelu, legacy eos_token_id 2 (pooled at the largest token id, the EOS, VOCAB - 1)
    "plain_quick_gelu": (CLIPTextModel, dict(hidden_act="quick_gelu", eos_token_id=2)),
    # bigG style: erf gelu, projection, pooled at the first eos_token_id
    "projection_gelu": (CLIPTextModelWithProjection, dict(hidden_act="gelu", eos_token_id=7, projection_dim=24)),
}


def make_clip(name: str, seed: int = 0):
    cls, extra = CONFIGS[name]
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_POS,
        layer_norm_eps=1e-5,
        pad_token_id=PAD,
        bos_token_id=0,
        **extra,
    )
    model = cls(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):  # not the identity transformers initialises
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model


def eos_of(name):
    return VOCAB - 1 if CONFIGS[name][1]["eos_token_id"] == 2 else CONFIGS[name][1]["eos_token_id"]


def prompts(name, lengths, t, seed=0):
    """input_ids [B, t]: random tokens, EOS at position length - 1, then padding; and the attention mask."""
    rng = np.random.default_rng(seed)
    eos = eos_of(name)
    ids = rng.integers(2, VOCAB - 1, (len(lengths), t))
    ids[ids == eos] = eos + 1
    mask = np.zeros((len(lengths), t), np.int64)
    for b, n in enumerate(lengths):
        ids[b, n - 1] = eos
        ids[b, n:] = eos if b % 2 else PAD  # CLIP-L pads with EOS, others with a pad token
        mask[b, :n] = 1
    return ids, mask


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    model = make_clip(request.param)
    folder = save_component(model, tmp_path_factory.mktemp(request.param))
    module, params = load_component(folder)
    return request.param, model, module, params, folder


def reference(model, ids, mask):
    with torch.no_grad():
        kw = dict(attention_mask=None if mask is None else torch.from_numpy(mask), output_hidden_states=True)
        out = model(torch.from_numpy(ids), **kw)
        text = model.text_model if isinstance(model, CLIPTextModelWithProjection) else model
        pooled = text(torch.from_numpy(ids), **kw).pooler_output
    embeds = getattr(out, "text_embeds", None)
    return out.last_hidden_state, out.hidden_states, pooled, embeds


@pytest.mark.parametrize(
    "lengths, t, masked",
    [((5, 9, 12), 12, True), ((3, 7), 9, True), ((4, 6), 8, False), ((12,), 12, False)],
    ids=["padded_max_len", "padded_short", "unmasked_short", "full"],
)
def test_matches_transformers(pair, lengths, t, masked):
    name, model, module, params, _ = pair
    ids, mask = prompts(name, lengths, t)
    mask = mask if masked else None
    last, hidden, pooled, embeds = reference(model, ids, mask)
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))
    assert len(out.hidden_states) == len(hidden) == model.config.num_hidden_layers + 1
    errors = {
        "last_hidden_state": rel_err(out.last_hidden_state, last),
        "pooler_output": rel_err(out.pooler_output, pooled),
    }
    errors |= {
        f"hidden_states[{i}]": rel_err(o, r) for i, (o, r) in enumerate(zip(out.hidden_states, hidden, strict=True))
    }
    if embeds is None:
        assert out.text_embeds is None
    else:
        errors["text_embeds"] = rel_err(out.text_embeds, embeds)
    assert max(errors.values()) < MODEL_TOL, errors
    # the pooled state is the final state at each prompt's EOS (not at the last padding position)
    np.testing.assert_array_equal(
        out.pooler_output, out.last_hidden_state[np.arange(len(lengths)), np.array(lengths) - 1]
    )


def test_padding_mask_matters(pair):
    name, _, module, params, _ = pair
    ids, mask = prompts(name, (4, 10), 10)
    with_mask = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state
    without = module.apply({"params": params}, jnp.asarray(ids)).last_hidden_state
    # causal: the first tokens of the shorter prompt cannot see its padding, later ones can
    np.testing.assert_allclose(with_mask[0, :4], without[0, :4], rtol=1e-6, atol=1e-6)
    assert not np.allclose(with_mask[0, 4:], without[0, 4:], atol=1e-3)


def test_too_long_input_is_an_error(pair):
    _, _, module, params, _ = pair
    with pytest.raises(ValueError, match=rf"at most {MAX_POS} tokens"):
        module.apply({"params": params}, jnp.zeros((1, MAX_POS + 1), jnp.int32))


def test_removed_layer_tensor_is_named(pair, tmp_path):
    _, _, _, _, folder = pair
    state = TensorSource([folder / WEIGHTS])
    key = next(k for k in state if k.endswith("encoder.layers.1.mlp.fc2.weight"))
    with pytest.raises(ConversionError, match=rf"missing from the checkpoint \(1\):\n\s+{key}"):
        load_component(edited_copy(folder, tmp_path, lambda s: s.pop(key)))


def test_real_checkpoint_layout_with_position_ids(tmp_path):
    """Hub checkpoints (and transformers 4) name the tower `text_model.*`; old ones hold position_ids too."""
    folder = save_component(make_clip("plain_quick_gelu"), tmp_path / "clip")
    assert "final_layer_norm.weight" in TensorSource([folder / WEIGHTS])  # transformers 5 drops the prefix

    def to_hub_layout(state):
        for k in list(state):
            state["text_model." + k] = state.pop(k)
        state["text_model.embeddings.position_ids"] = np.arange(MAX_POS, dtype=np.int64)[None]

    _, want = load_component(folder)
    _, got = load_component(edited_copy(folder, tmp_path, to_hub_layout))
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_export_round_trip(pair, tmp_path):
    name, model, _, params, folder = pair
    out = export_component(load_config(folder), params, tmp_path / "out")
    original, exported = TensorSource([folder / WEIGHTS]), TensorSource([out / WEIGHTS])
    # the export always uses the hub's `text_model.*` names, which transformers 4 and 5 both load
    renamed = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: k for k in original}
    assert set(exported) == set(renamed)
    for k, src in renamed.items():
        np.testing.assert_array_equal(exported[k], original[src], err_msg=k)
    again, info = type(model).from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    ids, mask = prompts(name, (3, 6), 6)
    np.testing.assert_array_equal(reference(again.eval(), ids, mask)[0], reference(model, ids, mask)[0])


def test_config_translation_and_errors():
    base = make_clip("projection_gelu").config.to_dict() | {"architectures": ["CLIPTextModelWithProjection"]}
    ours = config_from_transformers(base)
    assert (ours.hidden_act, ours.projection_dim, ours.eos_token_id, ours.num_hidden_layers) == ("gelu", 24, 7, 3)
    assert config_from_transformers(base | {"architectures": ["CLIPTextModel"]}).projection_dim is None
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        config_from_transformers(base | {"hidden_act": "relu"})
    with pytest.raises(ValueError, match=r"eos_token_id \[2, 3\]"):
        config_from_transformers(base | {"eos_token_id": [2, 3]})


def test_every_parameter_has_logical_axes(pair):
    _, _, module, _, _ = pair
    boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(x.names[0] == "layers" for x in jax.tree.leaves(boxed["layers"], is_leaf=lambda x: hasattr(x, "names")))
    specs = sharding.params_sharding(sharding.make_mesh(), sharding.DEFAULT_RULES, {"params": boxed})
    assert len(jax.tree.leaves(specs)) == len(leaves)


def test_remat_changes_nothing(pair):
    name, _, module, params, folder = pair
    ids, mask = prompts(name, (3, 6), 6)
    remat, _ = load_component(folder, remat="full")
    assert remat.config.remat == "full"
    loss = lambda m, p: m.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state.sum()
    grads = [jax.grad(functools.partial(loss, m))(params) for m in (module, remat)]
    # over the whole tree: some gradients are zero up to rounding (k_proj.bias: softmax ignores a per-query shift)
    flat = [jnp.concatenate([g.ravel() for g in jax.tree.leaves(gs)]) for gs in grads]
    assert rel_err(*flat) < LAYER_TOL  # recomputation only reorders fp32 sums
