"""Sample many images, sharded over every device (of every process):

  python -m d4k_jax.sample --config=configs/flux_wlf.py --config.pipeline=DIR --prompts=FILE --outdir=OUT

FILE is a text file (one prompt per line) or an Aesthetic-4K `metadata.jsonl` (its "text" fields).
Image k of prompt p uses seed `config.seed + p * images_per_prompt + k`, drawn per image, and its prompt is
encoded alone, so the images do not depend on the batch size, the device count or the process count. Each
image is written as OUT/{p:05d}_{k:02d}.jpg (quality 95; PNG with --config.sample.format=png) with a line
in OUT/metadata.jsonl. The last batch is padded to fill the mesh.

Several processes (see d4k_jax/distributed.py): each builds the noise and embeddings of the batch rows its
devices hold (global arrays, base.global_rows) and writes the images it holds (a row replicated on several
devices is written once), into the one shared OUT. Each appends its lines to its own
OUT/metadata.process_<i>.jsonl; once every process is done, process 0 merges them into OUT/metadata.jsonl,
sorted by prompt then image, so that the files do not depend on the process count.

Everything that can be checked without weights (sizes against the pipeline's config.json files, format,
prompt file, batch against the devices) is checked before the weights load, and reported all at once.

Resume. OUT/settings.json, written before the first image, holds what decides the images (pipeline,
model, seed, size, steps, guidance, ...): a rerun into OUT with other settings is refused, naming them.
An image counts as written when its metadata line is, in OUT/metadata.jsonl or in any process's file: the
image is saved first (to a temporary name, then renamed), its line appended after. A crash or a kill in
between leaves an image without a line, which the rerun makes again (the same image: same seed); a
half-written last line is dropped on resume. A rerun, with any number of processes, first merges every
process's lines into OUT/metadata.jsonl (process 0, while the others wait), so what a killed run wrote
counts once; until then OUT/metadata.jsonl lists only the images of finished runs.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags
from PIL import Image
from tqdm import tqdm

from d4k_jax import cli, distributed, files, sharding
from d4k_jax.io import lora
from d4k_jax.pipelines import PIPELINES, base, pipeline_class

SETTINGS = "settings.json"
METADATA = "metadata.jsonl"
PROCESS_METADATA = "metadata.process_{}.jsonl"  # each process's lines until process 0 merges them into METADATA
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
            factor, largest = pipeline_geometry(c.pipeline, c.model, c.vae_stride)
            problems += size_problems(c.sample.height, c.sample.width, factor, largest)
        except (ValueError, FileNotFoundError) as e:
            problems.append(str(e))
        problems += lora.spec_problems(c.get("lora"), Path(c.pipeline) / "transformer")
    available = jax.devices()
    n = c.get("num_devices", 0) or len(available)
    if n > len(available):
        problems.append(f"config.num_devices={n} but only {len(available)} devices are available")
    elif n < len(available) and jax.process_count() > 1:
        problems.append(f"config.num_devices={n}: several processes sample on every device (leave it 0)")
    else:
        try:
            mesh = sharding.make_mesh(dict(c.mesh), available[:n])
            rows = mesh.shape["data"] * mesh.shape["fsdp"]  # the ways the batch is split (`sequence` splits images)
            batch = c.sample.batch_size or rows
            if batch % rows:
                problems.append(
                    f"config.sample.batch_size={batch} is not a multiple of the mesh's data x fsdp = {rows} "
                    "(the ways it splits the batch)"
                )
            if c.model in PIPELINES and c.pipeline:
                sizes = {"config.sample.height": c.sample.height}
                found = base.sequence_problems(pipeline_class(c.model), c.pipeline, c.vae_stride, mesh.shape, sizes)
                problems += [f"config.mesh: {p}" for p in found]
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
    if c.get("lora"):  # only when set: outdirs written before the option existed still resume
        out["lora"] = [[str(Path(p).resolve()), scale] for p, scale in lora.parse_spec(c.lora)]
    return out | ({"fp8": True} if c.get("fp8") else {})  # FP8 matmuls change the images; as lora, only when set


def check_outdir(out: Path, wanted: dict) -> bool:
    """Refuses an outdir written with other settings; True when OUT/settings.json is still to be written."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--outdir={out} is a file, expected a folder")
    stored_file = out / SETTINGS
    if not stored_file.is_file():
        if (out / METADATA).exists() or any(out.glob(PROCESS_METADATA.format("*"))):
            raise FileExistsError(
                f"--outdir={out} holds a {METADATA} but no {SETTINGS} (made by another tool or an older version): "
                "its images may come from other settings; pass another --outdir"
            )
        return True
    try:
        stored = json.loads(stored_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{stored_file} is not valid JSON ({e}); remove it or pass another --outdir") from e
    keys = {**stored, **wanted}  # a setting dropped (lora) is a change too
    changed = [f"{k} {stored.get(k)!r} -> {wanted.get(k)!r}" for k in keys if stored.get(k) != wanted.get(k)]
    if changed:
        raise FileExistsError(
            f"--outdir={out} holds images made with other settings ({stored_file}): {'; '.join(changed)}; "
            "rerun with the stored settings to resume, or pass another --outdir"
        )
    return False


def written_images(out: Path, prompts: list[str], images_per_prompt: int, ext: str, tidy: bool = True) -> set[str]:
    """The names of the images already written: those with a complete metadata line (in OUT/metadata.jsonl or a
    process's OUT/metadata.process_<i>.jsonl) and their file. With `tidy` (one process, while no other writes),
    merges the lines that count into OUT/metadata.jsonl, sorted by prompt then image, removes the process files
    and images left half-written (*.tmp); the lines that do not count (half-written, duplicated, file gone) go."""
    meta = out / METADATA
    if tidy:
        for tmp in out.glob(f"*.{ext}.tmp"):
            tmp.unlink()
    sources = [meta, *sorted(out.glob(PROCESS_METADATA.format("*")))]
    kept: dict[str, str] = {}
    for path in sources:
        if not path.is_file():
            continue
        # the part after the last newline is a half-written line (or empty)
        for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
            try:
                row = json.loads(line)
                name = row["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError):
                logging.warning("%s: dropping an unreadable line %r (its image is made again)", path, line[:80])
                continue
            if name in kept or not (out / name).is_file():
                continue
            p, k = _job(name, ext)
            if p is not None and p < len(prompts) and k < images_per_prompt and row.get("text") != prompts[p]:
                raise FileExistsError(
                    f"{out / name} was made from the prompt {row.get('text')!r} but prompt {p + 1} is now "
                    f"{prompts[p]!r}: pass another --outdir for another prompt file"
                )
            kept[name] = line
    if tidy and (kept or meta.exists()):
        text = "".join(kept[n] + "\n" for n in sorted(kept, key=lambda n: _order(n, ext)))
        if not meta.is_file() or meta.read_text(encoding="utf-8") != text:
            files.write_text(meta, text)
    for part in sources[1:] if tidy else ():  # after the merged file is written: a crash between reads both
        part.unlink()
    return set(kept)


def _written_everywhere(out: Path, prompts: list[str], images_per_prompt: int, ext: str, jobs: list) -> set[str]:
    """`written_images`, tidied, as every process sees it: process 0 tidies while the others wait, and its set
    is sent to all, so that every process plans the same batches."""
    if jax.process_count() == 1:
        return written_images(out, prompts, images_per_prompt, ext)
    written_images(out, prompts, images_per_prompt, ext, tidy=False)  # a changed prompt stops every process
    sharding.sync_processes("sample: outdir read")
    names = [_name(p, k, ext) for p, k in jobs]
    done = np.zeros(len(names), np.int32)
    if jax.process_index() == 0:
        tidied = written_images(out, prompts, images_per_prompt, ext)
        done = np.array([n in tidied for n in names], np.int32)
    done = multihost_utils.broadcast_one_to_all(done)
    return {n for n, d in zip(names, done, strict=True) if d}


def _order(name: str, ext: str) -> tuple:
    """Sort key of metadata lines: by prompt, then image (numerically); other names after, by name."""
    p, k = _job(name, ext)
    return (p is None, p or 0, k, name)


def _name(p: int, k: int, ext: str) -> str:
    return f"{p:05d}_{k:02d}.{ext}"


def _job(name: str, ext: str) -> tuple[int | None, int]:
    stem, _, suffix = name.partition(".")
    p, _, k = stem.partition("_")
    if suffix != ext or not (p.isdigit() and k.isdigit()):
        return None, 0
    return int(p), int(k)


def load_pipeline(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> base.Pipeline:
    """The config's pipeline. On a `mesh`, the transformer's parameters are read straight onto it:
    replicated, or FSDP-sharded by their logical axes (`shard_params`; sharding.DEFAULT_RULES: "embed"
    over `fsdp`) for a model that does not fit one device; the VAE's, replicated. The text encoders stay on
    each process's first device: each process encodes its own prompts."""
    opts = {}
    if mesh is not None:
        shard, replicated = c.get("shard_params", False), NamedSharding(mesh, PartitionSpec())
        opts = dict(sharding=(mesh, sharding.DEFAULT_RULES) if shard else replicated, vae_sharding=replicated)
    dtype = jnp.dtype(c.dtype)
    opts |= {k: bool(c.get(k, False)) for k in ("fused_qkv", "fp8")}  # fp8 changes the images: settings()
    pipe = pipeline_class(c.model).from_pretrained(c.pipeline, dtype=dtype, vae_stride=c.vae_stride, **opts)
    for path, scale in lora.parse_spec(c.get("lora")):  # merged on the transformer's shardings
        pipe.load_lora_weights(path, scale)
    return pipe


def run(c: ml_collections.ConfigDict, prompts_file: str, outdir: str) -> int:
    """Writes every missing image; returns how many were written (by all processes)."""
    s = c.sample
    prompts, mesh, batch = validate(c, prompts_file)
    out, wanted = Path(outdir), settings(c)
    fresh = check_outdir(out, wanted)
    ext = FORMATS[s.format]
    jobs = [(p, k) for p in range(len(prompts)) for k in range(s.images_per_prompt)]
    done = _written_everywhere(out, prompts, s.images_per_prompt, ext, jobs)
    todo = [(p, k) for p, k in jobs if _name(p, k, ext) not in done]
    if len(todo) < len(jobs):
        logging.info("resuming: %d of %d images already written", len(jobs) - len(todo), len(jobs))
    if not todo:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if fresh and jax.process_index() == 0:
        files.write_text(out / SETTINGS, json.dumps(wanted, indent=2) + "\n")
    pipe = load_pipeline(c, mesh)
    data = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    whole_rows = jax.jit(lambda x: x, out_shardings=data)  # each image whole on the devices that hold its row
    negative = pipe.negative_embeds(s.negative_prompt, 1, s.guidance, s.max_sequence_length)
    negative = None if negative is None else [np.asarray(x[0]) for x in negative]
    own_metadata = out / PROCESS_METADATA.format(jax.process_index())
    with tqdm(total=len(todo), unit="img", desc="sample", disable=jax.process_index() != 0) as bar:
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            padded = chunk + [chunk[-1]] * (batch - len(chunk))  # fill the mesh; the copies are not saved
            t0 = time.perf_counter()
            texts = [prompts[p] for p, _ in padded]
            seeds = [c.seed + p * s.images_per_prompt + k for p, k in padded]
            kwargs = dict(height=s.height, width=s.width, num_inference_steps=s.steps, guidance_scale=s.guidance)
            kwargs |= _global_inputs(pipe, s, texts, seeds, negative, data)
            with sharding.active(mesh):  # one image's tokens over `sequence` (nn.ulysses), rows over data x fsdp
                images = whole_rows(pipe(texts, **kwargs))
            for row, image in _held_images(images, len(chunk)):
                name = _name(*chunk[row], ext)
                _save(image, out / name, s.format)
                line = dict(file_name=name, text=texts[row], seed=seeds[row], height=s.height, width=s.width)
                line |= dict(steps=s.steps, guidance=s.guidance, model=c.model)
                _append_line(own_metadata, json.dumps(line))  # after the image: the line marks it done
            bar.update(len(chunk))
            bar.set_postfix(img_per_s=f"{len(chunk) / (time.perf_counter() - t0):.2f}")
    sharding.sync_processes("sample: every image written")
    if jax.process_index() == 0:
        written_images(out, prompts, s.images_per_prompt, ext)  # every process's lines into OUT/metadata.jsonl
    return len(todo)


def _global_inputs(pipe: base.Pipeline, s, texts: list[str], seeds: list[int], negative, data) -> dict:
    """The call's initial noise and embeddings as global arrays on `data`, each process building only the rows
    it holds: the noise of each from its seed, and the embeddings of its prompts, encoded one prompt at a time
    (so that an embedding does not depend on the prompts beside it in a batch, nor on the process count).
    `negative` is the negative prompt's (text, pooled) rows, or None."""
    encoded: dict[str, list[np.ndarray]] = {}
    for i in base.rows_held(data, len(texts)):
        if texts[i] not in encoded:
            encoded[texts[i]] = [np.asarray(x[0]) for x in pipe.encode_prompt([texts[i]], s.max_sequence_length)]
    shape, dtype = pipe.latent_shape(1, s.height, s.width), pipe.transformer.module.dtype
    n = len(texts)
    out = dict(latents=base.global_rows(data, n, lambda i: base.initial_noise(seeds[i], shape, dtype)[0]))
    out["prompt_embeds"] = tuple(base.global_rows(data, n, lambda i, j=j: encoded[texts[i]][j]) for j in (0, 1))
    if negative is not None:
        out["negative_prompt_embeds"] = tuple(base.global_rows(data, n, lambda i, x=x: x) for x in negative)
    return out


def _held_images(images: jax.Array, n: int):
    """(row, image) for each of the first `n` rows of `images` (split over the batch axis only) that this
    process writes: those of its shards that are their row's first replica, so that a row on several devices
    (of this process or others) is written once."""
    for shard in images.addressable_shards:
        if shard.replica_id == 0:
            rows, pixels = range(images.shape[0])[shard.index[0]], np.asarray(shard.data)
            yield from ((row, pixels[j]) for j, row in enumerate(rows) if row < n)


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
    cache = _CONFIG.value.get("compilation_cache", cli.default_compilation_cache())
    cli.use_compilation_cache(cache)  # before anything compiles
    distributed.initialize(_CONFIG.value.get("distributed"))  # before anything touches a device
    # JAX's multi-process runtime catches SIGTERM (a preemption notice, for training to save a step). Sampling
    # has nothing to save (an image counts once its line is written): SIGTERM ends it at once, as one process.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    n = run(_CONFIG.value, _PROMPTS.value, _OUTDIR.value)
    logging.info("wrote %d images to %s", n, _OUTDIR.value)


if __name__ == "__main__":
    # flags are defined only when run as a program, so that tests can import several CLIs
    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/flux_wlf.py or configs/sd3_wlf.py")
    _PROMPTS = flags.DEFINE_string("prompts", None, "prompt file: .txt (one per line) or metadata.jsonl", required=True)
    _OUTDIR = flags.DEFINE_string("outdir", None, "output folder", required=True)
    cli.run(main)
