"""FID (REFERENCE.md §5): torch-fidelity's Inception pool3 features, streaming statistics, Fréchet distance.

    net = InceptionFeatures.from_file(flags.fid_weights)
    real, fake = FeatureStats(), FeatureStats()
    for batch in real_batches: real.update(net(batch))   # uint8 [B, H, W, 3]
    ...
    score = fid(real, fake)

Everything after the network is float64 numpy: covariances of 2048-d features lose digits in float32,
and the runtime has no scipy, so the matrix square root is done with symmetric eigendecompositions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d4k_jax.io.metric_nets import load_inception
from d4k_jax.metrics import weights
from d4k_jax.models.inception import FEATURES, INPUT_SIZE, InceptionV3, resize_bilinear_tf1

WEIGHTS_NAME = "the FID Inception weights (pt_inception-2015-12-05-6726825d.pth)"
WEIGHTS_FLAG = "--fid_weights"


class InceptionFeatures:
    """images [B, H, W, 3] (uint8, or float in [0, 255]) -> pool3 features [B, 2048] float32.

    With `batch_size`, the network always sees batches of exactly that many images (the last one padded by
    repeating its final image, whose features are dropped): one program for a whole set, whatever its last batch
    or the share of it a process reads."""

    def __init__(self, module: InceptionV3, variables: Any, batch_size: int | None = None):
        self.module, self.variables, self.batch_size = module, variables, batch_size
        # Two programs: the resize compiles per input size (cheap), the network only once per batch
        # size, because it always sees 299x299 (the model skips its own resize at that size).
        self._resize = jax.jit(resize_bilinear_tf1, static_argnames="size")
        self._net = jax.jit(module.apply)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike | None, *, dtype: Any = jnp.float32, batch_size: int | None = None
    ) -> InceptionFeatures:
        """Load torch-fidelity's weights as safetensors (`python -m conversion.pickled` converts its .pth once);
        MissingWeights if unset or absent."""
        file = weights.require(path, WEIGHTS_NAME, WEIGHTS_FLAG)

        return cls(*load_inception(file, dtype=dtype), batch_size=batch_size)

    def __call__(self, images: Any) -> jax.Array:
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"FID features expect images [B, H, W, 3] in [0, 255], got shape {images.shape}")
        if not self.batch_size:
            return self._features(images)
        n, size = len(images), self.batch_size
        chunks = [images[i : i + size] for i in range(0, n, size)]
        chunks[-1] = jnp.concatenate([chunks[-1], jnp.repeat(chunks[-1][-1:], size - len(chunks[-1]), axis=0)])
        return jnp.concatenate([self._features(c) for c in chunks])[:n]

    def _features(self, images: jax.Array) -> jax.Array:
        x = self._resize(images, size=(INPUT_SIZE, INPUT_SIZE))
        return self._net(self.variables, x)


class FeatureStats:
    """Running sum and sum of outer products (float64) of feature vectors: mean and covariance of a set
    too large to hold, e.g. the features of thousands of 4K images, accumulated batch by batch."""

    def __init__(self, dim: int = FEATURES):
        self.count = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, features: Any) -> None:
        """Add features [N, dim]."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.sum.shape[0]:
            raise ValueError(f"features must be [N, {self.sum.shape[0]}], got shape {f.shape}")
        self.count += f.shape[0]
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance, as `np.cov(features, rowvar=False)`."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, have {self.count}")
        mu = self.mean
        return (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)

    def save(self, path: str | os.PathLike) -> None:
        np.savez(Path(path), count=self.count, sum=self.sum, outer=self.outer)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        with np.load(Path(path)) as z:
            stats = cls(z["sum"].shape[0])
            stats.count, stats.sum, stats.outer = (
                int(z["count"]),
                z["sum"].astype(np.float64),
                z["outer"].astype(np.float64),
            )
        return stats


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; round-off negative eigenvalues count as 0."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||² + Tr(S1) + Tr(S2) - 2 Tr sqrtm(S1 S2) of two Gaussians, in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if not (mu1.shape == mu2.shape and s1.shape == s2.shape == mu1.shape * 2):
        raise ValueError(f"shapes do not match: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    # S1 S2 = R (R S2 R) R^-1 with R = sqrt(S1): S1 S2 is similar to the symmetric PSD M = R S2 R, so
    # its eigenvalues are M's (real, >= 0) and Tr sqrtm(S1 S2) = sum sqrt(eig(M)). This holds for
    # singular S1 too (by continuity), and eigh of a symmetric matrix is stable where scipy's sqrtm of
    # the non-symmetric S1 S2 can return complex round-off.
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid(stats_a: FeatureStats, stats_b: FeatureStats) -> float:
    """The Fréchet Inception Distance between two accumulated feature sets."""
    return frechet_distance(stats_a.mean, stats_a.cov, stats_b.mean, stats_b.cov)
