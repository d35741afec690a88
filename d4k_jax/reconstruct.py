"""VAE round trip: `python -m d4k_jax.reconstruct --config=configs/vae_recon.py[:tiny] --workdir=DIR`.

Encodes each image (demo set or a folder), decodes it, and writes original left, reconstruction right, as
`DIR/recon_demo_XXXX.png` (demo set) or, for FOLDER/sub/x.jpg, `DIR/sub/recon_x.jpg.png` (named by the
relative path, so that same-named files of different subfolders or suffixes never overwrite each other),
and `DIR/metrics.json` (PSNR per image, keyed by that relative path, and their mean; standard JSON: an
infinite PSNR, identical images, is null). Activations are sharded over all devices by image rows, which
is what bounds memory at 4096². The image size is checked against the VAE's config.json before any weight loads.
"""

from __future__ import annotations

import dataclasses
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

from d4k_jax import cli, distributed, files, sharding
from d4k_jax.data.demo import demo_examples
from d4k_jax.io import load_component, load_config
from d4k_jax.metrics import recon
from d4k_jax.metrics.images import IMAGE_SUFFIXES, center_crop
from d4k_jax.models import vae as vae_lib
from d4k_jax.models.vae_keys import config_from_diffusers

SPATIAL = ("batch", "height", "width", "channels")


def load_vae(c: ml_collections.ConfigDict):
    dtype = jnp.dtype(c.dtype)
    if c.random_vae.enabled:
        cfg = vae_config(c)
        module = vae_lib.AutoencoderKL(cfg, dtype=dtype)
        s = cfg.downsample_factor
        params = jax.jit(module.init)(jax.random.key(c.seed), jnp.zeros((1, s, s, 3)))["params"]
        logging.warning("random VAE weights (config random_vae.enabled): reconstructions are noise")
        return module, nn.unbox(params)
    if not c.vae_path:
        raise ValueError("set --config.vae_path to a diffusers vae folder (or use configs/vae_recon.py:tiny)")
    return load_component(c.vae_path, dtype=dtype, stride=c.stride, shifted_tail=c.shifted_tail)


def vae_config(c: ml_collections.ConfigDict) -> vae_lib.VAEConfig:
    """The VAE's config, from config.json (or the random_vae fields): no weights read."""
    if c.random_vae.enabled:
        return vae_lib.VAEConfig(
            block_out_channels=tuple(c.random_vae.block_out_channels),
            layers_per_block=c.random_vae.layers_per_block,
            norm_num_groups=c.random_vae.norm_num_groups,
            stride=c.stride,
            shifted_tail=c.shifted_tail,
        )
    if not c.vae_path:
        raise ValueError("set --config.vae_path to a diffusers vae folder (or use configs/vae_recon.py:tiny)")
    return config_from_diffusers(load_config(c.vae_path, stride=c.stride, shifted_tail=c.shifted_tail))


def validate(c: ml_collections.ConfigDict) -> None:
    """Everything checkable before the weights load; one ValueError lists every problem."""
    problems = []
    try:
        factor = vae_config(c).downsample_factor
    except (ValueError, FileNotFoundError) as e:
        problems.append(str(e))
        factor = 1
    if c.image_size < 1 or c.image_size % factor:
        problems.append(f"--config.image_size={c.image_size} is not a positive multiple of the VAE's factor {factor}")
    for name in ("num_images", "batch_size"):
        if c[name] < 1:
            problems.append(f"--config.{name}={c[name]} must be at least 1")
    if c.images and not Path(c.images).is_dir():
        problems.append(f"--config.images={c.images} is not a folder of images")
    if problems:
        raise ValueError("; ".join(problems))


def load_images(c: ml_collections.ConfigDict) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 [S, S, 3]) pairs: the demo set, or the images of a folder named by their relative path."""
    if not c.images:
        return [(f"demo_{i:04d}", img) for i, (img, _) in enumerate(demo_examples(c.num_images, c.image_size, c.seed))]
    folder = Path(c.images)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[: c.num_images]
    if not files:
        raise FileNotFoundError(f"--config.images={folder}: no images ({sorted(IMAGE_SUFFIXES)})")
    out = []
    for f in files:
        try:
            out.append((f.relative_to(folder).as_posix(), center_crop(Image.open(f), c.image_size)))
        except (OSError, ValueError) as e:
            logging.warning("skipping unreadable image %s: %s", f, e)
    if not out:
        raise ValueError(f"--config.images={folder}: none of its {len(files)} images can be read (first: {files[0]})")
    if len(out) < len(files):
        logging.warning("skipped %d unreadable images of %d", len(files) - len(out), len(files))
    return out


def output_path(out_dir: Path, name: str) -> Path:
    """Where image `name` (a relative path, or demo_XXXX) goes: its subfolder, recon_ + its file name + .png."""
    rel = Path(name)
    return out_dir / rel.parent / f"recon_{rel.name}.png"


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
    validate(c)
    images = load_images(c)  # before the weights: an unreadable set fails now
    module, params = load_vae(c)
    fn = roundtrip_fn(module, sharding.make_mesh(dict(c.mesh)), c.sample_posterior)
    out_dir = Path(workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = {}
    key = jax.random.key(c.seed)
    for start in tqdm(range(0, len(images), c.batch_size), desc="reconstruct", unit="batch"):
        batch = images[start : start + c.batch_size]
        x = np.stack([img for _, img in batch])
        y = fn(params, x, jax.random.fold_in(key, start))
        for (name, img), rec, score in zip(batch, y, np.asarray(recon.psnr(x, y)), strict=True):
            _save(np.concatenate([img, rec], axis=1), output_path(out_dir, name))
            scores[name] = float(score)
    report = {
        "psnr": scores,
        "mean_psnr": float(np.mean(list(scores.values()))),
        "vae": dataclasses.asdict(module.config),
        "random_weights": bool(c.random_vae.enabled),
        "protocol": "PSNR on uint8 RGB in [0, 255] (null: identical images, infinite PSNR); posterior "
        + ("sample" if c.sample_posterior else "mean"),
    }
    files.write_json(out_dir / "metrics.json", report)
    logging.info("wrote %d reconstructions to %s; mean PSNR %.2f dB", len(scores), out_dir, report["mean_psnr"])
    return report


def _save(image: np.ndarray, path: Path) -> None:
    """A PNG written whole or not at all (a full disk leaves no half image under the name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.replaced(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def main(argv):
    del argv
    distributed.initialize(_CONFIG.value.get("distributed"))  # before anything touches a device
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    # flags are defined only when run as a program, so that tests can import several CLIs
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/vae_recon.py", "reconstruction config")
    _WORKDIR = flags.DEFINE_string("workdir", None, "output folder", required=True)
    cli.run(main)
