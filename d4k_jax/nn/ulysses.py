"""Ulysses sequence parallelism for joint (text + image) attention: one image's tokens over many devices.

Outside attention every token is computed alone, so the blocks run with their tokens sharded over the mesh
axis that the logical axis "length" maps to (`sequence` in sharding.DEFAULT_RULES) and need no collective
but the parameters' FSDP gathers. Attention needs every key: inside `jax.shard_map` one all-to-all per q, k
and v trades the token sharding for a head sharding (each device then holds every token of N/n heads), the
local kernel that `dot_product_attention` picks (cuDNN, splash, chunked XLA) runs on whole sequences, and one
all-to-all trades the output back (DeepSpeed-Ulysses; xDiT's USP). Per attention and device that moves
4 x B x L x D / n elements (q, k, v, o), with no all-gather of image activations.

Text tokens (Flux: 512 or 77 T5 tokens; SD3: 77 CLIP + 256 T5 = 333):
  - when their count divides the degree they are split like the image and all-to-all'd with it (no
    redundant work; the token order of attention is irrelevant, so each device's [text, image] shard pair
    is as good as the global order);
  - otherwise they stay replicated: each device takes its heads' slice of the text q/k/v (no communication)
    and the text output is all-gathered over heads (B x T x D per attention). Only the text's per-token work
    (its projections, norms and MLP) is repeated on every device: T / (T + L / n) of a block's token work,
    14 % for SD3's 333 tokens over 8 devices at 4096² (L = 16,384). Padding the text
    instead would need a key mask in every kernel (cuDNN's and splash's fast paths take none here).

The degree must divide the heads each device holds (N / tensor): an error names the degrees that do.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from d4k_jax.nn.attention import dot_product_attention

QKV = tuple[jax.Array, jax.Array, jax.Array]  # each [B, tokens, N, K]


def sequence_axis() -> tuple[tuple[str, ...], int]:
    """The mesh axes that the logical "length" maps to under the current rules and the context mesh
    (`jax.set_mesh`), and how many ways they split: ((), 1) outside a mesh or without such a rule."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    axes = tuple(a for a in _names(nn.logical_to_mesh_axes(("length",))[0]) if mesh.shape.get(a, 1) > 1)
    return axes, math.prod(mesh.shape[a] for a in axes)


def token_axes(length: int) -> tuple[str | None, str | None, str]:
    """Logical axes of a [B, T, D] token stream: its tokens sharded over the sequence axis when T divides
    its degree, else replicated (the text of a length that does not divide; see the module docstring)."""
    return ("batch", "length" if length % sequence_axis()[1] == 0 else None, "embed")


def joint_attention(text: QKV | None, image: QKV) -> tuple[jax.Array | None, jax.Array]:
    """Softmax attention over the text then the image tokens (both attend to both): q, k, v [B, T, N, K] and
    [B, L, N, K] -> outputs [B, T, N, K] (None without text) and [B, L, N, K]. Sequence-parallel (Ulysses)
    when the context mesh shards "length"; the plain local attention otherwise."""
    axes, n = sequence_axis()
    if n == 1:
        return _attend(text, image)
    q = image[0]
    b, length, heads, _ = q.shape
    batch, head_axes = _fitting(("batch",), b), _fitting(("heads",), heads)
    if problems := degree_problems(n, heads, _size(head_axes), length, "image tokens"):
        raise ValueError(f"sequence parallelism over mesh axes {axes}: {problems[0]}")
    split_text = text is not None and text[0].shape[1] % n == 0
    token_spec = PartitionSpec(batch or None, axes, head_axes or None, None)
    text_spec = token_spec if split_text else PartitionSpec(batch or None, None, head_axes + axes, None)

    def local(text, image):
        image = tuple(_to_heads(x, axes) for x in image)
        if split_text:
            text = tuple(_to_heads(x, axes) for x in text)
        out_text, out_image = _attend(text, image)
        if split_text:
            out_text = _to_tokens(out_text, axes)
        return out_text, _to_tokens(out_image, axes)

    # Pin the layouts around the shard_map: GSPMD would otherwise meet a replicated text's head-split q/k/v (and
    # output) by splitting the projection weights that the token-split image also uses, then all-gather them
    # for the image in every block. A replicated text is projected whole and its output gathered over heads.
    text_axes = ("batch", "length" if split_text else None, "heads", None)
    pin = lambda xs, axes: tuple(nn.with_logical_constraint(x, axes) for x in xs)
    image = pin(image, ("batch", "length", "heads", None))
    text = None if text is None else pin(text, text_axes)
    text_specs = None if text is None else (text_spec,) * 3
    out_text, out_image = jax.shard_map(
        local, in_specs=(text_specs, (token_spec,) * 3), out_specs=(text_spec, token_spec)
    )(text, image)
    return None if out_text is None else nn.with_logical_constraint(out_text, text_axes), out_image


def degree_problems(degree: int, heads: int, tensor: int, tokens: int, what: str = "image token rows") -> list[str]:
    """Why `degree` ways of sequence parallelism cannot split attention of `heads` heads held `tensor` ways
    over `tokens` (image tokens, or the rows of tokens that the latents are split by); [] when they can."""
    per_device = heads // tensor if heads % tensor == 0 else heads
    if degree <= 1 or (per_device % degree == 0 and tokens % degree == 0):
        return []
    valid = [d for d in range(1, per_device + 1) if per_device % d == 0 and tokens % d == 0]
    held = f"{per_device} per device over tensor={tensor}" if tensor > 1 else "each device holds all"
    return [
        f"sequence degree {degree} must divide the {heads} attention heads ({held}) and the {tokens} {what}: "
        f"expected a sequence degree among {valid}"
    ]


def _attend(text: QKV | None, image: QKV) -> tuple[jax.Array | None, jax.Array]:
    if text is None:
        return None, dot_product_attention(*image)
    t = text[0].shape[1]
    out = dot_product_attention(*(jnp.concatenate(pair, axis=1) for pair in zip(text, image, strict=True)))
    return out[:, :t], out[:, t:]


def _to_heads(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:  # [B, L/n, N, K] -> [B, L, N/n, K]
    return lax.all_to_all(x, axes, split_axis=2, concat_axis=1, tiled=True)


def _to_tokens(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:  # [B, L, N/n, K] -> [B, L/n, N, K]
    return lax.all_to_all(x, axes, split_axis=1, concat_axis=2, tiled=True)


def _fitting(logical: tuple[str], size: int) -> tuple[str, ...]:
    """The mesh axes of one logical axis of `size`, or () when they do not divide it (it then enters the
    shard_map replicated: GSPMD gathers it, correct if redundant, e.g. an odd batch on data x fsdp)."""
    axes = _names(nn.logical_to_mesh_axes(logical)[0])
    return axes if size % _size(axes) == 0 else ()


def _size(axes: tuple[str, ...]) -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in axes)


def _names(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)
