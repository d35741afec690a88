"""Fine-tune SD3 / FLUX.1 at 4096² with the WLF loss (Diffusion-4K), sharded and resumable:

  python -m d4k_jax.train --config=configs/flux_wlf.py --config.pipeline=/models/FLUX.1-dev \\
      --config.data.folder=/data/Aesthetic-4K --workdir=/ckpt/flux4k
  python -m d4k_jax.train --config=configs/flux_wlf.py:tiny --workdir=workdir/demo     # the CPU demo

The run: check the config (d4k_jax.train_config: sizes, batch splits, mesh, names, folders; nothing is
loaded before); build the dataset (array_record) if it is not there; encode every caption once into the
text cache; train the transformer (VAE and text encoders frozen) with the loop of d4k_jax.trainer; sample
the eval prompts every `eval.every` steps (grids in WORKDIR/samples, TensorBoard); at the end write
WORKDIR/loss_curve.png, WORKDIR/sample_grid.png and WORKDIR/pipeline (the trained transformer with
the other components, loadable by the pipelines and `python -m d4k_jax.sample`; pipeline/export.json
records its step, and a run extended past it exports again). Rerunning the same command resumes from the
latest checkpoint; a rerun that changes the recipe is refused (train_config.RESUMABLE lists what may
change; --config.train.allow_config_change=True accepts the rest); SIGTERM saves a checkpoint first.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from d4k_jax import checkpoint, cli, files, plots, sharding, train_config
from d4k_jax import train_step as ts
from d4k_jax.data import aesthetic4k, demo, input_pipeline, text_cache
from d4k_jax.io import kind_of_module
from d4k_jax.metrics import suite
from d4k_jax.pipelines import base, pipeline_class
from d4k_jax.train_config import lr_schedule
from d4k_jax.trainer import Trainer


def run(c: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list[dict]:
    """Train as the config says; returns the metrics logged by this invocation."""
    workdir = Path(workdir).absolute()
    train_config.validate(c, workdir, jax.device_count())  # before anything is loaded or written
    stored = train_config.as_stored(c, jax.device_count())
    train_config.check_resume(stored, workdir, jax.device_count())  # a refused config leaves config.json as it was
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        files.write_text(workdir / "config.json", json.dumps(stored, indent=2) + "\n")
        (workdir / "eval_prompts.txt").write_text("".join(p + "\n" for p in c.eval.prompts))  # for d4k_jax.sample
    path = base.pipeline_dir(c.pipeline)
    mesh = sharding.make_mesh(dict(c.train.mesh))
    rules = tuple((name, _axes(axes)) for name, axes in c.train.rules) if c.train.rules else sharding.DEFAULT_RULES
    global_batch = c.train.batch_size * mesh.shape["data"] * mesh.shape["fsdp"]

    data_dir = prepare_data(c, workdir)
    captions = input_pipeline.captions(data_dir, c.data.split)
    logging.info("%d training images in %s; global batch %d on mesh %s", len(captions), data_dir, global_batch, mesh)

    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    pipe = pipeline_class(c.model).from_pretrained(
        path, dtype=dtype, vae_stride=c.vae_stride or None, param_dtype=param_dtype, remat=c.train.remat
    )
    (module, params), vae = pipe.transformer, pipe.vae
    pipe.transformer = base.Component(module, None)  # the trainer owns the params; SampleEval passes its own
    cache = text_cache.build(
        workdir / "text_cache",
        captions,
        lambda prompts: pipe.encode_prompt(prompts, c.train.text_length),
        dtype=dtype,
        pipeline=str(path),
        text_length=c.train.text_length,
    )
    sampler = SampleEval(c, pipe, module, rules, mesh, workdir)  # encodes the eval prompts now
    pipe.release_text_encoders()

    schedule = lr_schedule(c.train)
    tx = ts.optimizer(
        schedule,
        c.train.b1,
        c.train.b2,
        c.train.eps,
        c.train.weight_decay,
        c.train.clip_norm,
        ts.trainable_mask(params),
    )
    trainer = Trainer(
        module,
        params,
        tx,
        loss_config(c),
        mesh,
        init_inputs=kind_of_module(module).init_inputs(module.config),
        rules=rules,
        seed=c.seed,
        nan_policy=c.train.nan_policy,
        vae=vae,
        microbatches=c.train.microbatches,
        encode_passes=c.train.encode_passes,
        lr_schedule=schedule,
        peak_flops=c.train.peak_flops or None,
    )
    del params
    loader = input_pipeline.make_loader(
        data_dir,
        c.data.split,
        resolution=c.data.resolution,
        global_batch_size=global_batch,
        seed=c.seed,
        worker_count=c.data.worker_count,
    )
    with checkpoint.disk_full_errors(workdir / "checkpoints"):  # a full disk: one OSError, the last checkpoint kept
        rows = trainer.fit(
            loader,
            workdir,
            c.train.steps,
            log_every=c.train.log_every,
            checkpoint_every=c.train.checkpoint_every,
            keep=c.train.keep,
            prepare=cache.prepare,
            hooks=[sampler.hook(c.train.steps)],
            metadata=stored,
        )
    if int(trainer.state.step) == c.train.steps:
        finish(c, workdir, path, module, trainer.state.params, c.train.steps)
    return rows


def prepare_data(c: ml_collections.ConfigDict, workdir: Path) -> Path:
    """The built dataset's data_dir, building it from `data.folder` (or the demo set) the first time."""
    data_dir = Path(c.data.data_dir or workdir / "data")
    if (aesthetic4k.dataset_dir(data_dir, c.data.split) / "dataset_info.json").is_file():
        return data_dir
    folder = c.data.folder
    if c.data.demo_images:
        folder = workdir / "demo_images"
        if jax.process_index() == 0 and not folder.exists():
            demo.write_folder(folder, c.data.demo_images, c.data.resolution, seed=c.seed, split=c.data.split)
    if not folder:
        _missing("--config.data.folder (an Aesthetic-4K-style root) or --config.data.data_dir (a built dataset)")
    if jax.process_index() == 0:
        stats = aesthetic4k.build(folder, c.data.split, data_dir)
        logging.info("dataset: %s", stats)
    _sync("dataset")
    return data_dir


def loss_config(c: ml_collections.ConfigDict) -> ts.LossConfig:
    weights = c.loss.subband_weights
    return ts.LossConfig(
        model=c.model,
        loss=c.loss.loss,
        timesteps=c.loss.timesteps,
        shift=c.loss.shift,
        guidance=c.loss.guidance,
        wavelet=c.loss.wavelet,
        level=c.loss.level,
        subband_weights=None if weights is None else tuple(weights),
        latent_shift=c.loss.latent_shift,
    )


class SampleEval:
    """Samples the eval prompts with the current parameters: a grid PNG per evaluation in WORKDIR/samples
    and the images in TensorBoard. The prompts are encoded once, before the text encoders are released;
    the batch is padded to a multiple of the data-parallel devices, and the noise is fixed by the seed."""

    def __init__(self, c: ml_collections.ConfigDict, pipe, module: nn.Module, rules, mesh, workdir: Path):
        e = c.eval
        self.c, self.pipe, self.module, self.rules, self.workdir = c, pipe, module, rules, workdir
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        self.prompts = list(e.prompts)
        padded = self.prompts + self.prompts[-1:] * (-len(self.prompts) % ways)
        self.kwargs = dict(
            height=e.height,
            width=e.width,
            num_inference_steps=e.steps,
            guidance_scale=e.guidance,
            seed=c.seed,
            prompt_embeds=pipe.encode_prompt(padded, e.max_sequence_length),
        )
        negative = pipe.negative_embeds(c.sample.negative_prompt, len(padded), e.guidance, e.max_sequence_length)
        if negative is not None:
            self.kwargs["negative_prompt_embeds"] = negative
        self.padded = padded
        names = [m for m in e.get("metrics", "").split(",") if m]
        self.metrics = suite.Metrics(names, suite.Weights(**e.get("weights", {}))) if names else None
        for name, reason in (self.metrics.not_computed if self.metrics else {}).items():
            logging.warning("eval metric %s not computed: %s", name, reason)

    def measure(self, images: np.ndarray) -> dict[str, float]:
        """The configured metrics of one evaluation's samples, as eval_<name>; the ones not computed are left out."""
        if self.metrics is None:
            return {}
        self.metrics.reset()
        self.metrics.update(list(images), self.prompts)
        return {f"eval_{k}": r["value"] for k, r in self.metrics.result().items() if "value" in r}

    def __call__(self, params: Any) -> np.ndarray:
        self.pipe.transformer = base.Component(self.module, params)
        with nn.logical_axis_rules(self.rules):
            images = self.pipe(self.padded, **self.kwargs)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            images = multihost_utils.process_allgather(images, tiled=True)
        return np.asarray(jax.device_get(images))[: len(self.prompts)]

    def hook(self, num_steps: int):
        def run(step: int, state: ts.TrainState, writer) -> dict | None:
            if step != num_steps and not (self.c.eval.every and step % self.c.eval.every == 0):
                return None
            t0 = time.perf_counter()
            images = self(state.params)
            writer.images(step, "samples", images)
            if jax.process_index() == 0:
                (self.workdir / "samples").mkdir(exist_ok=True)
                plots.image_grid(images, self.workdir / "samples" / f"step_{step:06d}.png", 4, self.prompts)
            return {"eval_seconds": time.perf_counter() - t0, **self.measure(images)}

        return run


def finish(
    c: ml_collections.ConfigDict, workdir: Path, source: Path, module: nn.Module, params: Any, step: int
) -> None:
    """The loss-curve and sample-grid PNGs, and WORKDIR/pipeline with the trained transformer of `step`."""
    if c.train.export:
        export_pipeline(source, workdir / "pipeline", module, params, step)
    if jax.process_index() != 0:
        return
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and not r.get("skipped")]
    if rows:
        smooth = max(1, min(20, len(rows) // 5))
        plots.loss_curve([r["step"] for r in rows], [r["loss"] for r in rows], workdir / "loss_curve.png", smooth)
    grids = sorted((workdir / "samples").glob("step_*.png"))
    if grids:
        shutil.copy(grids[-1], workdir / "sample_grid.png")


EXPORT_RECORD = "export.json"  # in the exported pipeline folder: {"step": the train step of its weights}


def export_pipeline(source: Path, dst: Path, module: nn.Module, params: Any, step: int) -> Path:
    """A converted pipeline folder: the trained transformer (config.json + orbax params/) and links to
    the source's other components, which training did not change.

    An export of the same step (EXPORT_RECORD) is kept; any other (a run extended from 20k to 30k steps,
    an export from before the record) is replaced: the new one is written beside as DST.partial, the old
    one moves to DST.old, the new one to DST, then DST.old is deleted. A crash between the two renames
    leaves DST.old, which the next export puts back first: there is always an export to go back to."""
    old, tmp = dst.with_name(dst.name + ".old"), dst.with_name(dst.name + ".partial")
    if jax.process_index() == 0 and old.is_dir():
        if dst.exists():
            shutil.rmtree(old)
        else:
            old.rename(dst)
    _sync("export_restored")
    if exported_step(dst) == step:
        return dst
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copy(source / "model_index.json", tmp / "model_index.json")
        for item in source.iterdir():
            if item.is_dir() and item.name != "transformer":
                (tmp / item.name).symlink_to(item.resolve(), target_is_directory=True)
        (tmp / "transformer").mkdir()
        cfg = json.loads((source / "transformer" / "config.json").read_text())
        (tmp / "transformer" / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    _sync("export")
    checkpoint.save_params(tmp / "transformer" / "params", params)  # every process writes its shards
    _sync("export_done")
    if jax.process_index() == 0:
        (tmp / EXPORT_RECORD).write_text(json.dumps({"step": step}) + "\n")
        if dst.exists():
            dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
        logging.info("exported the trained pipeline of step %d to %s", step, dst)
    _sync("export_swapped")
    return dst


def exported_step(folder: Path) -> int | None:
    """The train step whose weights the exported pipeline `folder` holds (None: no export, or an
    export from before the step was recorded)."""
    try:
        return int(json.loads((folder / EXPORT_RECORD).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _axes(axes):
    """A rule's mesh axes as config files give them (str, None, or a list from JSON) -> str / tuple / None."""
    return tuple(axes) if isinstance(axes, list | tuple) else axes


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _missing(what: str):
    raise ValueError(f"set {what}")


def main(argv) -> None:
    del argv
    c = _CONFIG.value
    if c.get("distributed", False):
        jax.distributed.initialize()  # multi-host: coordinator and process ids from the environment
    rows = run(c, _WORKDIR.value)
    if rows:
        logging.info("last logged step %d: loss %.4f", rows[-1]["step"], rows[-1]["loss"])


if __name__ == "__main__":
    # flags are defined only when run as a program, so that tests can import several CLIs
    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/flux_wlf.py[:tiny] or configs/sd3_wlf.py")
    _WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics, samples; rerun to resume", required=True)
    flags.mark_flag_as_required("config")
    cli.run(main)
