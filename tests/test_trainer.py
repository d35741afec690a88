"""The training loop: resume gives the uninterrupted run's losses (each step once in metrics.jsonl after a
crash), the progress bar, overfitting works, NaN policy, metrics read one step late."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_batches import ArrayBatches, DiesAt, Killed
from helpers import save_component, sequence_degrees
from torch_flux import make_flux

from d4k_jax import lagged_metrics, sharding
from d4k_jax import train_step as ts
from d4k_jax import trainer as trainer_module
from d4k_jax.io import load_component
from d4k_jax.io.components import kind_of_module
from d4k_jax.metric_writers import drop_rows_after
from d4k_jax.trainer import NonFiniteLoss, Trainer


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return load_component(save_component(make_flux(seed=6), tmp_path_factory.mktemp("flux")))


FOUR_HEADS = dict(num_attention_heads=4, attention_head_dim=8, axes_dims_rope=(2, 2, 4))


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x0": rng.normal(size=(n, 8, 8, 4)).astype(np.float32),
        "text": rng.normal(size=(n, 5, 24)).astype(np.float32),
        "pooled": rng.normal(size=(n, 12)).astype(np.float32),
    }


def _trainer(flux, lr=1e-3, devices=8, **kw):
    module, params = flux
    mesh = sharding.make_mesh({"data": 2, "fsdp": devices // 2}, jax.devices()[:devices])
    inputs = kind_of_module(module).init_inputs(module.config)
    return Trainer(module, params, ts.optimizer(lr=lr), ts.LossConfig(), mesh, init_inputs=inputs, **kw)


@pytest.fixture(scope="module")
def fresh_trainer(flux):
    """A trainer on 2 devices back at its initial state: one for the tests that would each build one (tracing and
    compiling its step costs about 8 s of CPU; a fit of a few steps, under 2 s)."""
    trainer = _trainer(flux, devices=2)
    initial = jax.tree.map(jnp.copy, trainer.state)

    def fresh():
        trainer.state = jax.tree.map(jnp.copy, initial)  # the step donates its state
        return trainer

    return fresh


class _NanAt(ArrayBatches):
    """Batch `at` (counted from 1) holds a NaN."""

    def __init__(self, data, batch_size, at):
        super().__init__(data, batch_size)
        self.at = at

    def __next__(self):
        batch = super().__next__()
        if self.i == self.at:
            batch["x0"][:, 0, 0, 0] = np.nan  # a copy: ArrayBatches indexes with an array
        return batch


def test_resume_gives_the_uninterrupted_losses(flux, fresh_trainer, tmp_path, capsys):
    data = _data(n=16)
    trainer = _trainer(flux, peak_flops=1e12)
    initial = jax.tree.map(jnp.copy, trainer.state)  # the step donates its state
    a = trainer.fit(ArrayBatches(data, 8), tmp_path / "a", 6, checkpoint_every=3, progress=False)
    assert all(0 < r["mfu"] < 1 for r in a)  # logged where the device peak is known (here: given)
    assert "/6 [" not in capsys.readouterr().err  # no bar when not wanted
    # the same trainer from its first state, killed before step 6: steps 4 and 5 are logged but the last checkpoint
    # is step 3's
    trainer.state = initial
    with pytest.raises(Killed):
        trainer.fit(DiesAt(data, 8, at=5), tmp_path / "b", 6, checkpoint_every=3)
    capsys.readouterr()
    # resumed on 2 devices (the fixture's trainer): restoring onto a different device count works too
    resumed = fresh_trainer().fit(ArrayBatches(data, 8), tmp_path / "b", 6, checkpoint_every=3)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in a[3:]], rtol=1e-5)
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6] and {"loss", "grad_norm", "images_per_s"} <= set(lines[0])
    assert [x["loss"] for x in lines[3:]] == [r["loss"] for r in resumed]  # the resumed run's rows, each once
    # the bar (stderr, process 0) starts at the resumed step and ends with the last loss and images/s
    err = capsys.readouterr().err
    assert " 3/6 [" in err and " 6/6 [" in err and " 1/6 [" not in err, err
    assert f"loss={resumed[-1]['loss']:.4g}" in err and "img/s=" in err, err


def test_sequence_parallel_training_gives_the_one_device_losses(tmp_path, monkeypatch):
    """train.mesh sequence 4 x fsdp 2: each image's 16 tokens over 4 devices (nn.ulysses; 5 text tokens stay
    replicated), two images over fsdp; the losses of the run on one device."""
    degrees = sequence_degrees(monkeypatch)
    flux4 = load_component(save_component(make_flux(seed=7, **FOUR_HEADS), tmp_path / "flux4"))
    module, params = flux4
    inputs = kind_of_module(module).init_inputs(module.config)
    losses = {}
    for name, shape, n in (("split", {"sequence": 4, "fsdp": 2}, 8), ("one", {"fsdp": 1}, 1)):
        mesh = sharding.make_mesh(shape, jax.devices()[:n])
        trainer = Trainer(module, params, ts.optimizer(lr=1e-3), ts.LossConfig(), mesh, init_inputs=inputs)
        losses[name] = [r["loss"] for r in trainer.fit(ArrayBatches(_data(n=6), 2), tmp_path / name, 3)]
    np.testing.assert_allclose(losses["split"], losses["one"], rtol=1e-5)
    assert max(degrees) == 4


def test_drop_rows_after_keeps_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in range(1, 6))
    path.write_text(rows + '{"step": 6, "lo')  # a row a kill cut short
    assert drop_rows_after(path, 3) == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    assert drop_rows_after(path, 3) == 0 and path.read_text() == rows[: rows.index('{"step": 4')]
    path.write_text(rows[:-1])  # whole rows, the last without its newline: completed so the next row does not join it
    assert drop_rows_after(path, 5) == 0 and path.read_text() == rows
    assert drop_rows_after(tmp_path / "missing.jsonl", 0) == 0 and not (tmp_path / "missing.jsonl").exists()


def test_overfitting_two_examples_drives_the_loss_down(flux, tmp_path):
    data = _data(n=2, seed=1)
    trainer = _trainer(flux, lr=1e-2, devices=2)
    rng = np.random.default_rng(2)
    noise = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    sigma = np.array([0.4, 0.8], np.float32)

    batch = {k: jnp.asarray(v) for k, v in data.items()}
    loss = jax.jit(lambda params: ts.loss_from_noise(trainer.model, params, batch, noise, sigma, trainer.cfg))
    eval_loss = lambda: float(loss(jax.device_get(trainer.state.params)))  # one compile, not one per op

    before = eval_loss()
    trainer.fit(ArrayBatches(data, 2), tmp_path, 100, log_every=10, checkpoint_every=1000)
    after = eval_loss()
    assert after < 0.6 * before, (before, after)  # measured 0.98 -> 0.52 (the noise is redrawn every step)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_policy(flux, tmp_path, policy):
    data = _data(n=4)
    data["x0"][:, 0, 0, 0] = np.nan
    trainer = _trainer(flux, devices=4, nan_policy=policy)
    before = jax.device_get(trainer.state.params)
    if policy == "stop":  # a ValueError: the CLIs print its message as one `error:` line
        with pytest.raises(
            ValueError, match=r"step 1: the loss is nan .* no checkpoint was saved yet.* nan_policy='skip'"
        ) as e:
            trainer.fit(ArrayBatches(data, 4), tmp_path, 1)
        assert isinstance(e.value, NonFiniteLoss)
        return
    rows = trainer.fit(ArrayBatches(data, 4), tmp_path, 2)
    assert [r["skipped"] for r in rows] == [True, True] and int(trainer.state.step) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.state.params), before)


def test_metrics_are_read_one_step_late(fresh_trainer, tmp_path, monkeypatch):
    """Step N + 1 is dispatched before step N's metrics are read, except where something uses step N's state:
    a checkpoint (steps 1, 4, 6: the first, every 4th, the last) or a hook due there (step 2; hooks not due
    are called at every step, before a checkpoint, as before). Batch N + 1 is fetched after step N is
    dispatched and saved (a checkpoint holds the data state after batch N); hooks see each step with its
    state. The rows are those of the same steps taken one at a time."""
    data, trainer = _data(n=4), fresh_trainer()
    step_fn, state = trainer._step, jax.tree.map(jnp.copy, trainer.state)  # the step donates its state
    batches, want = ArrayBatches(data, 2), []
    with jax.set_mesh(trainer.mesh):
        for _ in range(6):
            state, metrics = step_fn(state, trainer._next_batch(batches, None)[0], trainer.key, trainer.vae_params)
            want.append(float(jax.device_get(metrics)["loss"]))

    events, calls = [], itertools.count(1)

    def step(*args):
        events.append(f"step {(n := next(calls))}")
        state, metrics = step_fn(*args)
        return state, {**metrics, "n": n}

    class Batches(ArrayBatches):
        def __next__(self):
            events.append(f"batch {self.i + 1}")
            return super().__next__()

    def hook(step, state, writer):
        events.append(f"hook {step} {int(state.step)}")

    hook.due = lambda step: step == 2
    items = trainer_module._checkpoint_items
    monkeypatch.setattr(trainer, "_step", step)
    monkeypatch.setattr(lagged_metrics, "device_get", lambda m: events.append(f"read {m['n']}") or jax.device_get(m))
    monkeypatch.setattr(trainer_module, "_checkpoint_items", lambda *a: events.append(f"save {a[1].i}") or items(*a))
    rows = trainer.fit(Batches(data, 2), tmp_path, 6, checkpoint_every=4, hooks=[hook], progress=False)
    assert events == [
        *("batch 1", "step 1", "hook 1 1", "read 1", "save 1", "batch 2"),
        *("step 2", "read 2", "hook 2 2", "batch 3"),
        *("step 3", "hook 3 3", "batch 4"),
        *("step 4", "read 3", "hook 4 4", "read 4", "save 4", "batch 5"),
        *("step 5", "hook 5 5", "batch 6"),
        *("step 6", "read 5", "hook 6 6", "read 6", "save 6"),
    ]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(r["step_time"] > 0 for r in rows)
    assert [r["loss"] for r in rows] == want


@pytest.mark.parametrize("at", [3, 4])
def test_a_non_finite_step_stops_at_its_step_and_keeps_the_last_good_checkpoint(fresh_trainer, tmp_path, at):
    """nan_policy 'stop', checkpoints every 2 steps: step 3's metrics are read one step late (after step 4 is
    dispatched), step 4's at once (before its checkpoint). Either way the error names the step, no checkpoint
    is written past step 2, and metrics.jsonl holds the steps before it."""
    with pytest.raises(NonFiniteLoss, match=rf"step {at}: the loss is nan .*the checkpoint of step 2 is kept"):
        fresh_trainer().fit(_NanAt(_data(n=4), 2, at), tmp_path, 6, checkpoint_every=2, progress=False)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [1, 2]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, at))
