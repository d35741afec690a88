"""Sample many images, sharded over every device:

  python -m d4k_jax.sample --config=configs/flux_wlf.py --config.pipeline=DIR --prompts=FILE --outdir=OUT

FILE is a text file (one prompt per line) or an Aesthetic-4K `metadata.jsonl` (its "text" fields).
Image k of prompt p uses seed `config.seed + p * images_per_prompt + k`, drawn per image, so the
images do not depend on the batch size or the device count. Each image is written as
OUT/{p:05d}_{k:02d}.jpg (quality 95; PNG with --config.sample.format=png) with a line in
OUT/metadata.jsonl. The last batch is padded to fill the mesh.

Everything that can be checked without weights (sizes against the pipeline's config.json files, format,
prompt file, batch against the devices) is checked before the weights load, and reported all at once.

Resume. OUT/settings.json, written before the first image, holds what decides the images (pipeline,
model, seed, size, steps, guidance, ...): a rerun into OUT with other settings is refused, naming them.
An image counts as written when its metadata line is: the image is saved first (to a temporary name,
then renamed), its line appended after. A crash in between leaves an image without a line, which the
rerun makes again (the same image: same seed); a half-written last line is dropped on resume.
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

from d4k_jax import cli, distributed, files, sharding
from d4k_jax.pipelines import PIPELINES, base, pipeline_class

SETTINGS = "settings.json"
METADATA = "metadata.jsonl"
FORMATS = {"jpeg": "jpg", "png": "png"}


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


def pipeline_geometry(path: str | Path, model: str, vae_stride: int | None) -> tuple[int, int | None]:
    """(pixels per latent token side, the largest image side in pixels or None), read from the pipeline's
    vae/ and transformer/ config.json (no weights): base.Pipeline.geometry of the model's pipeline."""
    return pipeline_class(model).geometry(path, vae_stride)


def size_problems(height, width, factor: int, largest: int | None) -> list[str]:
    """What is wrong with an image size for a pipeline of this factor and largest side."""
    problems = []
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % factor:
            problems.append(f"config.sample.{name}={v} is not a positive multiple of {factor} (this pipeline's factor)")
        elif largest is not None and v > largest:
            problems.append(
                f"config.sample.{name}={v} exceeds the transformer's position table: at most {largest} pixels "
                "(pos_embed_max_size x patch size x the VAE's factor)"
            )
    return problems


def _settings_problems(c: ml_collections.ConfigDict) -> list[str]:
    s, problems = c.sample, []
    if c.model not in PIPELINES:
        problems.append(f"config.model={c.model!r} is not one of {sorted(PIPELINES)}")
    if s.format not in FORMATS:
        problems.append(f"config.sample.format={s.format!r} is not one of {sorted(FORMATS)}")
    for name in ("steps", "images_per_prompt", "max_sequence_length"):
        if s[name] < 1:
            problems.append(f"config.sample.{name}={s[name]} must be at least 1")
    try:
        jnp.dtype(c.dtype)
    except TypeError:
        problems.append(f"config.dtype={c.dtype!r} is not a dtype (expected bfloat16, float16 or float32)")
    return problems


def validate(c: ml_collections.ConfigDict, prompts_file: str | Path) -> tuple[list[str], jax.sharding.Mesh, int]:
    """(prompts, mesh, batch size), after checking everything that needs no weights; one ValueError
    lists every problem found."""
    problems = _settings_problems(c)
    prompts, mesh, batch = [], None, 0
    try:
        prompts = read_prompts(prompts_file)
    except (ValueError, FileNotFoundError) as e:
        problems.append(str(e))
    if not c.pipeline:
        problems.append("set --config.pipeline to a diffusers pipeline folder or a converted directory")
    elif c.model in PIPELINES:
        try:
            problems += size_problems(
                c.sample.height, c.sample.width, *pipeline_geometry(c.pipeline, c.model, c.vae_stride)
            )
        except (ValueError, FileNotFoundError) as e:
            problems.append(str(e))
    available = jax.devices()
    n = c.get("num_devices", 0) or len(available)
    if n > len(available):
        problems.append(f"config.num_devices={n} but only {len(available)} devices are available")
    else:
        try:
            mesh = sharding.make_mesh(dict(c.mesh), available[:n])
            batch = c.sample.batch_size or mesh.devices.size
            if batch % mesh.devices.size:
                problems.append(
                    f"config.sample.batch_size={batch} is not a multiple of the {mesh.devices.size} devices"
                )
        except ValueError as e:
            problems.append(f"config.mesh: {e}")
    if problems:
        raise ValueError("cannot sample: " + "; ".join(problems))
    return prompts, mesh, batch


def settings(c: ml_collections.ConfigDict) -> dict:
    """What decides the images (not how they are computed: batch, mesh and devices do not change them)."""
    s = c.sample
    out = dict(
        pipeline=str(Path(c.pipeline).resolve()), model=c.model, vae_stride=c.vae_stride, dtype=str(c.dtype),
        seed=c.seed, images_per_prompt=s.images_per_prompt, height=s.height, width=s.width, steps=s.steps,
        guidance=s.guidance, max_sequence_length=s.max_sequence_length, format=s.format,
    )  # fmt: skip
    if pipeline_class(c.model).uses_negative_prompt:
        out["negative_prompt"] = s.negative_prompt
    return out


def check_outdir(out: Path, wanted: dict) -> bool:
    """Refuses an outdir written with other settings; True when OUT/settings.json is still to be written."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--outdir={out} is a file, expected a folder")
    stored_file = out / SETTINGS
    if not stored_file.is_file():
        if (out / METADATA).exists():
            raise FileExistsError(
                f"--outdir={out} holds a {METADATA} but no {SETTINGS} (made by another tool or an older version): "
                "its images may come from other settings; pass another --outdir"
            )
        return True
    try:
        stored = json.loads(stored_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{stored_file} is not valid JSON ({e}); remove it or pass another --outdir") from e
    changed = [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in wanted.items() if stored.get(k) != v]
    if changed:
        raise FileExistsError(
            f"--outdir={out} holds images made with other settings ({stored_file}): {'; '.join(changed)}; "
            "rerun with the stored settings to resume, or pass another --outdir"
        )
    return False


def written_images(out: Path, prompts: list[str], images_per_prompt: int, ext: str, tidy: bool = True) -> set[str]:
    """The names of the images already written: those with a complete metadata line and their file.
    With `tidy` (one process does it), rewrites OUT/metadata.jsonl without the lines that do not count
    (half-written, duplicated, file gone) and removes images left half-written (*.tmp)."""
    meta = out / METADATA
    if tidy:
        for tmp in out.glob(f"*.{ext}.tmp"):
            tmp.unlink()
    if not meta.is_file():
        return set()
    text = meta.read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]  # the part after the last newline is a half-written line (or empty)
    kept, names = [], set()
    for line in lines:
        try:
            row = json.loads(line)
            name = row["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            logging.warning("%s: dropping an unreadable line %r (its image is made again)", meta, line[:80])
            continue
        if name in names or not (out / name).is_file():
            continue
        p, k = _job(name, ext)
        if p is not None and p < len(prompts) and k < images_per_prompt and row.get("text") != prompts[p]:
            raise FileExistsError(
                f"{out / name} was made from the prompt {row.get('text')!r} but prompt {p + 1} is now "
                f"{prompts[p]!r}: pass another --outdir for another prompt file"
            )
        kept.append(line)
        names.add(name)
    if tidy and (len(kept) != len(lines) or (text and not text.endswith("\n"))):
        files.write_text(meta, "".join(x + "\n" for x in kept))
    return names


def _job(name: str, ext: str) -> tuple[int | None, int]:
    stem, _, suffix = name.partition(".")
    p, _, k = stem.partition("_")
    if suffix != ext or not (p.isdigit() and k.isdigit()):
        return None, 0
    return int(p), int(k)


def load_pipeline(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> base.Pipeline:
    """The config's pipeline. On a `mesh`, the transformer's parameters are read straight onto it:
    replicated, or FSDP-sharded by their logical axes (`shard_params`; sharding.DEFAULT_RULES: "embed"
    over `fsdp`) for a model that does not fit one device."""
    opts = {}
    if mesh is not None:
        shard = c.get("shard_params", False)
        opts["sharding"] = (mesh, sharding.DEFAULT_RULES) if shard else NamedSharding(mesh, PartitionSpec())
    return pipeline_class(c.model).from_pretrained(
        c.pipeline, dtype=jnp.dtype(c.dtype), vae_stride=c.vae_stride, **opts
    )


def run(c: ml_collections.ConfigDict, prompts_file: str, outdir: str) -> int:
    """Writes every missing image; returns how many were written."""
    s = c.sample
    prompts, mesh, batch = validate(c, prompts_file)
    out, wanted = Path(outdir), settings(c)
    fresh = check_outdir(out, wanted)
    ext = FORMATS[s.format]
    jobs = [(p, k) for p in range(len(prompts)) for k in range(s.images_per_prompt)]
    done = written_images(out, prompts, s.images_per_prompt, ext, tidy=jax.process_index() == 0)
    todo = [(p, k) for p, k in jobs if f"{p:05d}_{k:02d}.{ext}" not in done]
    if len(todo) < len(jobs):
        logging.info("resuming: %d of %d images already written", len(jobs) - len(todo), len(jobs))
    if not todo:
        return 0
    if fresh and jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        files.write_text(out / SETTINGS, json.dumps(wanted, indent=2) + "\n")
    pipe = load_pipeline(c, mesh)
    data = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    replicated = NamedSharding(mesh, PartitionSpec())
    pipe.vae = pipe.vae._replace(params=jax.device_put(pipe.vae.params, replicated))
    module = pipe.transformer.module
    shape = pipe.latent_shape(1, s.height, s.width)[1:]
    written = 0
    with tqdm(total=len(todo), unit="img", desc="sample") as bar:
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            padded = chunk + [chunk[-1]] * (batch - len(chunk))  # fill the mesh; the copies are not saved
            t0 = time.perf_counter()
            texts = [prompts[p] for p, _ in padded]
            seeds = [c.seed + p * s.images_per_prompt + k for p, k in padded]
            noise = jnp.concatenate([base.initial_noise(seed, (1, *shape), module.dtype) for seed in seeds])
            kwargs = dict(height=s.height, width=s.width, num_inference_steps=s.steps, guidance_scale=s.guidance)
            kwargs["prompt_embeds"] = jax.device_put(pipe.encode_prompt(texts, s.max_sequence_length), data)
            negative = pipe.negative_embeds(s.negative_prompt, len(texts), s.guidance, s.max_sequence_length)
            if negative is not None:
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
                line = dict(file_name=name, text=prompts[p], seed=seed, height=s.height, width=s.width)
                line |= dict(steps=s.steps, guidance=s.guidance, model=c.model)
                _append_line(out / METADATA, json.dumps(line))  # after the image: the line marks it done
                written += 1
            bar.update(len(chunk))
            bar.set_postfix(img_per_s=f"{len(chunk) / (time.perf_counter() - t0):.2f}")
    return written


def _save(image: np.ndarray, path: Path, fmt: str) -> None:
    with files.replaced(path) as tmp:  # a crash never leaves a half-written image under its name
        Image.fromarray(image).save(tmp, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))


def _append_line(path: Path, line: str) -> None:
    try:
        with path.open("a", encoding="utf-8") as f:  # opened per line: a failed write names this file
            f.write(line + "\n")
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def main(argv):
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (configs/flux_wlf.py or configs/sd3_wlf.py)")
    distributed.initialize(_CONFIG.value.get("distributed"))  # before anything touches a device
    n = run(_CONFIG.value, _PROMPTS.value, _OUTDIR.value)
    logging.info("wrote %d images to %s", n, _OUTDIR.value)


if __name__ == "__main__":
    # flags are defined only when run as a program, so that tests can import several CLIs
    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/flux_wlf.py or configs/sd3_wlf.py")
    _PROMPTS = flags.DEFINE_string("prompts", None, "prompt file: .txt (one per line) or metadata.jsonl", required=True)
    _OUTDIR = flags.DEFINE_string("outdir", None, "output folder", required=True)
    cli.run(main)
