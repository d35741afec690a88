"""Sample many images, sharded over every device:

  python -m d4k_jax.sample --config=configs/flux_wlf.py --config.pipeline=DIR --prompts=FILE --outdir=OUT

FILE is a text file (one prompt per line) or an Aesthetic-4K `metadata.jsonl` (its "text" fields).
Image k of prompt p uses seed `config.seed + p * images_per_prompt + k`, drawn per image, so the
images do not depend on the batch size or the device count. Each image is written as
OUT/{p:05d}_{k:02d}.jpg (quality 95; PNG with --config.sample.format=png) with a line in
OUT/metadata.jsonl; rerunning skips images already written. The last batch is padded to fill the mesh.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags
from PIL import Image
from tqdm import tqdm

from d4k_jax import cli, sharding
from d4k_jax.pipelines import base


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(lines, 1):
            try:
                prompts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field ({e})") from e
    else:
        prompts = lines
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def load_pipeline(c: ml_collections.ConfigDict):
    if not c.pipeline:
        raise ValueError("set --config.pipeline to a diffusers pipeline folder or a converted directory")
    if c.model == "flux":
        from d4k_jax.pipelines.flux import FluxPipeline as cls
    elif c.model == "sd3":
        from d4k_jax.pipelines.sd3 import SD3Pipeline as cls
    else:
        raise ValueError(f"config.model must be 'flux' or 'sd3', got {c.model!r}")
    return cls.from_pretrained(c.pipeline, dtype=jnp.dtype(c.dtype), vae_stride=c.vae_stride)


def run(c: ml_collections.ConfigDict, prompts_file: str, outdir: str) -> int:
    """Writes every missing image; returns how many were written."""
    s = c.sample
    prompts = read_prompts(prompts_file)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    ext = {"jpeg": "jpg", "png": "png"}[s.format]
    jobs = [(p, k) for p in range(len(prompts)) for k in range(s.images_per_prompt)]
    todo = [(p, k) for p, k in jobs if not (out / f"{p:05d}_{k:02d}.{ext}").exists()]
    if len(todo) < len(jobs):
        logging.info("resuming: %d of %d images already written", len(jobs) - len(todo), len(jobs))
    if not todo:
        return 0
    pipe = load_pipeline(c)
    devices = jax.devices()[: c.get("num_devices", 0) or None]
    mesh = sharding.make_mesh(dict(c.mesh), devices)
    batch = s.batch_size or mesh.devices.size
    if batch % mesh.devices.size:
        raise ValueError(f"batch_size {batch} must be a multiple of the {mesh.devices.size} devices")
    data = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    replicated = NamedSharding(mesh, PartitionSpec())
    pipe.transformer = (pipe.transformer[0], _place(pipe.transformer, mesh, c.get("shard_params", False)))
    pipe.vae = (pipe.vae[0], jax.device_put(pipe.vae[1], replicated))
    module = pipe.transformer[0]
    shape = base.latent_shape(1, s.height, s.width, _factor(c, pipe), _channels(c, module))[1:]
    written = 0
    with (out / "metadata.jsonl").open("a") as meta, tqdm(total=len(todo), unit="img", desc="sample") as bar:
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            padded = chunk + [chunk[-1]] * (batch - len(chunk))  # fill the mesh; the copies are not saved
            t0 = time.perf_counter()
            texts = [prompts[p] for p, _ in padded]
            seeds = [c.seed + p * s.images_per_prompt + k for p, k in padded]
            noise = jnp.concatenate([base.initial_noise(seed, (1, *shape), module.dtype) for seed in seeds])
            kwargs = dict(height=s.height, width=s.width, num_inference_steps=s.steps, guidance_scale=s.guidance)
            kwargs["prompt_embeds"] = jax.device_put(pipe.encode_prompt(texts, s.max_sequence_length), data)
            if c.model == "sd3" and s.guidance > 1:
                negative = pipe.encode_prompt([s.negative_prompt] * len(texts), s.max_sequence_length)
                kwargs["negative_prompt_embeds"] = jax.device_put(negative, data)
            images = pipe(texts, latents=jax.device_put(noise, data), **kwargs)
            if jax.process_count() > 1:  # every host gets the whole batch; host 0 writes (untested: one host here)
                from jax.experimental import multihost_utils

                images = multihost_utils.process_allgather(images, tiled=True)
            images = np.asarray(jax.device_get(images))
            if jax.process_index() != 0:
                bar.update(len(chunk))
                continue
            for (p, k), image, seed in zip(chunk, images, seeds, strict=False):
                name = f"{p:05d}_{k:02d}.{ext}"
                _save(image, out / name, s.format)
                meta.write(
                    json.dumps(
                        dict(
                            file_name=name,
                            text=prompts[p],
                            seed=seed,
                            height=s.height,
                            width=s.width,
                            steps=s.steps,
                            guidance=s.guidance,
                            model=c.model,
                        )
                    )
                    + "\n"
                )
                written += 1
            meta.flush()
            bar.update(len(chunk))
            bar.set_postfix(img_per_s=f"{len(chunk) / (time.perf_counter() - t0):.2f}")
    return written


def _place(component, mesh, shard: bool):
    """The transformer's params on the mesh: replicated, or FSDP-sharded by their logical axes
    (sharding.DEFAULT_RULES: "embed" over `fsdp`) when the model does not fit one device."""
    module, params = component
    if not shard:
        return jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    from conversion.components import kind_of_module

    abstract = jax.eval_shape(module.init, jax.random.key(0), *kind_of_module(module).init_inputs(module.config))
    return jax.device_put(params, sharding.params_sharding(mesh, sharding.DEFAULT_RULES, abstract)["params"])


def _factor(c, pipe) -> int:
    """Pixels per packed token side: the VAE's factor times the transformer's 2x2 patches."""
    return 2 * pipe.vae[0].config.downsample_factor


def _channels(c, module) -> int:
    return module.config.latent_channels if c.model == "flux" else module.config.in_channels


def _save(image: np.ndarray, path: Path, fmt: str) -> None:
    tmp = path.with_name(path.name + ".tmp")  # a crash never leaves a half-written image that resume would skip
    Image.fromarray(image).save(tmp, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    tmp.rename(path)


def main(argv):
    del argv
    if _CONFIG.value is not None and _CONFIG.value.get("distributed", False):
        jax.distributed.initialize()  # multi-host: coordinator and process ids from the environment
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (configs/flux_wlf.py or configs/sd3_wlf.py)")
    n = run(_CONFIG.value, _PROMPTS.value, _OUTDIR.value)
    logging.info("wrote %d images to %s", n, _OUTDIR.value)


if __name__ == "__main__":
    # flags are defined only when run as a program, so that tests can import several CLIs
    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/flux_wlf.py or configs/sd3_wlf.py")
    _PROMPTS = flags.DEFINE_string("prompts", None, "prompt file: .txt (one per line) or metadata.jsonl", required=True)
    _OUTDIR = flags.DEFINE_string("outdir", None, "output folder", required=True)
    cli.run(main)
