"""SD3 checkpoints: SAI single-file map checked against diffusers' own converter; full-size shapes."""

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from flax import traverse_util
from helpers import assert_maps_onto, save_component
from torch_sd3 import make_sd3

from d4k_jax.io import load_component
from d4k_jax.io.components import _mmdit_inputs
from d4k_jax.io.safetensors_io import save_file
from d4k_jax.models import mmdit_keys as sd3_map
from d4k_jax.models.keymap import param_shapes, to_torch
from d4k_jax.models.mmdit import MMDiT, MMDiTConfig
from d4k_jax.models.mmdit_keys import SD3_MEDIUM

SD35_MEDIUM = dict(SD3_MEDIUM, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm", pos_embed_max_size=384)


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1), "num_layers": 4}])
def test_sai_map_equals_diffusers_single_file_converter(tmp_path, overrides):
    model = make_sd3(seed=9, **overrides)
    _, params = load_component(save_component(model, tmp_path / "diffusers"))
    flat = {p: np.asarray(a) for p, a in traverse_util.flatten_dict(params).items()}
    cfg = sd3_map.config_from_diffusers(dict(model.config))
    sai = to_torch(flat, sd3_map.sai_rules(cfg, {p: a.shape for p, a in flat.items()}))
    # diffusers' converter (the reference mapping) must consume every tensor and give the model's own weights
    checkpoint = {k: torch.from_numpy(v.copy()) for k, v in sai.items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint, f"keys diffusers' converter did not consume: {sorted(checkpoint)[:5]}"
    state = model.state_dict()
    assert set(converted) == set(state)
    for k, v in converted.items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)

    # the single file loads (config read off the shapes) into the same parameters, other components ignored
    extra = {
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": np.ones(4, np.float32),
        "first_stage_model.decoder.conv_in.bias": np.zeros(4, np.float32),
    }
    save_file({**sai, **extra}, tmp_path / "sd3_tiny.safetensors")
    # SAI files carry no head count: every release uses 64-wide heads, a tiny model says otherwise
    tiny = dict(sample_size=16, attention_head_dim=8, num_attention_heads=4)
    module, got = load_component(tmp_path / "sd3_tiny.safetensors", **tiny)
    assert module.config == cfg
    for path, value in traverse_util.flatten_dict(got).items():
        np.testing.assert_array_equal(value, flat[path], err_msg="/".join(path))


@pytest.mark.parametrize("name", ["sd3_medium", "sd35_medium"])
def test_real_sd3_matches_diffusers_tensor_list(name):
    config = SD3_MEDIUM if name == "sd3_medium" else SD35_MEDIUM
    with torch.device("meta"):
        ref = SD3Transformer2DModel(**config)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    cfg = sd3_map.config_from_diffusers(dict(ref.config))
    assert cfg == MMDiTConfig(**config)
    shapes = param_shapes(MMDiT(cfg), _mmdit_inputs(cfg))
    count = sum(int(np.prod(s)) for s in shapes.values())
    assert count == sum(int(np.prod(s)) for s in ref_shapes.values())
    if name == "sd3_medium":
        assert count == 2_084_951_104  # 2.03B trainable + the 56.6M-entry sincos table (192² x 1536)
    assert_maps_onto(ref_shapes, sd3_map.rules(cfg, shapes), shapes)


def test_sai_config_is_read_off_the_shapes():
    shapes = {
        f"model.diffusion_model.{k}": v
        for k, v in {
            "x_embedder.proj.weight": (1536, 16, 2, 2),
            "final_layer.linear.weight": (64, 1536),
            "context_embedder.weight": (1536, 4096),
            "y_embedder.mlp.0.weight": (1536, 2048),
            "pos_embed": (1, 36864, 1536),
            **{f"joint_blocks.{i}.x_block.attn.qkv.weight": (4608, 1536) for i in range(24)},
        }.items()
    }
    cfg = sd3_map.config_from_sai(shapes)
    assert MMDiTConfig(**{k: v for k, v in cfg.items() if k != "_class_name"}) == MMDiTConfig(**SD3_MEDIUM)


def test_sai_file_with_text_encoders(tmp_path):
    """A SAI file holding the transformer and CLIP-L / CLIP-G / T5 (transformers' names under their
    prefixes): each component loads from it exactly as from its own folder."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from d4k_jax.io.safetensors_io import TensorSource
    from d4k_jax.io.single_file import SAI_TEXT_ENCODERS

    torch.manual_seed(0)
    clip = lambda width, act: CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=50,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            hidden_act=act,
            projection_dim=width,
        )
    ).eval()
    encoders = {
        "text_encoder": clip(12, "quick_gelu"),
        "text_encoder_2": clip(16, "gelu"),
        "text_encoder_3": T5EncoderModel(
            T5Config(
                vocab_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"
            )
        ).eval(),
    }
    state = {}
    for name, model in encoders.items():
        folder = save_component(model, tmp_path / name)
        state.update({SAI_TEXT_ENCODERS[name] + k: v for k, v in TensorSource([folder / "model.safetensors"]).items()})
    sd3 = make_sd3(seed=1)
    _, params = load_component(save_component(sd3, tmp_path / "transformer"))
    flat = {p: np.asarray(a) for p, a in traverse_util.flatten_dict(params).items()}
    cfg = sd3_map.config_from_diffusers(dict(sd3.config))
    state.update(to_torch(flat, sd3_map.sai_rules(cfg, {p: a.shape for p, a in flat.items()})))
    save_file(state, tmp_path / "sd3_incl_clips_t5.safetensors")

    heads = {"text_encoder": {"num_attention_heads": 2}, "text_encoder_2": {"num_attention_heads": 2}}
    for name in encoders:
        module, got = load_component(tmp_path / "sd3_incl_clips_t5.safetensors", component=name, **heads.get(name, {}))
        ref_module, want = load_component(tmp_path / name)
        assert module.config == ref_module.config
        for path, value in traverse_util.flatten_dict(got).items():
            np.testing.assert_array_equal(value, traverse_util.flatten_dict(want)[path], err_msg=f"{name} {path}")
    with pytest.raises(ValueError, match="holds no 'vae'"):
        load_component(tmp_path / "sd3_incl_clips_t5.safetensors", component="vae")
