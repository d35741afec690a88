"""Evaluate a folder of images with Diffusion-4K's metrics (REFERENCE.md §5); a JSON report and a table.

Generated images (GLCM Score, Compression Ratio, FID, CLIPScore, Aesthetics; captions from
IMAGES/metadata.jsonl, which `d4k_jax.sample` writes):
  python -m d4k_jax.evaluate --images=OUT --reference=Aesthetic-4K/eval/size_2048/metadata.jsonl \
      --metrics=glcm,cr,fid,clip,aesthetics --size=2048 --fid_weights=pt_inception-2015-12-05-6726825d.safetensors \
      --clip=clip-vit-base-patch16 --aesthetic_head=sac+logos+ava1-l14-linearMSE.safetensors \
      --aesthetic_clip=clip-vit-large-patch14 --out=report.json
VAE reconstruction (paper Table 2: rFID, NMSE, PSNR, SSIM, LPIPS) of a folder of real images:
  python -m d4k_jax.evaluate --images=DIR --vae=FLUX.1-dev/vae --stride=2 --size=4096 --fid_weights=... \
      --lpips_backbone=vgg16-397923af.safetensors --lpips_heads=lpips-vgg.safetensors
Metrics whose weights are not given are reported as not computed, with the reason. The weights published as
torch pickles (.pth) are converted once with `python -m conversion.pickled FILE.pth` (same tensor names).
"""

from __future__ import annotations

import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from tqdm import tqdm

from d4k_jax import cli, files, reconstruct, sharding
from d4k_jax.io import load_component
from d4k_jax.metrics import images as image_sets
from d4k_jax.metrics import suite
from d4k_jax.metrics.compression import QUALITY
from d4k_jax.metrics.fid import FeatureStats, InceptionFeatures
from d4k_jax.metrics.weights import MissingWeights

PROTOCOL = {
    "glcm": f"REFERENCE.md §5: the image's JPEG-q{QUALITY} file (JPEG inputs measured as saved), OpenCV "
    "integer grayscale // 4, whole 64x64 patches, skimage graycomatrix (d 1-4, 4 angles, normed) + "
    "shannon_entropy, mean over patches then images",
    "cr": f"sum of H*W*3 over the sum of JPEG-q{QUALITY} file bytes (pooled over the set)",
    "fid": "torch-fidelity Inception-v3 (2015-12-05) pool3, TF1 bilinear resize to 299; real images resized "
    "(shorter side, bilinear) and centre-cropped to --size",
    "clip": "100 * cos(image, caption) clamped at 0 per image, CLIPImageProcessor preprocessing, the first 77 "
    "caption tokens (torchmetrics' cut), mean",
    "aesthetics": "LAION improved aesthetic MLP on the L2-normalised CLIP ViT-L/14 image embedding, mean",
    "rfid": "FID between the originals and their reconstructions (both at --size)",
    "nmse": "per image ||x - x_hat||^2 / ||x||^2 with x in [0, 1], mean",
    "psnr": "per image on uint8 RGB, data range 255 (skimage), mean",
    "ssim": "per image, skimage structural_similarity(data_range=255, channel_axis=-1, 7x7 uniform window), mean",
    "lpips": "lpips v0.1, spatial mean, inputs in [-1, 1], mean over images",
}


def stats_file(cache: str) -> Path:
    """The file of `--fid_reference_stats`: the name as given when it ends in .npz or exists, else with .npz
    appended (numpy's savez appends it, so `stats` is written as, and found again as, stats.npz)."""
    path = Path(cache).expanduser()
    return path if path.suffix == ".npz" or path.is_file() else path.with_name(path.name + ".npz")


def _load_stats(path: Path) -> FeatureStats:
    try:
        return FeatureStats.load(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"--fid_reference_stats={path} is not FID statistics written by d4k_jax.evaluate ({type(e).__name__}: "
            f"{e}); delete it to compute them again"
        ) from e


def reference_stats(paths: suite.Weights, reference: str, cache: str, size: int, batch_size: int, limit: int):
    """The real set's Inception statistics: loaded from `cache` if it exists, else computed (and saved
    there); None if there is no reference or no FID weights."""
    cache = stats_file(cache) if cache else None
    if cache and cache.is_file():
        logging.info("FID reference statistics from %s", cache)
        return _load_stats(cache)
    if not reference:
        return None
    try:
        net = InceptionFeatures.from_file(paths.fid)
    except MissingWeights:
        return None  # reported by the metric itself
    stats, items = FeatureStats(), image_sets.list_images(reference, limit)
    for batch in tqdm(
        image_sets.batches(items, batch_size, size), total=-(-len(items) // batch_size), desc="reference"
    ):
        stats.update(np.asarray(net(np.stack(batch.images))))
    if cache:
        tmp = cache.with_name(f".{cache.stem}.partial.npz")  # renamed when whole: a crash leaves no bad cache
        stats.save(tmp)
        os.replace(tmp, cache)
        logging.info("FID reference statistics saved to %s", cache)
    return stats


def set_size(items: list[image_sets.Item], size: int) -> tuple[int, bool]:
    """(the size images are measured at, whether the set mixes image sizes), from the file headers.
    A mixed set needs --size (every image not size² is then resized and centre-cropped to it)."""
    sizes = image_sets.header_sizes(items)
    if not sizes:
        raise ValueError(f"none of the {len(items)} images can be read (the first: {items[0].path})")
    (first, hw), other = sizes[0], next(((it, s) for it, s in sizes if s != sizes[0][1]), None)
    if other and not size:
        raise ValueError(
            f"images of different sizes: {first.path} is {hw[0]}x{hw[1]}, {other[0].path} is "
            f"{other[1][0]}x{other[1][1]}; pass --size=S to resize and centre-crop every image to SxS"
        )
    return size or min(hw), other is not None


def check_out(path: str | os.PathLike) -> Path:
    """The report's path, checked before any work: not a folder, in a folder that exists (made if missing)
    and takes a new file."""
    out = Path(path).expanduser()
    if not str(path):
        raise ValueError("--out is empty; expected the path of the JSON report, e.g. --out=report.json")
    if out.is_dir():
        raise IsADirectoryError(
            f"--out={path} is a folder; expected the path of a JSON file, e.g. {out / 'report.json'}"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".check"):
            pass
    except (FileExistsError, NotADirectoryError) as e:
        raise NotADirectoryError(f"--out={path}: {e.filename} is a file, expected a folder to hold the report") from e
    except PermissionError as e:
        raise PermissionError(f"--out={path}: cannot write in {out.parent} ({e.strerror})") from e
    return out


def _check_request(metrics: list[str], batch_size: int) -> None:
    wrong = []
    unknown = sorted(set(metrics) - set(suite.GENERATION) - set(suite.RECONSTRUCTION))
    if unknown:
        wrong.append(f"unknown metrics {unknown} (known: {', '.join(suite.GENERATION + suite.RECONSTRUCTION)})")
    if batch_size < 1:
        wrong.append(f"--batch_size={batch_size} (expected 1 or more)")
    if wrong:
        raise ValueError("; ".join(wrong))


def evaluate(
    images: str,
    metrics: list[str],
    paths: suite.Weights,
    *,
    reference: str = "",
    reference_cache: str = "",
    size: int = 0,
    batch_size: int = 8,
    limit: int = 0,
    vae: str = "",
    stride: int = 2,
    vae_dtype: str = "bfloat16",
    sample_posterior: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Runs the metrics over `images` (streamed); returns the report written by the CLI."""
    t0 = time.perf_counter()
    _check_request(metrics, batch_size)
    items = image_sets.list_images(images, limit)
    # without --size: the generated images' own size, every real image is cropped to it
    size, mixed = set_size(items, size)
    if vae:  # before the reference pass: a bad VAE path fails now
        roundtrip, params = _vae_roundtrip(vae, stride, vae_dtype, sample_posterior)
    stats = None
    if "fid" in metrics:
        stats = reference_stats(paths, reference, reference_cache, size, batch_size, limit)
    acc = suite.Metrics(metrics, paths, stats)
    total = -(-len(items) // batch_size)
    seen = 0
    if vae:
        key = jax.random.key(seed)
        for i, batch in enumerate(tqdm(image_sets.batches(items, batch_size, size), total=total, desc="reconstruct")):
            x = np.stack(batch.images)
            acc.update_pairs(x, roundtrip(params, x, jax.random.fold_in(key, i)))
            seen += len(x)
    else:
        # a generated set is measured at its own size; only a mixed one is brought to --size
        read = image_sets.batches(items, batch_size, size if mixed else 0, keep_jpeg=True)
        for batch in tqdm(read, total=total, desc="evaluate"):
            acc.update(batch.images, [it.caption for it in batch.items], batch.jpeg)
            seen += len(batch.images)
    if not seen:
        raise ValueError(f"none of the {len(items)} images of {images} can be read (the first: {items[0].path})")
    protocol = {m: PROTOCOL[m] for m in metrics}
    if vae:
        protocol["vae"] = f"{vae}, stride {stride}, {vae_dtype}, posterior {'sample' if sample_posterior else 'mean'}"
    return {
        "images": str(images),
        "count": seen,
        "skipped_unreadable": len(items) - seen,
        "size": size,
        "metrics": acc.result(),
        "protocol": protocol,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _vae_roundtrip(path: str, stride: int, dtype: str, sample_posterior: bool):
    module, params = load_component(path, dtype=jnp.dtype(dtype), stride=stride)
    mesh = sharding.make_mesh({"data": 1, "sequence": -1})
    return reconstruct.roundtrip_fn(module, mesh, sample_posterior), params


def table(report: dict[str, Any]) -> str:
    rows = [f"{'metric':12s} {'value':>10s}  images"]
    for name, r in report["metrics"].items():
        if "value" in r:
            rows.append(f"{name:12s} {r['value']:10.4f}  {r['count']}")
        else:
            rows.append(f"{name:12s} {'-':>10s}  not computed: {r['not_computed']}")
    return "\n".join(rows)


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    metrics = (
        [m for m in f.metrics.split(",") if m]
        if f.metrics
        else list(suite.RECONSTRUCTION if f.vae else suite.GENERATION)
    )
    out = check_out(f.out)
    paths = suite.Weights(
        f.fid_weights, f.clip, f.aesthetic_head, f.aesthetic_clip, f.lpips_backbone, f.lpips_heads, f.lpips_net
    )
    report = evaluate(
        f.images, metrics, paths, reference=f.reference, reference_cache=f.fid_reference_stats, size=f.size,
        batch_size=f.batch_size, limit=f.limit, vae=f.vae, stride=f.stride, vae_dtype=f.vae_dtype,
        sample_posterior=f.sample_posterior, seed=f.seed,
    )  # fmt: skip
    files.write_json(out, report)
    print(table(report))
    print(f"{report['count']} images ({report['skipped_unreadable']} unreadable skipped); report: {out}")


if __name__ == "__main__":
    flags.DEFINE_string(
        "images", None, "folder of images (captions from its metadata.jsonl) or a metadata.jsonl", required=True
    )
    flags.DEFINE_string("reference", "", "real images for FID: a folder or an Aesthetic-4K metadata.jsonl")
    flags.DEFINE_string(
        "fid_reference_stats", "", ".npz cache of the reference's Inception statistics (.npz appended if missing)"
    )
    flags.DEFINE_string(
        "metrics",
        "",
        f"comma list; default {','.join(suite.GENERATION)} (with --vae: {','.join(suite.RECONSTRUCTION)})",
    )
    flags.DEFINE_integer(
        "size",
        0,
        "real / reconstructed images (and generated ones of a set that mixes sizes) are resized and centre-cropped "
        "to size²; 0: the images' own (all of one size)",
    )
    flags.DEFINE_integer("batch_size", 8, "images per batch")
    flags.DEFINE_integer("limit", 0, "use only the first N images (0: all)")
    flags.DEFINE_string("out", "eval_report.json", "JSON report (its folder is made if missing)")
    flags.DEFINE_string(
        "fid_weights", "", "torch-fidelity's pt_inception-2015-12-05-6726825d.pth, converted to .safetensors"
    )
    flags.DEFINE_string("clip", "", "CLIP ViT-B/16 transformers folder (CLIPScore)")
    flags.DEFINE_string("aesthetic_head", "", "sac+logos+ava1-l14-linearMSE.pth converted to .safetensors")
    flags.DEFINE_string("aesthetic_clip", "", "CLIP ViT-L/14 transformers folder (Aesthetics)")
    flags.DEFINE_string("lpips_backbone", "", "torchvision vgg16 / alexnet state dict as .safetensors (LPIPS)")
    flags.DEFINE_string("lpips_heads", "", "lpips v0.1 linear heads (lpips/weights/v0.1/vgg.pth as .safetensors)")
    flags.DEFINE_string("lpips_net", "vgg", "vgg or alex")
    flags.DEFINE_string("vae", "", "VAE folder: run the reconstruction protocol on --images")
    flags.DEFINE_integer("stride", 2, "2: the F16 VAE of Diffusion-4K; 1: the stock F8 VAE")
    flags.DEFINE_string("vae_dtype", "bfloat16", "VAE compute dtype")
    flags.DEFINE_boolean("sample_posterior", False, "decode a posterior sample instead of the mean")
    flags.DEFINE_integer("seed", 0, "posterior sampling seed")
    cli.run(main, config_flag=None)
