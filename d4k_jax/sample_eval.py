"""Sampling the eval prompts during training (`SampleEval`): a grid PNG per evaluation in WORKDIR/samples,
the images in TensorBoard and the configured metrics (`eval.metrics`) in the logged row."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import ml_dtypes
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from d4k_jax import files, lora, plots
from d4k_jax import train_step as ts
from d4k_jax.metrics import suite
from d4k_jax.nn.linear import LORA
from d4k_jax.pipelines.base import Component, Pipeline, global_rows, initial_noise
from d4k_jax.sharding import Rules

EMBEDDINGS = "eval_embeddings.npz"  # in WORKDIR


class SampleEval:
    """Samples the eval prompts with the current parameters. The prompts (and the negative prompt, where the
    pipeline uses one) are encoded once, before the text encoders are released, and kept in WORKDIR/EMBEDDINGS
    for resumed runs; the batch is padded to a
    multiple of the data-parallel devices, and the noise is fixed by the seed. The noise and embeddings are
    global arrays over the mesh's data-parallel axes, each process holding its rows (every process encodes
    the few eval prompts, then keeps its rows); the images are gathered to every process to be logged."""

    def __init__(self, c: ml_collections.ConfigDict, pipe: Pipeline, rules: Rules, mesh, workdir: Path):
        e = c.eval
        self.c, self.pipe, self.module, self.rules, self.workdir = c, pipe, pipe.transformer.module, rules, workdir
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        self.prompts = list(e.prompts)
        padded = self.prompts + self.prompts[-1:] * (-len(self.prompts) % ways)
        data = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        noise = initial_noise(c.seed, pipe.latent_shape(len(padded), e.height, e.width), self.module.dtype)
        inputs = dict(latents=noise, **_embeddings(c, pipe, padded, workdir / EMBEDDINGS))
        inputs = jax.tree.map(lambda x: _global(data, np.asarray(x)), inputs)
        self.kwargs = dict(
            height=e.height, width=e.width, num_inference_steps=e.steps, guidance_scale=e.guidance, **inputs
        )
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

    base: Any = None  # LoRA training: the frozen train_step.Frozen; the hook's params are then its adapters

    def __call__(self, params: Any) -> np.ndarray:
        if self.base is None:
            self.pipe.transformer = Component(self.module, params)
        else:
            self.pipe.transformer = Component(self.module, self.base.params)
            self.pipe.adapters = lora.variables(None, params, self.base.scales)[LORA]
        with nn.logical_axis_rules(self.rules):
            images = self.pipe(self.padded, **self.kwargs)
        if jax.process_count() > 1:  # the few eval images, to every process: each logs and measures them all
            images = multihost_utils.process_allgather(images, tiled=True)
        return np.asarray(jax.device_get(images))[: len(self.prompts)]

    def hook(self, num_steps: int):
        """The trainer hook: an evaluation every `eval.every` steps and at the last step (`due`: the trainer
        checks those steps' metrics before the hook samples from their state)."""

        def due(step: int) -> bool:
            return step == num_steps or bool(self.c.eval.every and step % self.c.eval.every == 0)

        def run(step: int, state: ts.TrainState, writer) -> dict | None:
            if not due(step):
                return None
            t0 = time.perf_counter()
            images = self(state.params)
            writer.images(step, "samples", images)
            if jax.process_index() == 0:
                (self.workdir / "samples").mkdir(exist_ok=True)
                plots.image_grid(images, self.workdir / "samples" / f"step_{step:06d}.png", 4, self.prompts)
            return {"eval_seconds": time.perf_counter() - t0, **self.measure(images)}

        run.due = due
        return run


def _embeddings(c: ml_collections.ConfigDict, pipe: Pipeline, prompts: list[str], path: Path) -> dict:
    """The call's prompt_embeds (and negative_prompt_embeds) of the eval prompts, as numpy: encoded, and kept
    in `path` for the resumed runs, which then need no text encoder at all (the pipeline reads its encoders on
    first use). The file holds what made it; another config's or pipeline's embeddings are made again."""
    e = c.eval
    made_by = [prompts, e.max_sequence_length, e.guidance, c.sample.negative_prompt, c.model, c.pipeline, c.dtype]
    made_by = json.dumps([str(x) if not isinstance(x, list) else x for x in made_by])
    if path.is_file():
        with np.load(path) as stored:
            if str(stored["made_by"]) == made_by:
                dtypes = json.loads(str(stored["dtypes"]))
                arrays = {n: stored[n].view(dtypes[n]) for n in dtypes}  # ml_dtypes names bfloat16 for numpy
                return {k: (arrays[f"{k}.0"], arrays[f"{k}.1"]) for k in _KEYS if f"{k}.0" in arrays}
    encoded = dict(prompt_embeds=pipe.encode_prompt(prompts, e.max_sequence_length))
    negative = pipe.negative_embeds(c.sample.negative_prompt, len(prompts), e.guidance, e.max_sequence_length)
    if negative is not None:
        encoded["negative_prompt_embeds"] = negative
    encoded = {k: tuple(np.asarray(x) for x in v) for k, v in encoded.items()}
    if jax.process_index() == 0:  # written whole under a temporary name: a reader sees it complete or not at all
        arrays = {f"{k}.{i}": x for k, v in encoded.items() for i, x in enumerate(v)}
        dtypes = json.dumps({n: x.dtype.name for n, x in arrays.items()})
        bits = {n: x.view(np.uint16) if x.dtype == ml_dtypes.bfloat16 else x for n, x in arrays.items()}
        with files.replaced(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, made_by=np.asarray(made_by), dtypes=np.asarray(dtypes), **bits)
    return encoded


_KEYS = ("prompt_embeds", "negative_prompt_embeds")


def _global(data: NamedSharding, x: np.ndarray) -> jax.Array:
    """`x`, whole on every process, as a global array on `data`: each process keeps the rows it holds."""
    return global_rows(data, len(x), lambda i: x[i])
