"""SD3Pipeline: prompts -> images with SD3 / SD3.5 (classifier-free guidance), as StableDiffusion3Pipeline."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d4k_jax import sharding
from d4k_jax.diffusion.flow import SD3_MEDIUM, SchedulerConfig, sd3_schedule
from d4k_jax.diffusion.sampler import euler_sample
from d4k_jax.models import mmdit_keys
from d4k_jax.pipelines import base
from d4k_jax.pipelines.conditioning import sd3_conditioning
from d4k_jax.pipelines.tokenizer import Tokenizer


class SD3Pipeline(base.Pipeline):
    """Components are base.Component (module, params) pairs (text_encoder_3 may be None: T5 dropped, zeros
    in its place; `from_pretrained`'s text encoders are base.Deferred, read on first use). `scheduler` holds
    the schedule settings (the folder's scheduler_config.json; SD3-medium's by default). Classifier-free
    guidance with a negative prompt when guidance_scale > 1."""

    model = "sd3"
    transformer_class = "SD3Transformer2DModel"
    default_scheduler = SD3_MEDIUM
    uses_negative_prompt = True

    def __init__(
        self,
        transformer,
        vae,
        text_encoder,
        text_encoder_2,
        text_encoder_3,
        tokenizer: Tokenizer,
        tokenizer_2: Tokenizer,
        tokenizer_3: Tokenizer | None,
        scheduler: SchedulerConfig = SD3_MEDIUM,
    ):
        self.transformer, self.vae, self.scheduler = base.component(transformer), base.component(vae), scheduler
        self.text_encoders = tuple(base.component(e) for e in (text_encoder, text_encoder_2, text_encoder_3))
        self.tokenizers = (tokenizer, tokenizer_2, tokenizer_3)
        clip_l, clip_g, t5 = (None if e is None else e.module for e in self.text_encoders)
        width = self.transformer.module.config.joint_attention_dim
        self._encode = jax.jit(functools.partial(_encode, clip_l, clip_g, t5, width))
        self._sample = jax.jit(
            functools.partial(_sample, self.transformer.module, self.vae.module), static_argnames="cfg"
        )

    @classmethod
    def text_components(cls, path: Path, dtype: Any) -> dict[str, Any]:
        has_t5 = (path / "text_encoder_3").is_dir()  # SD3 runs without T5 (zeros in its place)
        return dict(
            text_encoder=base.deferred(path, "text_encoder", dtype),
            text_encoder_2=base.deferred(path, "text_encoder_2", dtype),
            text_encoder_3=base.deferred(path, "text_encoder_3", dtype) if has_t5 else None,
            tokenizer=Tokenizer(path / "tokenizer"),
            tokenizer_2=Tokenizer(path / "tokenizer_2"),
            tokenizer_3=Tokenizer(path / "tokenizer_3", 256) if has_t5 else None,
        )

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 256) -> tuple[jax.Array, jax.Array]:
        """(encoder_hidden_states [B, 77 + max_sequence_length, 4096], pooled [B, 2048])."""
        if self.text_encoders[0] is None:
            raise ValueError("the text encoders were released (release_text_encoders); reload the pipeline")
        tok_l, tok_g, tok_t5 = self.tokenizers
        t5_ids = tok_t5(prompts, max_sequence_length) if tok_t5 else jnp.zeros((len(prompts), max_sequence_length), int)
        with sharding.inactive():  # the encoders run where they were read, under whatever mesh a call samples on
            params = tuple(None if e is None else e.params for e in self.text_encoders)
            return self._encode(*params, tok_l(prompts), tok_g(prompts), t5_ids)

    def release_text_encoders(self) -> None:
        self.text_encoders = (None, None, None)

    @classmethod
    def token_geometry(cls, vae_factor: int, transformer_config: dict[str, Any]) -> tuple[int, int]:
        """The side is bounded by the position table: pos_embed_max_size patches."""
        t = mmdit_keys.config_from_diffusers(transformer_config)
        return t.patch_size * vae_factor, t.pos_embed_max_size * t.patch_size * vae_factor

    @property
    def factor(self) -> int:
        return self.transformer.module.config.patch_size * self.vae.module.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.transformer.module.config.in_channels

    def negative_embeds(
        self, negative_prompt: str, batch: int, guidance_scale: float, max_sequence_length: int
    ) -> tuple[jax.Array, jax.Array] | None:
        """The negative prompt's embeddings for CFG (guidance_scale > 1), else None."""
        if guidance_scale <= 1:
            return None
        return self.encode_prompt([negative_prompt] * batch, max_sequence_length)

    def __call__(
        self,
        prompts: str | list[str],
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 28,
        guidance_scale: float = 7.0,
        seed: int = 0,
        latents: jax.Array | None = None,
        negative_prompt: str | list[str] | None = None,
        max_sequence_length: int | None = None,
        prompt_embeds: tuple[jax.Array, jax.Array] | None = None,
        negative_prompt_embeds: tuple[jax.Array, jax.Array] | None = None,
        output: str = "uint8",
    ) -> jax.Array:
        """Images [B, H, W, 3] uint8 (output="float": [0, 1]). CFG with guidance_scale > 1 (cond and uncond in one
        batch); the negative prompt is empty by default, as in the diffusers pipeline."""
        prompts = base.as_prompts(prompts)
        b, length = len(prompts), max_sequence_length or 256
        cfg = guidance_scale > 1
        text, pooled = prompt_embeds or self.encode_prompt(prompts, length)
        if cfg:
            negative = [""] * b if negative_prompt is None else base.as_prompts(negative_prompt)
            if len(negative) != b:
                raise ValueError(f"{len(negative)} negative prompts for {b} prompts")
            neg_text, neg_pooled = negative_prompt_embeds or self.encode_prompt(negative, length)
            text, pooled = jnp.concatenate([neg_text, text]), jnp.concatenate([neg_pooled, pooled])
        latents = self.initial_latents(latents, seed, b, height, width)
        _, h, w, _ = latents.shape
        patch = self.transformer.module.config.patch_size  # the pipeline's image_seq_len for a dynamic shift
        sigmas, timesteps = sd3_schedule(num_inference_steps, self.scheduler, (h // patch) * (w // patch))
        images = self._sample(
            self.transformer_variables(),
            self.vae.params,
            latents,
            text,
            pooled,
            jnp.float32(guidance_scale),
            sigmas,
            timesteps,
            cfg=cfg,
        )
        return base.to_output(images, output)


def _encode(clip_l, clip_g, t5, t5_width, clip_l_params, clip_g_params, t5_params, ids_l, ids_g, ids_t5):
    encoder_t5 = None if t5 is None else base.Component(t5, t5_params)
    return sd3_conditioning(
        base.Component(clip_l, clip_l_params),
        ids_l,
        base.Component(clip_g, clip_g_params),
        ids_g,
        encoder_t5,
        ids_t5,
        t5_width=t5_width,
    )


def _sample(module, vae, variables, vae_params, latents, text, pooled, scale, sigmas, timesteps, *, cfg):
    def velocity(x, i):
        x = nn.with_logical_constraint(x, base.LATENTS)
        xin = jnp.concatenate([x, x]) if cfg else x
        t = jnp.broadcast_to(timesteps[i], (xin.shape[0],))  # float32, as the pipeline passes it
        v = module.apply(variables, xin, t, text, pooled)
        if not cfg:
            return v
        uncond, cond = jnp.split(v, 2)
        return uncond + scale.astype(v.dtype) * (cond - uncond)

    latents = nn.with_logical_constraint(latents, base.LATENTS)
    return base.decode(vae, vae_params, euler_sample(velocity, latents, sigmas))
