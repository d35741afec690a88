"""Prompt conditioning for Flux: our tokenizers + Flax CLIP / T5 equal diffusers' FluxPipeline.encode_prompt."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import MODEL_TOL, rel_err
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from helpers import save_component
from tiny_tokenizers import clip_tokenizer, t5_tokenizer
from torch_flux import make_flux
from torch_vae import make_vae
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from conversion import load_component
from d4k_jax.pipelines.tokenizer import Tokenizer

PROMPTS = ["a red cat on the sky", "a photo of a small dog with a large blue square on a green background"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_pipe")
    clip_tok = clip_tokenizer(root / "tokenizer", model_max_length=16)
    t5_tok = t5_tokenizer(root / "tokenizer_2")
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=128, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16, eos_token_id=1,
                                        bos_token_id=0, pad_token_id=1)).eval()  # fmt: skip
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=24, d_kv=6, d_ff=32, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                 relative_attention_max_distance=16, decoder_start_token_id=0)).eval()  # fmt: skip
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=make_vae(latent_channels=4),
        text_encoder=clip,
        tokenizer=AutoTokenizer.from_pretrained(clip_tok),
        text_encoder_2=t5,
        tokenizer_2=AutoTokenizer.from_pretrained(t5_tok),
        transformer=make_flux(joint_attention_dim=24, pooled_projection_dim=12),
    )
    save_component(clip, root / "text_encoder")
    save_component(t5, root / "text_encoder_2")
    return pipe, root


@pytest.mark.parametrize("max_sequence_length", [10, 24])
def test_encode_prompt_matches_flux_pipeline(pipe, max_sequence_length):
    pipe, root = pipe
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=max_sequence_length)
    clip, clip_params = load_component(root / "text_encoder")
    t5, t5_params = load_component(root / "text_encoder_2")
    clip_ids = Tokenizer(root / "tokenizer")(PROMPTS)  # 77 -> model_max_length 16 here
    t5_ids = Tokenizer(root / "tokenizer_2", max_sequence_length)(PROMPTS)
    assert clip_ids.shape == (2, 16) and t5_ids.shape == (2, max_sequence_length)
    # the pipeline passes no attention mask to either encoder: padding tokens are attended
    ours_pooled = clip.apply({"params": clip_params}, jnp.asarray(clip_ids)).pooler_output
    ours_embeds = t5.apply({"params": t5_params}, jnp.asarray(t5_ids)).last_hidden_state
    assert rel_err(ours_pooled, pooled.numpy()) < MODEL_TOL
    assert rel_err(ours_embeds, embeds.numpy()) < MODEL_TOL


def test_truncation_warns_with_the_removed_text(pipe, caplog):
    _, root = pipe
    tok = Tokenizer(root / "tokenizer_2", 6)
    with caplog.at_level("WARNING"):
        ids = tok(PROMPTS)
    assert ids.shape == (2, 6) and np.all(ids[:, -1] == 1)  # truncated sequences still end with </s>
    assert "removed" in caplog.text and "background" in caplog.text


def test_missing_tokenizer_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        Tokenizer(tmp_path / "nope")
