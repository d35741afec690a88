"""The training loop: sharded state, one jitted step, metrics, orbax checkpoints, resume, SIGTERM, NaN policy.

`Trainer(model, params, tx, loss_cfg, mesh, ...)` owns the step; `fit(batches, workdir, num_steps)` runs it
from the latest checkpoint in `workdir/checkpoints` (or from step 0). Each checkpoint holds the train state
(params, optimizer state, step) and, when the batch iterator has `get_state` / `set_state` (a JSON-able
dict: d4k_jax.data.input_pipeline's loader, tests/array_batches.py), the iterator's state per process plus
the data position (records read, global batch, process count), so a resumed run sees the same data: from
the iterator's state when the process count and global batch are the same, else from the position
(`_restore_data`). Under LoRA training (`base`) the state's params are the adapters alone, so the checkpoints
hold nothing of the frozen transformer. The run's randomness is fold_in(key(seed), step): the seed in the config
is the whole RNG state. A SIGTERM to any one process makes every process save the same step and return
(d4k_jax/preemption.py).

Batches are dicts of `image` [B, H, W, 3] (encoded by the frozen `vae` inside the step) or `x0` latents,
plus `text` [B, T, D] and `pooled` [B, P]; `prepare(batch)` turns what the iterator yields into that
(e.g. looks text embeddings up in the cache by record key).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from d4k_jax import checkpoint, flops, lora, sharding, train_state
from d4k_jax import train_step as ts
from d4k_jax.lagged_metrics import LaggedMetrics, StepMetrics
from d4k_jax.metric_writers import MetricWriter
from d4k_jax.preemption import Preemption


class NonFiniteLoss(ValueError):
    """The loss or gradient norm of a step is NaN/inf under nan_policy='stop'. A ValueError: a value the run
    was given (data, learning rate) made it, and the CLIs report it as one `error:` line."""


# (step, state, writer) -> metrics to log, at every step. A hook may have `due(step) -> bool` (it uses that step's
# state: the loop checks the step first); one without is due at every step (no overlap: d4k_jax/lagged_metrics.py)
Hook = Callable[[int, ts.TrainState, MetricWriter], dict | None]


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
        vae: tuple[nn.Module, Any] | None = None,
        microbatches: int = 1,
        encode_passes: int = 1,
        lr_schedule: optax.Schedule | None = None,
        peak_flops: float | None = None,
        trainable: Any = None,
        base: ts.Frozen | None = None,
        lora_dropout: float = 0.0,
    ):
        """`trainable`: the mask of trained parameters (see train_step.train_step; default
        train_step.trainable_mask); give `tx` the same one (train_step.optimizer(trainable=...)).
        The state and the step are train_state's, which the memory benchmarks lower too.

        LoRA training: `params` are the adapters (d4k_jax/lora.py, float32) and `base` the frozen transformer
        (placed on its train shardings, in its own dtype) with the adapters' scales; the state, and so every
        checkpoint, holds the adapters, their optimizer state and the step only."""
        self.model, self.tx, self.cfg, self.mesh, self.rules = model, tx, loss_cfg, mesh, rules
        self.key, self.nan_policy, self.lr_schedule = jax.random.key(seed), nan_policy, lr_schedule
        self.peak_flops = peak_flops or flops.peak_flops(mesh.devices.flat[0])
        self._model_flops: float | None = None
        self._records: int | None = 0  # the loader's records read so far (see _restore_data)
        self.base = base if base is None else _placed_base(base, model, init_inputs, mesh, rules)
        trained = None if base is None else lora.abstract(params, self.base.params)
        self._frozen = () if base is None else (self.base,)  # the step's last input: LoRA's frozen base
        abstract = train_state.abstract_train_state(model, init_inputs, tx, mesh, rules, params=trained)
        self.state_sharding = train_state.shardings_of(abstract)
        self.param_sharding = self.state_sharding.params
        self.data_sharding = train_state.data_sharding(mesh)
        vae_module, vae_params = vae if vae else (None, None)  # a pipeline Component, or any (module, params) pair
        self._step = train_state.make_train_step(
            model,
            tx,
            loss_cfg,
            mesh,
            rules,
            self.state_sharding,
            vae=vae_module,
            microbatches=microbatches,
            encode_passes=encode_passes,
            trainable=trainable,
            nan_policy=nan_policy,
            base_sharding=None if base is None else train_state.shardings_of(self.base),
            lora_dropout=lora_dropout,
        )
        self.state = train_state.init_train_state(params, tx, abstract)
        replicated = train_state.replicated(mesh)
        self.vae, self.vae_params = vae_module, None if vae_params is None else jax.device_put(vae_params, replicated)

    # One loop, so that the order of dispatch, metrics read, hooks, preemption, save and next batch reads in one place.
    def fit(
        self,
        batches: Iterator[dict],
        workdir: str | Path,
        num_steps: int,
        *,
        log_every: int = 1,
        checkpoint_every: int = 1000,
        keep: int = 2,
        prepare: Callable[[dict], dict] | None = None,
        hooks: Sequence[Hook] = (),
        metadata: dict | None = None,
        progress: bool = True,
    ) -> list[dict]:
        """Train up to `num_steps` (resuming from the latest checkpoint); returns the logged metrics.

        A SIGTERM (preemption) to any process finishes a step, the same one on every process, saves its
        checkpoint and returns early. `metadata` (e.g. the run's config) is stored with the checkpoints
        (`CheckpointManager.metadata()`). Rows that a crash logged past the restored step are dropped from
        metrics.jsonl (see metric_writers). `progress` shows a bar on process 0's stderr: step (from the
        resumed one), loss, images/s, time left. Step N's metrics are read after step N + 1 is dispatched
        (d4k_jax/lagged_metrics.py: its `seconds` are the rows' step_time), except at a checkpoint or a due hook.
        """
        workdir = Path(workdir).absolute()
        workdir.mkdir(parents=True, exist_ok=True)
        data = batches if hasattr(batches, "get_state") and hasattr(batches, "set_state") else None
        logged, self._records = [], 0
        with _checkpoints(workdir, checkpoint_every, keep, data, metadata) as manager, Preemption() as preempted:
            if manager.latest_step() is not None:
                self.restore(manager, manager.latest_step(), data)
            start = int(self.state.step)
            preempted(start)  # every process's step count starts at the restored step (see Preemption)
            with (
                MetricWriter(workdir, resume_step=start) as writer,
                _progress_bar(start, num_steps, progress) as bar,
                jax.set_mesh(self.mesh),
                LaggedMetrics(
                    functools.partial(self._check_finite, manager),
                    functools.partial(self._log, writer, bar, logged, log_every, num_steps),
                ) as lagged,
            ):
                batch, size = self._next_batch(batches, prepare) if start < num_steps else (None, 0)
                for step in range(start + 1, num_steps + 1):  # the number of the step being taken
                    # records read: None after a checkpoint that did not record them (see _restore_data)
                    self._records = (start * size if self._records is None else self._records) + size
                    self.state, metrics = self._step(self.state, batch, self.key, self.vae_params, *self._frozen)
                    flops = self.model_flops(batch) if self.peak_flops else 0.0
                    lagged.add(step, metrics, size=size, flops=flops)  # reads step - 1's while this one runs
                    if _due(hooks, step):
                        lagged.read_pending()  # checked before a hook uses this state
                    with lagged.paused():
                        lagged.pending.context["extra"] = _run_hooks(hooks, step, self.state, writer)
                    bar.update()
                    stop = preempted(step)  # asked by every process at every step
                    if stop or step == num_steps or manager.should_save(step):
                        lagged.take()  # checked before a checkpoint holds this state
                        with lagged.paused():
                            items = _checkpoint_items(self.state, data, self._records, size)
                            manager.save(step, args=items, force=True)
                    if stop:
                        logging.warning("SIGTERM: saved the checkpoint of step %d; rerun to resume", step)
                        break
                    if step < num_steps:  # fetched after the save: checkpoint `step` holds the data after batch `step`
                        batch, size = self._next_batch(batches, prepare)
            manager.wait_until_finished()
        return logged

    def _next_batch(self, batches: Iterator[dict], prepare: Callable[[dict], dict] | None) -> tuple[dict, int]:
        """(the next global batch sharded over data x fsdp, its global size)."""
        batch = next(batches)
        batch = prepare(batch) if prepare else batch
        size = len(next(iter(batch.values()))) * jax.process_count()
        ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if size % ways:
            raise ValueError(f"global batch {size} must divide over {ways} data x fsdp devices")
        return _global_batch(batch, self.data_sharding), size

    def _check_finite(self, manager: ocp.CheckpointManager, step: int, metrics: dict) -> None:
        """A step that is not finite: nan_policy 'stop' raises NonFiniteLoss with the step, the values, the
        checkpoint kept and what to do; 'skip' warns."""
        if metrics["finite"]:
            return
        kept = manager.latest_step()
        what = f"step {step}: the loss is {metrics['loss']} and the gradient norm {metrics['grad_norm']} (not finite)"
        if self.nan_policy == "skip":
            logging.warning("%s: step skipped (nan_policy='skip'), parameters and optimizer state unchanged", what)
            return
        saved = (
            f"the checkpoint of step {kept} is kept (a rerun resumes there)"
            if kept is not None
            else "no checkpoint was saved yet (a rerun starts over)"
        )
        raise NonFiniteLoss(
            f"{what}; training stopped (nan_policy='stop'), {saved}. Look for NaN/inf in the data, lower the "
            "learning rate, or set nan_policy='skip' (--config.train.nan_policy=skip) to skip such steps"
        )

    def _log(self, writer: MetricWriter, bar: tqdm, logged: list, every: int, last: int, s: StepMetrics) -> None:
        """Write step `s`'s row (and add it to `logged`) every `every` steps, at the `last` step, and when a
        hook added metrics."""
        extra = s.context.get("extra", {})  # none when a hook raised
        if s.step % every == 0 or s.step == last or extra:
            row = self._row(s.step, s.metrics, s.seconds, s.context["size"], s.context["flops"])
            logged.append(_write_row({**row, **extra}, writer, bar))

    def _row(self, step: int, metrics: dict, seconds: float, size: int, flops: float) -> dict:
        row = {
            "step": step,
            "loss": float(metrics["loss"]),
            "grad_norm": float(metrics["grad_norm"]),
            "sigma_mean": float(metrics["sigma_mean"]),
            "skipped": not bool(metrics["finite"]),
            "step_time": seconds,
            "images_per_s": size / seconds,
        }
        if self.lr_schedule is not None:
            row["lr"] = float(self.lr_schedule(step - 1))
        if self.peak_flops:
            row["mfu"] = flops / (seconds * self.peak_flops * self.mesh.devices.size)
        return row

    def model_flops(self, batch: dict) -> float:
        """3 x the transformer forward's FLOPs for this global batch (see d4k_jax/flops.py)."""
        if self._model_flops is None:
            x0 = batch["x0"] if "x0" in batch else self._latents_shape(batch["image"])
            b = x0.shape[0]
            t = jax.ShapeDtypeStruct((b,), jnp.float32)
            args = [x0, t, batch["text"], batch["pooled"]] + ([t] if self.cfg.model == "flux" else [])
            args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
            shaped = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
            variables = jax.tree.map(shaped, self.variables(self.state.params))
            with nn.logical_axis_rules(self.rules):
                fwd = flops.forward_flops(lambda v, *a: self.model.apply(v, *a), variables, *args)
            self._model_flops = 3 * fwd
        return self._model_flops

    def variables(self, params: Any) -> dict:
        """What the model's apply takes for the trained `params` (the state's): with a LoRA base, base + adapters."""
        return {"params": params} if self.base is None else lora.variables(self.base.params, params, self.base.scales)

    def _latents_shape(self, images) -> jax.ShapeDtypeStruct:
        f = self.vae.config.downsample_factor
        b, h, w, _ = images.shape
        return jax.ShapeDtypeStruct((b, h // f, w // f, self.vae.config.latent_channels), jnp.float32)

    def restore(self, manager: ocp.CheckpointManager, step: int, batches: Any = None) -> None:
        """Restore onto this trainer's shardings (so a different device count works) and the iterator's
        position (`_restore_data`: any process count)."""
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        self.state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        self._records = None if batches is None else _restore_data(manager, step, batches)
        logging.info("resumed from step %d", int(self.state.step))


def _placed_base(base: ts.Frozen, model: nn.Module, init_inputs: tuple, mesh: Mesh, rules) -> ts.Frozen:
    """The LoRA base on the mesh: its params on their train shardings (as they are, when already there: a
    pipeline loaded with sharding=(mesh, rules)), the scales replicated."""
    want = train_state.shardings_of(train_state.abstract_params(model, init_inputs, mesh, rules))
    there = jax.tree.leaves(jax.tree.map(lambda a, s: getattr(a, "sharding", None) == s, base.params, want))
    params = base.params if all(there) else jax.device_put(base.params, want)
    return ts.Frozen(params, jax.device_put(base.scales, train_state.replicated(mesh)))


def _checkpoints(workdir: Path, every: int, keep: int, data: Any, metadata: dict | None) -> ocp.CheckpointManager:
    """The manager of workdir/checkpoints: item "state" (the TrainState, orbax's standard handler) and, for an
    iterator with get_state / set_state (`data`), items "data" (grain's handler: one JSON file per process)
    and "position" (one JSON: records read, global batch, process count; see _restore_data)."""
    checkpoint.write_small_arrays_whole()
    handlers = {"state": ocp.StandardCheckpointHandler()}
    if data is not None:
        handlers |= {"data": grain.checkpoint.CheckpointHandler(), "position": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep)
    return ocp.CheckpointManager(workdir / "checkpoints", options=options, item_handlers=handlers, metadata=metadata)


def _checkpoint_items(state: ts.TrainState, data: Any, records: int, global_batch: int) -> ocp.args.Composite:
    """What `_checkpoints`' manager saves: the state and, when there is one, the iterator's state and position."""
    items = {"state": ocp.args.StandardSave(state)}
    if data is not None:
        position = {"records": records, "global_batch": global_batch, "process_count": jax.process_count()}
        items |= {"data": grain.checkpoint.CheckpointSave(_JsonState(data)), "position": ocp.args.JsonSave(position)}
    return ocp.args.Composite(**items)


def _restore_data(manager: ocp.CheckpointManager, step: int, batches: Any) -> int | None:
    """Put `batches` where the run saved in checkpoint `step` was; returns the records read by then (None:
    not recorded, a checkpoint from before the position was).

    grain's state (one file per process) is exact, filtered records included, but only for the process
    count and global batch that wrote it. Otherwise the iterator's `seek(records)` recomputes the position
    (the loader's global order does not depend on the process count): records dropped as undecodable before
    it are not counted, so that many are read again. A checkpoint without a position is taken to have read
    `step` global batches of this run's size.
    """
    folder = Path(manager.directory) / str(step)
    position = None
    if (folder / "position").is_dir():
        position = manager.restore(step, args=ocp.args.Composite(position=ocp.args.JsonRestore()))["position"]
    size = getattr(batches, "global_batch_size", None)
    saved = (position or {}).get("process_count", jax.process_count()), (position or {}).get("global_batch", size)
    mine = folder / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if mine.is_file() and saved[0] == jax.process_count() and (size is None or saved[1] == size):
        manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(_JsonState(batches))))
        return position["records"] if position else None
    if not hasattr(batches, "seek") or (position is None and size is None):
        raise ValueError(
            f"{folder} holds the data iterator's state of {saved[0]} process(es) and a global batch of {saved[1]}, "
            f"which does not restore onto {jax.process_count()} process(es) and a global batch of {size}: that "
            "needs an iterator with seek(records) and global_batch_size (as d4k_jax.data.input_pipeline's loader)"
        )
    records = position["records"] if position else step * size
    done = batches.seek(records)
    logging.warning(
        "data position recomputed for %d process(es) and a global batch of %s (the checkpoint's: %d and %s): "
        "%d records read up to step %d, resuming at record %d (records dropped as undecodable are read again)",
        *(jax.process_count(), size, *saved, records, step, done),
    )
    return done


def _due(hooks: Sequence[Hook], step: int) -> bool:
    """Whether any hook uses the state of `step` (see Hook)."""
    return any(getattr(hook, "due", lambda _: True)(step) for hook in hooks)


def _run_hooks(hooks: Sequence[Hook], step: int, state: ts.TrainState, writer: MetricWriter) -> dict:
    """The metrics the hooks return for this step, merged in order (empty: nothing to add to the row)."""
    extra = {}
    for hook in hooks:
        extra.update(hook(step, state, writer) or {})
    return extra


def _write_row(row: dict, writer: MetricWriter, bar: tqdm) -> dict:
    """Log `row` to the metric writers and the progress bar's postfix; returns it."""
    writer.write(row)
    bar.set_postfix({"loss": f"{row['loss']:.4g}", "img/s": f"{row['images_per_s']:.3g}"}, False)
    return row


def _progress_bar(start: int, num_steps: int, enabled: bool) -> tqdm:
    """tqdm over the steps from `start` (a resumed run's bar starts there, and its time left counts only the
    steps this run takes), on process 0; sparser updates when stderr is a log file rather than a terminal."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=num_steps,
        initial=start,
        desc="train",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=interactive,
        mininterval=0.1 if interactive else 30,
        disable=not enabled or jax.process_index() != 0,
    )


def _global_batch(batch: dict, data_sharding: NamedSharding) -> dict:
    """Each process's rows -> one global array per key, sharded over data x fsdp (one process: a device_put)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(data_sharding, x), batch)


class _JsonState:
    """An iterator whose state is a JSON-able dict, as grain's checkpoint handler takes it (JSON bytes)."""

    def __init__(self, iterator):
        self.iterator = iterator

    def get_state(self) -> bytes:
        return json.dumps(self.iterator.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        getattr(self.iterator, "start_prefetch", lambda: None)()
