"""d4k_jax: Diffusion-4K (SD3 / FLUX.1 at 4096x4096, F16 VAE, wavelet loss) in JAX/Flax."""

__version__ = "0.1.0"
