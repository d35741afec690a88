"""Tiny random diffusers Flux and SD3 pipelines saved as pipeline folders (tokenizers made locally)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from tiny_tokenizers import clip_tokenizer, t5_tokenizer
from torch_flux import make_flux
from torch_sd3 import make_sd3
from torch_vae import make_vae
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

CLIP_LEN = 16


def clip_model(cls, hidden, act="quick_gelu", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_LEN,
        hidden_act=act,
        eos_token_id=1,
        bos_token_id=0,
        pad_token_id=1,
        **kw,
    )
    return cls(cfg).eval()


def t5_model(d_model, seed=0):
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=64,
        d_model=d_model,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def _vae():
    return make_vae(
        seed=4,
        block_out_channels=(32, 32),
        latent_channels=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )


def flux_pipeline(root: Path, name: str = "flux", **transformer) -> FluxPipeline:
    """The pipeline in root/name; `transformer` overrides the tiny transformer's config (e.g. 8 heads)."""
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_image_seq_len=256,
            max_image_seq_len=4096,
            base_shift=0.5,
            max_shift=1.15,
        ),
        vae=_vae(),
        text_encoder=clip_model(CLIPTextModel, 12),
        tokenizer=AutoTokenizer.from_pretrained(clip_tokenizer(root / "tok_clip", CLIP_LEN)),
        text_encoder_2=t5_model(24),
        tokenizer_2=AutoTokenizer.from_pretrained(t5_tokenizer(root / "tok_t5")),
        transformer=make_flux(joint_attention_dim=24, pooled_projection_dim=12, **transformer),
    )
    pipe.save_pretrained(root / name, safe_serialization=True)
    return pipe


def sd3_pipeline(root: Path, name: str = "sd3", **transformer) -> StableDiffusion3Pipeline:
    """The pipeline in root/name; `transformer` overrides the tiny transformer's config (e.g. 8 heads)."""
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(),
        text_encoder=clip_model(CLIPTextModelWithProjection, 12, projection_dim=12, seed=1),
        tokenizer=AutoTokenizer.from_pretrained(clip_tokenizer(root / "tok_clip", CLIP_LEN)),
        text_encoder_2=clip_model(CLIPTextModelWithProjection, 16, act="gelu", projection_dim=16, seed=2),
        tokenizer_2=AutoTokenizer.from_pretrained(root / "tok_clip"),
        text_encoder_3=t5_model(32, seed=3),
        tokenizer_3=AutoTokenizer.from_pretrained(t5_tokenizer(root / "tok_t5")),
        transformer=make_sd3(joint_attention_dim=32, pooled_projection_dim=28, **transformer),
    )
    pipe.save_pretrained(root / name, safe_serialization=True)
    return pipe
