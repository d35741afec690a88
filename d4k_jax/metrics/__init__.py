"""Diffusion-4K's evaluation metrics with the reference's semantics (REFERENCE.md §5).

Detail metrics need no weights: `glcm_score`, `compression_ratio`. Network metrics load user-supplied
weights and raise `MissingWeights` (reported as "not computed") when they are not configured.
"""

from d4k_jax.metrics.aesthetic import Aesthetics
from d4k_jax.metrics.clip_score import CLIPScore
from d4k_jax.metrics.compression import CompressionRatio, compression_ratio, jpeg_round_trip
from d4k_jax.metrics.fid import FeatureStats, InceptionFeatures, fid, frechet_distance
from d4k_jax.metrics.glcm import glcm_score, glcm_scores
from d4k_jax.metrics.lpips import LPIPSMetric
from d4k_jax.metrics.recon import nmse, psnr, ssim
from d4k_jax.metrics.suite import GENERATION, RECONSTRUCTION, Metrics, Weights
from d4k_jax.metrics.weights import MissingWeights

__all__ = [
    "GENERATION",
    "RECONSTRUCTION",
    "Aesthetics",
    "CLIPScore",
    "CompressionRatio",
    "FeatureStats",
    "InceptionFeatures",
    "LPIPSMetric",
    "Metrics",
    "MissingWeights",
    "Weights",
    "compression_ratio",
    "fid",
    "frechet_distance",
    "glcm_score",
    "glcm_scores",
    "jpeg_round_trip",
    "nmse",
    "psnr",
    "ssim",
]
