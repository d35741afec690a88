"""Fine-tune SD3 / FLUX.1 at 4096² with the WLF loss (Diffusion-4K), sharded and resumable:

  python -m d4k_jax.train --config=configs/flux_wlf.py --config.pipeline=/models/FLUX.1-dev \\
      --config.data.folder=/data/Aesthetic-4K --workdir=/ckpt/flux4k
  python -m d4k_jax.train --config=configs/flux_wlf.py:tiny --workdir=workdir/demo     # the CPU demo

The run: check the config (d4k_jax.train_config: sizes, batch splits, mesh, names, folders; nothing is
loaded before); build the dataset (array_record) if it is not there; encode every caption once into the
text cache; train the transformer (VAE and text encoders frozen; with train.lora.rank > 0, only LoRA adapters
on the frozen transformer: d4k_jax/lora.py) with the loop of d4k_jax.trainer; sample the eval prompts every
`eval.every` steps (grids in WORKDIR/samples, TensorBoard); at the end write
WORKDIR/loss_curve.png, WORKDIR/sample_grid.png and WORKDIR/pipeline (the trained transformer with
the other components, loadable by the pipelines and `python -m d4k_jax.sample`; pipeline/export.json
records its step, and a run extended past it exports again; a LoRA run writes its adapters as
WORKDIR/lora.safetensors instead, a diffusers-format LoRA file). Rerunning
the same command resumes from the
latest checkpoint; a rerun that changes the recipe is refused (train_config.RESUMABLE lists what may
change; --config.train.allow_config_change=True accepts the rest); SIGTERM saves a checkpoint first.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags, logging
from flax.traverse_util import flatten_dict
from ml_collections import config_flags

from d4k_jax import checkpoint, cli, distributed, files, lora, sharding, train_config, train_state
from d4k_jax import train_step as ts
from d4k_jax.data import input_pipeline, text_cache
from d4k_jax.data.prepare import prepare_data
from d4k_jax.export import LORA_FILE, export_lora, finish
from d4k_jax.io import kind_of_module
from d4k_jax.pipelines import base, pipeline_class
from d4k_jax.sample_eval import SampleEval
from d4k_jax.train_config import loss_config, lr_schedule
from d4k_jax.trainer import Trainer


def run(c: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list[dict]:
    """Train as the config says; returns the metrics logged by this invocation."""
    workdir = Path(workdir).absolute()
    stored = _check_and_record(c, workdir)  # before anything is loaded
    path = base.pipeline_dir(c.pipeline)
    mesh = sharding.make_mesh(dict(c.train.mesh), dcn=dict(c.train.mesh_dcn))
    rules = tuple((name, _axes(axes)) for name, axes in c.train.rules) if c.train.rules else sharding.DEFAULT_RULES
    global_batch = c.train.batch_size * mesh.shape["data"] * mesh.shape["fsdp"]

    data_dir = prepare_data(c, workdir)
    captions = input_pipeline.captions(data_dir, c.data.split)
    logging.info("%d training images in %s; global batch %d on mesh %s", len(captions), data_dir, global_batch, mesh)

    dtype = jnp.dtype(c.dtype)
    pipe = _pipeline(c, path, mesh, rules)
    module, params = pipe.transformer
    pipe.transformer = base.Component(module, None)  # the trainer owns the params; SampleEval passes its own
    cache = text_cache.build(
        workdir / "text_cache",
        captions,
        lambda prompts: pipe.encode_prompt(prompts, c.train.text_length),
        dtype=dtype,
        pipeline=str(path),
        text_length=c.train.text_length,
    )
    sampler = SampleEval(c, pipe, rules, mesh, workdir)  # encodes the eval prompts now
    pipe.release_text_encoders()

    trainer = _trainer(c, module, params, pipe.vae, mesh, rules)
    sampler.base = trainer.base  # LoRA: the eval samples with the frozen base + the state's adapters
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
        if trainer.base is not None and c.train.export:  # LoRA: the adapters as a diffusers LoRA file
            export_lora(workdir / LORA_FILE, module, trainer.state.params, trainer.base, c.train.lora, c.train.steps)
        trained = None if trainer.base is not None else trainer.state.params
        finish(c, workdir, path, module, trained, c.train.steps)
    return rows


def _pipeline(c: ml_collections.ConfigDict, path: Path, mesh, rules) -> base.Pipeline:
    """The pipeline, its transformer read straight onto its train shardings and its VAE onto a replicated one
    (each process reads the slices its devices hold; nothing is put from one host onto other hosts' devices)."""
    return pipeline_class(c.model).from_pretrained(
        path,
        dtype=jnp.dtype(c.dtype),
        vae_stride=c.vae_stride or None,
        vae_sharding=train_state.replicated(mesh),
        # LoRA: the frozen base is stored in the compute dtype (no float32 master copy); the adapters are float32
        param_dtype=jnp.dtype(c.dtype if lora.from_config(c.train.get("lora")) else c.param_dtype),
        remat=c.train.remat,
        fused_qkv=bool(c.get("fused_qkv", False)),
        sharding=(mesh, rules),
    )


def _check_and_record(c: ml_collections.ConfigDict, workdir: Path) -> dict:
    """The config as stored, once it is valid and may resume what WORKDIR holds; written to
    WORKDIR/config.json, with the eval prompts in WORKDIR/eval_prompts.txt (for d4k_jax.sample)."""
    granules = len(sharding.granules(jax.devices()))  # hosts (GPU) or slices (TPU): train.mesh_dcn spans them
    train_config.validate(c, workdir, jax.device_count(), granules)
    stored = train_config.as_stored(c, jax.device_count(), granules)
    train_config.check_resume(stored, workdir, jax.device_count())  # a refused config leaves config.json as it was
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        files.write_text(workdir / "config.json", json.dumps(stored, indent=2) + "\n")
        (workdir / "eval_prompts.txt").write_text("".join(p + "\n" for p in c.eval.prompts))
    return stored


def _trainer(c: ml_collections.ConfigDict, module, params, vae: base.Component, mesh, rules) -> Trainer:
    """The trainer of the transformer `module` from `params`: AdamW on the config's lr schedule, the loss; with
    `train.lora`, of LoRA adapters (peft's initialisation, from the seed) on `params` frozen."""
    schedule = lr_schedule(c.train)
    adapter = lora.from_config(c.train.get("lora"))
    tx = ts.optimizer(
        schedule,
        c.train.b1,
        c.train.b2,
        c.train.eps,
        c.train.weight_decay,
        c.train.clip_norm,
        None if adapter else ts.trainable_mask(params),
    )
    base = None
    if adapter:
        targets = lora.resolve(module, {p: tuple(a.shape) for p, a in flatten_dict(params).items()}, adapter.targets)
        init = functools.partial(lora.init, jax.random.key(c.seed), targets, adapter.rank)
        shardings = train_state.shardings_of(lora.abstract(jax.eval_shape(init), params))
        base, params = ts.Frozen(params, lora.scales(targets, adapter.scale)), jax.jit(init, out_shardings=shardings)()
    return Trainer(
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
        base=base,
        lora_dropout=adapter.dropout if adapter else 0.0,
    )


def _axes(axes):
    """A rule's mesh axes as config files give them (str, None, or a list from JSON) -> str / tuple / None."""
    return tuple(axes) if isinstance(axes, list | tuple) else axes


def main(argv) -> None:
    del argv
    c = _CONFIG.value
    cli.use_compilation_cache(c.get("compilation_cache", cli.default_compilation_cache()))  # before anything compiles
    distributed.initialize(c.get("distributed"))  # before anything touches a device
    rows = run(c, _WORKDIR.value)
    if rows:
        logging.info("last logged step %d: loss %.4f", rows[-1]["step"], rows[-1]["loss"])


if __name__ == "__main__":
    # flags are defined only when run as a program, so that tests can import several CLIs
    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/flux_wlf.py[:tiny] or configs/sd3_wlf.py")
    _WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics, samples; rerun to resume", required=True)
    flags.mark_flag_as_required("config")
    cli.run(main)
