"""VAE round trip: `python -m d4k_jax.reconstruct --config=configs/vae_recon.py[:tiny] --workdir=DIR`.

Encodes each image (demo set or a folder), decodes it, and writes `DIR/recon_XXXX.png` (original left,
reconstruction right) and `DIR/metrics.json` (PSNR per image and mean). Activations are sharded over all
devices by image rows, which is what bounds memory at 4096².
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags
from PIL import Image
from tqdm import tqdm

from d4k_jax import cli, sharding
from d4k_jax.data.demo import demo_examples
from d4k_jax.metrics.images import IMAGE_SUFFIXES, center_crop
from d4k_jax.models import vae as vae_lib

SPATIAL = ("batch", "height", "width", "channels")


def load_vae(c: ml_collections.ConfigDict):
    dtype = jnp.dtype(c.dtype)
    if c.random_vae.enabled:
        cfg = vae_lib.VAEConfig(
            block_out_channels=tuple(c.random_vae.block_out_channels),
            layers_per_block=c.random_vae.layers_per_block,
            norm_num_groups=c.random_vae.norm_num_groups,
            stride=c.stride,
            shifted_tail=c.shifted_tail,
        )
        module = vae_lib.AutoencoderKL(cfg, dtype=dtype)
        s = cfg.downsample_factor
        params = jax.jit(module.init)(jax.random.key(c.seed), jnp.zeros((1, s, s, 3)))["params"]
        logging.warning("random VAE weights (config random_vae.enabled): reconstructions are noise")
        return module, nn.unbox(params)
    if not c.vae_path:
        raise ValueError("set --config.vae_path to a diffusers vae folder (or use configs/vae_recon.py:tiny)")
    from conversion import load_component  # torch-free

    return load_component(c.vae_path, dtype=dtype, stride=c.stride, shifted_tail=c.shifted_tail)


def load_images(c: ml_collections.ConfigDict) -> list[tuple[str, np.ndarray]]:
    if not c.images:
        return [(f"demo_{i:04d}", img) for i, (img, _) in enumerate(demo_examples(c.num_images, c.image_size, c.seed))]
    folder = Path(c.images)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--config.images={folder}: no images ({sorted(IMAGE_SUFFIXES)})")
    out, skipped = [], 0
    for f in files[: c.num_images]:
        try:
            out.append((f.stem, center_crop(Image.open(f), c.image_size)))
        except OSError as e:
            skipped += 1
            logging.warning("skipping unreadable image %s: %s", f, e)
    if skipped:
        logging.warning("skipped %d unreadable images of %d", skipped, len(files[: c.num_images]))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def roundtrip_fn(module: vae_lib.AutoencoderKL, mesh, sample_posterior: bool):
    """(params, uint8 images [B, S, S, 3], key) -> uint8 reconstructions: encode, the posterior mean (or a
    sample), decode, in the module's dtype, every activation's rows sharded over `mesh`'s devices."""

    def roundtrip(p, x, key):
        mean, logvar = module.apply({"params": p}, x, method="encode")
        z = vae_lib.sample_posterior(key, mean, logvar) if sample_posterior else mean
        y = module.apply({"params": p}, z, method="decode").astype(jnp.float32)
        return jnp.clip((y + 1.0) * 127.5, 0, 255).round().astype(jnp.uint8)

    fn = sharding.sharded(roundtrip, mesh, sharding.DEFAULT_RULES, (None, SPATIAL, None), SPATIAL)

    def run(params, images: np.ndarray, key: jax.Array) -> np.ndarray:
        x = jnp.asarray(np.asarray(images, np.float32) / 127.5 - 1.0, module.dtype)
        return np.asarray(fn(params, x, key))

    return run


def run(c: ml_collections.ConfigDict, workdir: str) -> dict:
    module, params = load_vae(c)
    factor = module.config.downsample_factor
    if c.image_size % factor:
        raise ValueError(f"image_size {c.image_size} must be divisible by the VAE's factor {factor}")
    fn = roundtrip_fn(module, sharding.make_mesh(dict(c.mesh)), c.sample_posterior)
    images = load_images(c)
    out_dir = Path(workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = {}
    key = jax.random.key(c.seed)
    for start in tqdm(range(0, len(images), c.batch_size), desc="reconstruct", unit="batch"):
        batch = images[start : start + c.batch_size]
        y = fn(params, np.stack([img for _, img in batch]), jax.random.fold_in(key, start))
        for (name, img), rec in zip(batch, y, strict=True):
            Image.fromarray(np.concatenate([img, rec], axis=1)).save(out_dir / f"recon_{name}.png")
            scores[name] = psnr(img, rec)
    report = {
        "psnr": scores,
        "mean_psnr": float(np.mean(list(scores.values()))),
        "vae": dataclasses.asdict(module.config),
        "random_weights": bool(c.random_vae.enabled),
        "protocol": "PSNR on uint8 RGB in [0, 255]; posterior " + ("sample" if c.sample_posterior else "mean"),
    }
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    logging.info("wrote %d reconstructions to %s; mean PSNR %.2f dB", len(scores), out_dir, report["mean_psnr"])
    return report


def main(argv):
    del argv
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    # flags are defined only when run as a program, so that tests can import several CLIs
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/vae_recon.py", "reconstruction config")
    _WORKDIR = flags.DEFINE_string("workdir", None, "output folder", required=True)
    cli.run(main)
