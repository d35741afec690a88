"""The training loop: sharded state, jitted step, metrics.jsonl, orbax checkpoints, resume, NaN policy.

`Trainer(model, params, tx, loss_cfg, mesh, ...)` owns the step; `fit(batches, workdir, num_steps)` runs
it from the latest checkpoint in `workdir/checkpoints` (or from step 0), logging one JSON line per
`log_every` steps to `workdir/metrics.jsonl`. Batches are dicts of x0 [B, h, w, C], text [B, T, D] and
pooled [B, P] (precomputed by the frozen VAE and text encoders); a batch iterator with a
`set_step(step)` method is told where a resumed run starts, so the data order is reproducible.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from d4k_jax import sharding
from d4k_jax import train_step as ts


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        params: Any,
        tx: optax.GradientTransformation,
        loss_cfg: ts.LossConfig,
        mesh: Mesh,
        *,
        init_inputs: tuple,
        rules: sharding.Rules = sharding.DEFAULT_RULES,
        seed: int = 0,
        nan_policy: str = "stop",
    ):
        if nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {nan_policy!r}")
        self.model, self.tx, self.cfg, self.mesh, self.rules = model, tx, loss_cfg, mesh, rules
        self.key, self.nan_policy = jax.random.key(seed), nan_policy
        abstract = jax.eval_shape(model.init, jax.random.key(0), *init_inputs)
        self.param_sharding = sharding.params_sharding(mesh, rules, abstract)["params"]
        self.data_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        # a copy: the step donates the state, and the caller's arrays must stay valid
        params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.param_sharding)(params)
        replicated = NamedSharding(mesh, PartitionSpec())
        # moments sharded like the parameters they follow, everything else (step counts) replicated
        opt_shardings = optax.tree_map_params(
            tx,
            lambda _, s: s,
            jax.eval_shape(tx.init, params),
            self.param_sharding,
            transform_non_params=lambda _: replicated,
        )
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        self.state = ts.TrainState(step, params, opt_state)
        self._step = jax.jit(self._train_step, donate_argnums=0)

    def _train_step(self, state, batch, key):
        with nn.logical_axis_rules(self.rules):
            new, metrics = ts.train_step(state, batch, key, model=self.model, tx=self.tx, cfg=self.cfg)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        if self.nan_policy == "skip":  # keep the old parameters and optimizer state, count the step
            new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state.replace(step=state.step + 1))
        return new, {**metrics, "finite": finite}

    def fit(
        self,
        batches: Iterator[dict],
        workdir: str | Path,
        num_steps: int,
        *,
        log_every: int = 1,
        checkpoint_every: int = 1000,
        keep: int = 2,
    ) -> list[dict]:
        """Train up to `num_steps` (resuming from the latest checkpoint); returns the logged metrics."""
        workdir = Path(workdir).absolute()
        workdir.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(save_interval_steps=checkpoint_every, max_to_keep=keep)
        logged = []
        with ocp.CheckpointManager(workdir / "checkpoints", options=options) as manager:
            if manager.latest_step() is not None:
                self.restore(manager, manager.latest_step())
            start = int(self.state.step)
            if hasattr(batches, "set_step"):
                batches.set_step(start)
            with (workdir / "metrics.jsonl").open("a") as log, jax.set_mesh(self.mesh):
                for step in range(start, num_steps):
                    t0 = time.perf_counter()
                    batch = next(batches)
                    ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
                    if batch["x0"].shape[0] % ways:
                        raise ValueError(
                            f"global batch {batch['x0'].shape[0]} must divide over {ways} data x fsdp devices"
                        )
                    batch = jax.device_put(batch, self.data_sharding)
                    self.state, metrics = self._step(self.state, batch, self.key)
                    metrics = jax.device_get(metrics)
                    if not metrics["finite"]:
                        message = f"non-finite loss {metrics['loss']} or grad norm at step {step}"
                        if self.nan_policy == "stop":
                            raise NonFiniteLoss(message + " (nan_policy='stop'; 'skip' drops such steps)")
                        logging.warning("%s: step skipped", message)
                    seconds = time.perf_counter() - t0
                    if (step + 1) % log_every == 0 or step + 1 == num_steps:
                        row = {
                            "step": step + 1,
                            "loss": float(metrics["loss"]),
                            "grad_norm": float(metrics["grad_norm"]),
                            "sigma_mean": float(metrics["sigma_mean"]),
                            "skipped": not bool(metrics["finite"]),
                            "step_time": seconds,
                            "images_per_s": batch["x0"].shape[0] / seconds,
                        }
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                        logged.append(row)
                    manager.save(step + 1, args=ocp.args.StandardSave(self.state), force=step + 1 == num_steps)
            manager.wait_until_finished()
        return logged

    def restore(self, manager: ocp.CheckpointManager, step: int) -> None:
        """Restore onto this trainer's shardings (so a different device count works)."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), self.state
        )
        self.state = manager.restore(step, args=ocp.args.StandardRestore(target))
        logging.info("resumed from step %d", int(self.state.step))


class ArrayBatches:
    """Batches of a fixed in-memory dataset, shuffled per epoch from one seed: batch i is a function of
    (seed, i) alone, so a resumed run sees the same data as an uninterrupted one."""

    def __init__(self, data: dict[str, np.ndarray], batch_size: int, seed: int = 0):
        self.data, self.batch_size, self.seed, self.i = data, batch_size, seed, 0
        self.n = len(next(iter(data.values())))
        if self.n < batch_size:
            raise ValueError(f"{self.n} examples cannot fill a batch of {batch_size}")

    def set_step(self, step: int) -> None:
        self.i = step

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        per_epoch = self.n // self.batch_size
        epoch, j = divmod(self.i, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        idx = order[j * self.batch_size : (j + 1) * self.batch_size]
        self.i += 1
        return {k: v[idx] for k, v in self.data.items()}
