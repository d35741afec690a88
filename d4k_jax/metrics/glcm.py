"""GLCM Score (REFERENCE.md §5), batched in JAX with the reference's exact semantics.

Per image: OpenCV's integer grayscale of the saved JPEG-q95 file, quantised to 64 levels, cut into
non-overlapping 64x64 patches. Per patch, skimage's `graycomatrix` (distances 1-4, angles 0, pi/4,
pi/2, 3pi/4, not symmetric, normed) and then skimage's `shannon_entropy` of it, which is the entropy of
the histogram of the *distinct values* in the 64x64x4x4 array, not the textbook GLCM entropy. Patch
scores are averaged per image, image scores over the set.

Distinct float64 values of a normed GLCM are distinct rationals count / pairs(offset), so instead of
sorting floats each (offset, count) maps through a static table to the id of its reduced fraction, and
the entropy comes from a histogram of ids: two scatter-adds per patch, exact and jittable. Patches are
processed `chunk` at a time, so memory stays bounded at any image size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from d4k_jax.metrics.compression import jpeg_round_trip

LEVELS = 64  # 256 gray levels // 4
PATCH = 64
DISTANCES = (1, 2, 3, 4)
ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
# skimage's offset for (angle, distance): (round(sin(a) d), round(cos(a) d)) in (rows, cols); at pi/4
# distances 1 and 2 both round to (1, 1), which skimage counts twice, and so does this.
OFFSETS = tuple((round(math.sin(a) * d), round(math.cos(a) * d)) for a in ANGLES for d in DISTANCES)


@functools.cache
def _fraction_ids() -> tuple[np.ndarray, int]:
    """[offsets, PATCH² + 1] int32: id of the reduced fraction count / pairs(offset); and the number of ids."""
    ids: dict[tuple[int, int], int] = {}
    table = np.zeros((len(OFFSETS), PATCH * PATCH + 1), np.int32)
    for s, (dr, dc) in enumerate(OFFSETS):
        pairs = (PATCH - abs(dr)) * (PATCH - abs(dc))
        for c in range(pairs + 1):
            g = math.gcd(c, pairs)
            table[s, c] = ids.setdefault((c // g, pairs // g), len(ids))
    return table, len(ids)


def opencv_gray(rgb: jax.Array) -> jax.Array:
    """OpenCV's `cvtColor(BGR2GRAY)` of uint8 RGB [..., 3]: its 15-bit fixed point, exactly."""
    r, g, b = (rgb[..., i].astype(jnp.int32) for i in range(3))
    return ((9798 * r + 19235 * g + 3735 * b + 16384) >> 15).astype(jnp.uint8)


def _patch_entropies(patches: jax.Array) -> jax.Array:
    """[P, 64, 64] int32 levels -> [P] skimage shannon_entropy(graycomatrix(patch, normed=True))."""
    table, n_ids = _fraction_ids()
    n = patches.shape[0]
    base = jnp.arange(n)[:, None]
    ids = []
    for s, (dr, dc) in enumerate(OFFSETS):
        rows, cols = slice(max(0, -dr), PATCH - max(0, dr)), slice(max(0, -dc), PATCH - max(0, dc))
        a = patches[:, rows, cols]  # [P, h, w] the pixel
        b = patches[:, rows.start + dr : rows.stop + dr, cols.start + dc : cols.stop + dc]  # its neighbour
        pair = (base * LEVELS * LEVELS + (a * LEVELS + b).reshape(n, -1)).ravel()
        counts = jnp.zeros(n * LEVELS * LEVELS, jnp.int32).at[pair].add(1, indices_are_sorted=False)
        ids.append(jnp.asarray(table[s])[counts.reshape(n, -1)])  # [P, 64²]
    ids = jnp.concatenate(ids, axis=1)  # [P, 64² x offsets]: every entry of the GLCM array
    hist = jnp.zeros(n * n_ids, jnp.int32).at[(base * n_ids + ids).ravel()].add(1).reshape(n, n_ids)
    p = hist.astype(jnp.float32) / ids.shape[1]
    # -sum p log2 p term by term (0 log 0 = 0): log2(T) - sum(m log2 m) / T cancels for flat patches
    return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1)), 0), axis=1)


@functools.partial(jax.jit, static_argnames="chunk")
def glcm_scores_gray(gray: jax.Array, chunk: int = 256) -> jax.Array:
    """uint8 grayscale [B, H, W] -> [B] float32 image scores (mean over the whole 64x64 patches; a border
    narrower than a patch is left out, as cutting into whole patches does)."""
    b, h, w = gray.shape
    if h < PATCH or w < PATCH:
        raise ValueError(f"images of {h}x{w} hold no {PATCH}x{PATCH} patch")
    ph, pw = h // PATCH, w // PATCH
    levels = gray[:, : ph * PATCH, : pw * PATCH].astype(jnp.int32) // (256 // LEVELS)
    patches = levels.reshape(b, ph, PATCH, pw, PATCH).transpose(0, 1, 3, 2, 4).reshape(-1, PATCH, PATCH)
    n = patches.shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk
    patches = jnp.pad(patches, ((0, pad), (0, 0), (0, 0)))
    entropies = jax.lax.map(_patch_entropies, patches.reshape(-1, chunk, PATCH, PATCH)).reshape(-1)[:n]
    return entropies.reshape(b, ph * pw).mean(axis=1)


def glcm_scores(images: Iterable[np.ndarray], jpeg: bool = True) -> np.ndarray:
    """[N] GLCM scores of uint8 RGB images [H, W, 3], each read back from its JPEG-q95 file first (as
    the reference measures saved files; `jpeg=False` scores the pixels as given)."""
    scores = []
    for image in images:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected uint8 RGB images [H, W, 3], got {image.dtype} {image.shape}")
        if jpeg:
            image = jpeg_round_trip(image)[0]
        scores.append(glcm_scores_gray(opencv_gray(jnp.asarray(image))[None])[0])
    return np.asarray(jax.device_get(scores), np.float64)


def glcm_score(images: np.ndarray | Iterable[np.ndarray], jpeg: bool = True) -> float:
    """REFERENCE.md §5 GLCM Score of uint8 images [N, S, S, 3]: the mean image score. Higher = more texture."""
    scores = glcm_scores(images, jpeg)
    if not len(scores):
        raise ValueError("GLCM score of no images")
    return float(scores.mean())
