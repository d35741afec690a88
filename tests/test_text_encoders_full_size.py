"""The real text encoders (SD3's CLIP-L and CLIP-G, T5-XXL): parameters equal transformers' tensor list,
built on the meta device and with `jax.eval_shape`, without memory."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from d4k_jax.io.components import kind_for
from d4k_jax.models.clip import CLIP_G, CLIP_L
from d4k_jax.models.keymap import param_shapes, to_flax
from d4k_jax.models.t5 import T5_XXL

# The stacked rules np.stack every layer's tensor; elements of zero bytes keep T5-XXL's 19 GB of them free.
_NOTHING = np.zeros((), np.dtype([]))

REAL = {
    # name: (transformers class, config, our config, parameter count)
    "clip_l": (  # openai/clip-vit-large-patch14 text tower, SD3's text_encoder
        CLIPTextModelWithProjection,
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        ),
        CLIP_L,
        123_650_304,
    ),
    "clip_g": (  # OpenCLIP bigG text tower, SD3's text_encoder_2
        CLIPTextModelWithProjection,
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=1280,
        ),
        CLIP_G,
        694_659_840,
    ),
    "t5_xxl": (  # google/t5-v1_1-xxl encoder, SD3's text_encoder_3 and FLUX.1's text_encoder_2
        T5EncoderModel,
        T5Config(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            layer_norm_epsilon=1e-6,
        ),
        T5_XXL,
        4_762_310_656,
    ),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_text_encoder_matches_transformers_tensor_list(name):
    cls, config, ours, count = REAL[name]
    with torch.device("meta"):
        ref = cls(config)
    state = ref.state_dict()  # T5: shared.weight and its tied twin encoder.embed_tokens.weight
    assert sum(p.numel() for p in ref.parameters()) == count  # parameters() counts a tied tensor once

    kind = kind_for({**config.to_dict(), "architectures": [cls.__name__]})
    model_cfg = kind.config_from({**config.to_dict(), "architectures": [cls.__name__]})
    assert model_cfg == ours
    shapes = param_shapes(kind.build(model_cfg, dtype=jnp.bfloat16), kind.init_inputs(model_cfg))
    assert sum(int(np.prod(s)) for s in shapes.values()) == count
    # every transformers tensor maps onto exactly one parameter of the right shape
    source = {k: np.broadcast_to(_NOTHING, tuple(v.shape)) for k, v in state.items()}
    converted = to_flax(source, kind.checkpoint_rules(model_cfg, shapes, set(source)), shapes)
    assert {p: a.shape for p, a in converted.items()} == shapes
