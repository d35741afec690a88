"""FluxPipeline: prompts -> images with FLUX.1 (guidance embedding, no CFG), as diffusers' FluxPipeline."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d4k_jax import sharding
from d4k_jax.diffusion.flow import FLUX_DEV, SchedulerConfig, flux_schedule
from d4k_jax.diffusion.sampler import euler_sample
from d4k_jax.pipelines import base
from d4k_jax.pipelines.conditioning import flux_conditioning
from d4k_jax.pipelines.tokenizer import Tokenizer


class FluxPipeline(base.Pipeline):
    """Components are base.Component (module, params) pairs; `from_pretrained` loads them from a pipeline
    folder (the text encoders as base.Deferred: read on first use). `scheduler` holds the schedule settings
    (the folder's scheduler_config.json; FLUX.1-dev's by default). Guidance-distilled: no negative prompt, no CFG."""

    model = "flux"
    transformer_class = "FluxTransformer2DModel"
    default_scheduler = FLUX_DEV

    def __init__(
        self,
        transformer,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer: Tokenizer,
        tokenizer_2: Tokenizer,
        scheduler: SchedulerConfig = FLUX_DEV,
    ):
        self.transformer, self.vae, self.scheduler = base.component(transformer), base.component(vae), scheduler
        self.text_encoder, self.text_encoder_2 = base.component(text_encoder), base.component(text_encoder_2)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self._sample = jax.jit(functools.partial(_sample, self.transformer.module, self.vae.module))
        self._encode = jax.jit(functools.partial(_encode, self.text_encoder.module, self.text_encoder_2.module))

    @classmethod
    def text_components(cls, path: Path, dtype: Any) -> dict[str, Any]:
        return dict(
            text_encoder=base.deferred(path, "text_encoder", dtype),
            text_encoder_2=base.deferred(path, "text_encoder_2", dtype),
            tokenizer=Tokenizer(path / "tokenizer"),
            tokenizer_2=Tokenizer(path / "tokenizer_2", 512),
        )

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512) -> tuple[jax.Array, jax.Array]:
        """(T5 hidden states [B, max_sequence_length, 4096], CLIP pooled [B, 768])."""
        if self.text_encoder is None:
            raise ValueError("the text encoders were released (release_text_encoders); reload the pipeline")
        clip_ids, t5_ids = self.tokenizer(prompts), self.tokenizer_2(prompts, max_sequence_length)
        with sharding.inactive():  # the encoders run where they were read, under whatever mesh a call samples on
            return self._encode(self.text_encoder.params, self.text_encoder_2.params, clip_ids, t5_ids)

    def release_text_encoders(self) -> None:
        """Drop the encoders' device memory (T5-XXL is 9.5 GB in bf16) after encoding, before 4K sampling."""
        self.text_encoder = self.text_encoder_2 = None

    @classmethod
    def token_geometry(cls, vae_factor: int, transformer_config: dict[str, Any]) -> tuple[int, None]:
        del transformer_config
        return 2 * vae_factor, None  # 2x2 packed latents; RoPE positions bound no side

    @property
    def factor(self) -> int:
        return 2 * self.vae.module.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.transformer.module.config.latent_channels

    def __call__(
        self,
        prompts: str | list[str],
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.5,
        seed: int = 0,
        latents: jax.Array | None = None,
        negative_prompt: str | list[str] | None = None,
        max_sequence_length: int | None = None,
        prompt_embeds: tuple[jax.Array, jax.Array] | None = None,
        output: str = "uint8",
    ) -> jax.Array:
        """Images [B, H, W, 3] uint8 (output="float": [0, 1]). `latents` [B, H/f, W/f, C] is the initial noise,
        else drawn from `seed`; `prompt_embeds` = encode_prompt(...) skips the text encoders."""
        if negative_prompt is not None:
            raise ValueError("FLUX.1 is guidance-distilled: it takes no negative_prompt (set guidance_scale)")
        prompts = base.as_prompts(prompts)
        text, pooled = prompt_embeds or self.encode_prompt(prompts, max_sequence_length or 512)
        module = self.transformer.module
        latents = self.initial_latents(latents, seed, len(prompts), height, width)
        _, h, w, _ = latents.shape
        sigmas, timesteps = flux_schedule(num_inference_steps, (h // 2) * (w // 2), self.scheduler)
        guidance = jnp.full((len(prompts),), guidance_scale, jnp.float32) if module.config.guidance_embeds else None
        images = self._sample(
            self.transformer_variables(),
            self.vae.params,
            latents,
            text,
            pooled,
            guidance,
            sigmas,
            timesteps,
        )
        return base.to_output(images, output)


def _encode(clip, t5, clip_params, t5_params, clip_ids, t5_ids):
    return flux_conditioning(base.Component(clip, clip_params), clip_ids, base.Component(t5, t5_params), t5_ids)


def _sample(module, vae, variables, vae_params, latents, text, pooled, guidance, sigmas, timesteps):
    b = latents.shape[0]

    def velocity(x, i):
        x = nn.with_logical_constraint(x, base.LATENTS)
        # as FluxPipeline: t in the latents' dtype, divided by 1000 (the transformer multiplies back)
        t = jnp.broadcast_to(timesteps[i].astype(x.dtype) / 1000, (b,))
        return module.apply(variables, x, t, text, pooled, guidance)

    latents = nn.with_logical_constraint(latents, base.LATENTS)
    return base.decode(vae, vae_params, euler_sample(velocity, latents, sigmas))
