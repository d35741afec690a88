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
Across processes (`--distributed.coordinator_address=HOST:PORT --distributed.num_processes=N
--distributed.process_id=I`, or `python -m tools.launch --prefix=distributed. -- python -m d4k_jax.evaluate ...`)
each process measures one share of the set, the sums are added across processes (metrics/across.py) and process 0
writes the report. Metrics whose weights are not given are reported as not computed, with the reason. The
weights published as torch pickles (.pth) are converted once with `python -m conversion.pickled FILE.pth` (same
tensor names).
"""

from __future__ import annotations

import contextlib
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
from jax.experimental import multihost_utils
from tqdm import tqdm

from d4k_jax import cli, distributed, files, reconstruct, sharding
from d4k_jax.io import load_component
from d4k_jax.metrics import across, suite
from d4k_jax.metrics import images as image_sets
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


def reference_stats(
    paths: suite.Weights,
    reference: str,
    cache: str,
    size: int,
    batch_size: int,
    limit: int,
    net: InceptionFeatures | None = None,
):
    """The real set's Inception statistics: loaded from `cache` if it exists, else computed (and saved
    there); None if there is no reference or no FID weights. Across processes each measures its share of the
    set, process 0 alone writes the cache and the others wait for it; whether the cache exists is process 0's
    view (the others must see the same file: a shared filesystem)."""
    cache = stats_file(cache) if cache else None
    found = bool(cache and cache.is_file())
    if jax.process_count() > 1:
        found = bool(multihost_utils.broadcast_one_to_all(np.int32(found)))
    if found:
        if not cache.is_file():
            raise FileNotFoundError(
                f"--fid_reference_stats={cache}: process 0 has it, process {jax.process_index()} does not see it; "
                "the cache must be on a filesystem every process shares"
            )
        logging.info("FID reference statistics from %s", cache)
        return _load_stats(cache)
    if not reference:
        return None
    try:
        net = net or InceptionFeatures.from_file(paths.fid, batch_size=batch_size)
    except MissingWeights:
        return None  # reported by the metric itself
    stats, items = FeatureStats(), image_sets.list_images(reference, limit)
    mine = [items[i] for i in across.share(len(items))]
    for batch in tqdm(image_sets.batches(mine, batch_size, size), total=-(-len(mine) // batch_size), desc="reference"):
        stats.update(np.asarray(net(np.stack(batch.images))))
    stats.count = int(across.total(np.array([stats.count]))[0])
    stats.sum, stats.outer = across.total(stats.sum), across.total(stats.outer)
    if cache and jax.process_index() == 0:
        tmp = cache.with_name(f".{cache.stem}.partial.npz")  # renamed when whole: a crash leaves no bad cache
        stats.save(tmp)
        os.replace(tmp, cache)
        logging.info("FID reference statistics saved to %s", cache)
    if cache:
        sharding.sync_processes("d4k_jax.evaluate: FID reference statistics written")
    return stats


def set_size(items: list[image_sets.Item], size: int) -> tuple[int, bool]:
    """(the size images are measured at, whether the set mixes image sizes), from the file headers (each
    process reads those of its share). A mixed set needs --size (every image not size² is then resized and
    centre-cropped to it)."""
    mine = across.share(len(items))
    sizes = image_sets.header_sizes([items[i] for i in mine])
    index = {id(items[i]): i for i in mine}
    # per process: (index, height, width) of its first readable image and of its first of another size
    first = [(index[id(sizes[0][0])], *sizes[0][1])] if sizes else []
    other = [(index[id(it)], *hw) for it, hw in sizes if hw != sizes[0][1]][:1]
    found = [row for rows in across.gather_json([first, other]) for part in rows for row in part]
    if not found:
        raise ValueError(f"none of the {len(items)} images can be read (the first: {items[0].path})")
    (i, *hw), second = found[0], next(((j, *s) for j, *s in found if s != found[0][1:]), None)
    if second and not size:
        j, h, w = second
        raise ValueError(
            f"images of different sizes: {items[i].path} is {hw[0]}x{hw[1]}, {items[j].path} is {h}x{w}; pass "
            "--size=S to resize and centre-crop every image to SxS"
        )
    return size or min(hw), second is not None


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
    wrong = _request_problems(metrics, batch_size)
    if wrong:
        raise ValueError("; ".join(wrong))


def _request_problems(metrics: list[str], batch_size: int) -> list[str]:
    wrong = []
    unknown = sorted(set(metrics) - set(suite.GENERATION) - set(suite.RECONSTRUCTION))
    if unknown:
        wrong.append(f"unknown metrics {unknown} (known: {', '.join(suite.GENERATION + suite.RECONSTRUCTION)})")
    if batch_size < 1:
        wrong.append(f"--batch_size={batch_size} (expected 1 or more)")
    return wrong


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
) -> dict[str, Any] | None:
    """Runs the metrics over `images` (streamed); returns the report written by the CLI. Across processes,
    every process calls it and measures its share of the images (`batch_size` per process); process 0 returns
    the report of the whole set, the others None (the FID's matrix square roots run once)."""
    t0 = time.perf_counter()
    _check_request(metrics, batch_size)
    items = image_sets.list_images(images, limit)
    # without --size: the generated images' own size, every real image is cropped to it
    size, mixed = set_size(items, size)
    if vae:  # before the reference pass: a bad VAE path fails now
        roundtrip, params = _vae_roundtrip(vae, stride, vae_dtype, sample_posterior)
    nets = {}
    # one network (and program) for the reference and the images; missing weights are reported by the metric
    with contextlib.suppress(MissingWeights):
        if {"fid", "rfid"} & set(metrics):
            nets["fid"] = nets["rfid"] = InceptionFeatures.from_file(paths.fid, batch_size=batch_size)
    stats = None
    if "fid" in metrics:
        stats = reference_stats(paths, reference, reference_cache, size, batch_size, limit, nets.get("fid"))
    acc = suite.Metrics(metrics, paths, stats, {k: v for k, v in nets.items() if k in metrics})
    # a generated set is measured at its own size (only a mixed one is brought to --size), a VAE's input at --size
    vae_run = (roundtrip, params, jax.random.key(seed)) if vae else None
    seen = _measure(acc, items, batch_size, size if mixed or vae else 0, vae_run)
    acc.reduce_across_processes()
    seen = int(across.total(np.array([seen]))[0])
    if not seen:
        raise ValueError(f"none of the {len(items)} images of {images} can be read (the first: {items[0].path})")
    if jax.process_index() != 0:
        return None
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
        "processes": jax.process_count(),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _measure(acc: suite.Metrics, items: list[image_sets.Item], batch_size: int, size: int, vae_run) -> int:
    """Feeds this process's share of `items` to `acc` (through the VAE round trip where `vae_run` is given);
    returns the number of images read."""
    mine = across.share(len(items))
    share, seen = [items[i] for i in mine], 0
    read = image_sets.batches(share, batch_size, size, keep_jpeg=not vae_run)
    for i, batch in enumerate(tqdm(read, total=-(-len(share) // batch_size), desc="evaluate")):
        if vae_run:
            roundtrip, params, key = vae_run
            x = np.stack(batch.images)
            # one key per batch (--sample_posterior), distinct over processes; the noise depends on the split
            acc.update_pairs(x, roundtrip(params, x, jax.random.fold_in(key, mine.start + i)))
        else:
            acc.update(batch.images, [it.caption for it in batch.items], batch.jpeg)
        seen += len(batch.images)
    return seen


def _vae_roundtrip(path: str, stride: int, dtype: str, sample_posterior: bool):
    module, params = load_component(path, dtype=jnp.dtype(dtype), stride=stride)
    # each process reconstructs its own images on its own devices (image rows split over them): no process
    # waits for another's batch, and nothing but the metric sums crosses processes
    mesh = sharding.make_mesh({"data": 1, "sequence": -1}, jax.local_devices())
    return reconstruct.roundtrip_fn(module, mesh, sample_posterior), params


def table(report: dict[str, Any]) -> str:
    rows = [f"{'metric':12s} {'value':>10s}  images"]
    for name, r in report["metrics"].items():
        if "value" in r:
            rows.append(f"{name:12s} {r['value']:10.4f}  {r['count']}")
        else:
            rows.append(f"{name:12s} {'-':>10s}  not computed: {r['not_computed']}")
    return "\n".join(rows)


DISTRIBUTED = tuple(distributed.DEFAULTS)  # flags `--distributed.<name>`, as the config CLIs' fields


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    settings = {name: f[f"distributed.{name}"].value for name in DISTRIBUTED}
    metrics = (
        [m for m in f.metrics.split(",") if m]
        if f.metrics
        else list(suite.RECONSTRUCTION if f.vae else suite.GENERATION)
    )
    wrong = distributed.problems(**settings) + _request_problems(metrics, f.batch_size)
    if wrong:
        raise ValueError("; ".join(wrong))
    distributed.initialize(settings)  # before anything touches a device
    out = check_out(f.out)  # on every process: a bad --out stops them all before any work
    paths = suite.Weights(
        f.fid_weights, f.clip, f.aesthetic_head, f.aesthetic_clip, f.lpips_backbone, f.lpips_heads, f.lpips_net
    )
    report = evaluate(
        f.images, metrics, paths, reference=f.reference, reference_cache=f.fid_reference_stats, size=f.size,
        batch_size=f.batch_size, limit=f.limit, vae=f.vae, stride=f.stride, vae_dtype=f.vae_dtype,
        sample_posterior=f.sample_posterior, seed=f.seed,
    )  # fmt: skip
    if report is not None:  # process 0's
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
    help_ = {
        "coordinator_address": "HOST:PORT of process 0, for a run of several processes (each measures its share)",
        "num_processes": "the number of processes",
        "process_id": "this process, 0 to num_processes - 1",
        "auto": "take the processes from the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU)",
        "timeout_s": "seconds to wait for the coordinator",
    }
    for name, default in distributed.DEFAULTS.items():
        define = {str: flags.DEFINE_string, bool: flags.DEFINE_boolean, int: flags.DEFINE_integer}[type(default)]
        define(f"distributed.{name}", default, help_[name])
    cli.run(main, config_flag=None)
