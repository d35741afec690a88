"""Text conditioning as the diffusers pipelines build it, from token ids and the Flax text encoders.

Flux: T5 last hidden state [B, T5, 4096] and CLIP-L pooler_output [B, 768].
SD3: CLIP-L and CLIP-G penultimate hidden states concatenated on features (768 + 1280), zero-padded to
the T5 width, then T5's last hidden state appended on the sequence -> [B, 77 + T5, 4096]; pooled =
CLIP-L and CLIP-G text_embeds concatenated [B, 2048]. Like the pipelines, no attention mask is passed.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Encoder = tuple[nn.Module, Any]  # a base.Component or a plain (module, params) pair


def _apply(encoder: Encoder, ids: jax.Array) -> Any:
    module, params = encoder
    return module.apply({"params": params}, ids)


def flux_conditioning(
    clip: Encoder, clip_ids: jax.Array, t5: Encoder, t5_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(encoder_hidden_states [B, T, D_t5], pooled_projections [B, D_clip])."""
    pooled = _apply(clip, clip_ids).pooler_output
    text = _apply(t5, t5_ids).last_hidden_state
    return text, pooled


def sd3_conditioning(
    clip_l: Encoder,
    clip_l_ids: jax.Array,
    clip_g: Encoder,
    clip_g_ids: jax.Array,
    t5: Encoder | None,
    t5_ids: jax.Array | None,
    *,
    clip_skip: int | None = None,
    t5_width: int = 4096,
) -> tuple[jax.Array, jax.Array]:
    """(encoder_hidden_states [B, 77 + T, t5_width], pooled_projections [B, 2048]). Without T5 (t5=None)
    its part is zeros of `t5_ids.shape[1]` tokens (256 when t5_ids is None), as the pipeline does."""
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    hidden, pooled = [], []
    for encoder, ids in ((clip_l, clip_l_ids), (clip_g, clip_g_ids)):
        out = _apply(encoder, ids)
        if out.text_embeds is None:
            raise ValueError("SD3 needs CLIPTextModelWithProjection encoders (their text_embeds are the pooled input)")
        hidden.append(out.hidden_states[layer])
        pooled.append(out.text_embeds)
    clip = jnp.concatenate(hidden, axis=-1)  # [B, 77, 768 + 1280]
    if t5 is None:
        length = 256 if t5_ids is None else t5_ids.shape[1]
        t5_hidden = jnp.zeros((clip.shape[0], length, t5_width), clip.dtype)
    else:
        t5_hidden = _apply(t5, t5_ids).last_hidden_state
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5_hidden.shape[-1] - clip.shape[-1])))
    return jnp.concatenate([clip, t5_hidden.astype(clip.dtype)], axis=1), jnp.concatenate(pooled, axis=-1)
