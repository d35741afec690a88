"""LoRA training (the adapters only, on a frozen base): one step's adapter gradients equal peft's on the torch
reference (WLF loss), adapter dropout, and the Trainer's LoRA run: the loss falls, the checkpoint holds only the
adapters, their optimizer state and the step, and a resumed run continues with the uninterrupted run's losses."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_batches import ArrayBatches, DiesAt, Killed
from conftest import MODEL_TOL, rel_err
from flax import traverse_util
from helpers import save_component
from peft_lora import add_peft_lora, to_adapters
from test_train_step import _torch_loss
from torch_flux import make_flux
from torch_sd3 import make_sd3

from d4k_jax import lora, sharding
from d4k_jax import train_step as ts
from d4k_jax.io import load_component
from d4k_jax.io.components import kind_of_module
from d4k_jax.models.keymap import shapes_of
from d4k_jax.nn.linear import lora_dropout
from d4k_jax.pipelines import FluxPipeline
from d4k_jax.trainer import Trainer

RANK, ALPHA = 4, 8


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_lora_gradients_equal_peft(tmp_path, kind):
    """fp32 both sides: the same x0, noise, sigma and text; the adapters' gradients of the WLF loss."""
    model = make_flux(seed=3) if kind == "flux" else make_sd3(seed=3)
    module, base = load_component(save_component(model, tmp_path / kind))
    targets = lora.DEFAULT_TARGETS + (("proj_mlp",) if kind == "flux" else ())
    add_peft_lora(model, targets, RANK, ALPHA, seed=5, std=0.1)
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    eps = rng.normal(size=x0.shape).astype(np.float32)
    sigma = np.array([0.3, 0.9], np.float32)
    text = rng.normal(size=(2, 7, 24 if kind == "flux" else 20)).astype(np.float32)
    pooled = rng.normal(size=(2, 12)).astype(np.float32)
    ref_loss = _torch_loss(kind, model, x0, eps, sigma, text, pooled)
    ref_loss.backward()

    shapes = shapes_of(base)
    found = lora.resolve(module, shapes, targets)
    adapters = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), to_adapters(model, module, shapes, targets))
    want = to_adapters(model, module, shapes, targets, grads=True)
    frozen = ts.Frozen(base, lora.scales(found, ALPHA / RANK))
    batch = {"x0": jnp.asarray(x0), "text": jnp.asarray(text), "pooled": jnp.asarray(pooled)}
    cfg = ts.LossConfig(model=kind)
    fn = lambda a: ts.loss_from_noise(module, a, batch, jnp.asarray(eps), jnp.asarray(sigma), cfg, frozen)
    loss, grads = jax.jit(jax.value_and_grad(fn))(adapters)
    assert rel_err(loss, ref_loss.item()) < MODEL_TOL
    got, ref = traverse_util.flatten_dict(grads), traverse_util.flatten_dict(want)
    assert got.keys() == ref.keys() and len(got) >= 16
    errs = sorted(((rel_err(got[k], ref[k]), "/".join(k)) for k in got), reverse=True)
    assert errs[0][0] < MODEL_TOL, errs[:3]


def test_adapter_dropout_is_on_the_adapter_input_only(tmp_path):
    module, base = load_component(save_component(make_flux(seed=1), tmp_path / "flux"))
    found = lora.resolve(module, shapes_of(base), lora.DEFAULT_TARGETS)
    adapters = lora.init(jax.random.key(0), found, RANK)
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # up non-zero: the adapters move the output
    rng = np.random.default_rng(0)
    args = (rng.normal(size=(2, 8, 8, 4)), np.array([0.3, 0.6]), rng.normal(size=(2, 5, 24)), rng.normal(size=(2, 12)))
    args = (*(jnp.asarray(a, jnp.float32) for a in args), jnp.full((2,), 3.5))

    compiled = {}

    def run(scale, rate, seed=0):
        if rate not in compiled:  # the rate is read while tracing: one program per rate
            with lora_dropout(rate):
                fn = jax.jit(lambda v, k: module.apply(v, *args, rngs={"dropout": k}))
                compiled[rate] = (fn, fn.lower(variables(scale), jax.random.key(0)).compile())
        return np.asarray(compiled[rate][1](variables(scale), jax.random.key(seed)))

    variables = lambda scale: lora.variables(base, adapters, lora.scales(found, scale))
    plain = run(0.0, 0.0)
    np.testing.assert_array_equal(run(0.0, 0.5), plain)  # no adapter term: dropout changes nothing
    assert not np.allclose(run(1.0, 0.5), run(1.0, 0.0)) and not np.allclose(run(1.0, 0.5), run(1.0, 0.5, seed=1))
    np.testing.assert_array_equal(run(1.0, 0.5), run(1.0, 0.5))
    with pytest.raises(ValueError, match="dropout"), lora_dropout(1.0):
        pass


@pytest.fixture(scope="module")
def lora_trainer(tmp_path_factory):
    """A LoRA trainer (rank 4 on the default targets, bf16 base, 2 devices) and a way back to its initial state:
    one compiled step for all the tests below."""
    folder = save_component(make_flux(seed=6), tmp_path_factory.mktemp("flux"))
    module, base = load_component(folder, param_dtype=jnp.bfloat16)
    found = lora.resolve(module, shapes_of(base), lora.DEFAULT_TARGETS)
    adapters = lora.init(jax.random.key(1), found, RANK)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1}, jax.devices()[:2])
    inputs = kind_of_module(module).init_inputs(module.config)
    frozen = ts.Frozen(base, lora.scales(found, ALPHA / RANK))
    tx = ts.optimizer(lr=2e-2, weight_decay=0.0)
    trainer = Trainer(module, adapters, tx, ts.LossConfig(), mesh, init_inputs=inputs, base=frozen, lora_dropout=0.1)
    initial = jax.tree.map(jnp.copy, trainer.state)

    def fresh():
        trainer.state = jax.tree.map(jnp.copy, initial)
        return trainer

    return fresh


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x0": rng.normal(size=(n, 8, 8, 4)).astype(np.float32),
        "text": rng.normal(size=(n, 5, 24)).astype(np.float32),
        "pooled": rng.normal(size=(n, 12)).astype(np.float32),
    }


def test_lora_run_learns_and_checkpoints_only_the_adapters(lora_trainer, tmp_path):
    trainer = lora_trainer()
    data = _data(2, seed=1)
    noise = np.random.default_rng(2).normal(size=(2, 8, 8, 4)).astype(np.float32)
    sigma = np.array([0.4, 0.8], np.float32)
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    base = jax.device_get(trainer.base)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(base.params))  # frozen in bf16, no float32 copy
    loss = jax.jit(lambda a: ts.loss_from_noise(trainer.model, a, batch, noise, sigma, trainer.cfg, base))
    eval_loss = lambda: float(loss(jax.device_get(trainer.state.params)))
    before = eval_loss()
    trainer.fit(ArrayBatches(data, 2), tmp_path, 30, log_every=10, checkpoint_every=1000, progress=False)
    after = eval_loss()
    assert after < 0.8 * before, (before, after)
    np.testing.assert_array_equal(
        jax.device_get(trainer.base.params["x_embedder"]["kernel"]), base.params["x_embedder"]["kernel"]
    )
    saved = ocp.StandardCheckpointer().metadata(tmp_path / "checkpoints" / "30" / "state").item_metadata
    paths = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(saved)]
    adapters = [p for p in paths if p.startswith("params/")]
    assert adapters and all(p.endswith(("/down", "/up")) for p in adapters), paths
    assert all(p.startswith(("params/", "opt_state/", "step")) for p in paths), paths
    assert not any(p.endswith(("kernel", "bias", "scale")) for p in paths), paths


def test_lora_resume_gives_the_uninterrupted_losses(lora_trainer, tmp_path):
    data = _data(8)
    a = lora_trainer().fit(ArrayBatches(data, 4), tmp_path / "a", 6, checkpoint_every=3, progress=False)
    with pytest.raises(Killed):
        lora_trainer().fit(DiesAt(data, 4, at=5), tmp_path / "b", 6, checkpoint_every=3, progress=False)
    resumed = lora_trainer().fit(ArrayBatches(data, 4), tmp_path / "b", 6, checkpoint_every=3, progress=False)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in a[3:]], rtol=1e-5)


def test_lora_settings_are_checked_and_a_resume_may_not_change_them(tmp_path):
    from configs import flux_wlf
    from d4k_jax import train_config

    c = flux_wlf.get_config("tiny_lora")
    c.train.lora.update(targets="to_q,nope,proj_out", alpha=-1.0, dropout=1.0)
    with pytest.raises(ValueError) as e:
        train_config.validate(c, tmp_path, 1)
    for needle in ("train.lora.alpha=-1.0", "train.lora.dropout=1.0"):
        assert needle in str(e.value)
    c.train.lora.update(alpha=None, dropout=0.0)
    with pytest.raises(ValueError, match=r"\['nope'\].*single_transformer_blocks.0.proj_out"):
        train_config.validate(c, tmp_path, 1)
    c = flux_wlf.get_config("tiny_lora")
    train_config.validate(c, tmp_path, 1)
    old = train_config.as_stored(c, 1)
    c.train.lora.rank = 8
    refused = train_config.refused_changes(old, train_config.as_stored(c, 1), 10, 1)
    assert [f for f, *_ in refused] == ["train.lora.rank"]


def test_the_train_cli_trains_lora_adapters_on_the_demo_pipeline(tmp_path):
    """`python -m d4k_jax.train --config=configs/flux_wlf.py:tiny_lora` in-process, 2 steps on the shipped demo
    pipeline: the eval samples base + adapters, the checkpoint holds the adapters, and the run ends with them as a
    diffusers LoRA file (no pipeline) that a pipeline loads back to the checkpoint's adapters."""
    from configs import flux_wlf
    from d4k_jax import train

    c = flux_wlf.get_config("tiny_lora")
    c.data.update(demo_images=16)
    c.train.update(steps=2, batch_size=1, log_every=1, text_length=8)
    c.train.lora.update(rank=2, dropout=0.1)
    c.eval.update(every=2, steps=2, height=32, width=32, prompts=c.eval.prompts[:2], max_sequence_length=8)
    rows = train.run(c, tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and "eval_seconds" in rows[1]
    assert (tmp_path / "sample_grid.png").is_file() and not (tmp_path / "pipeline").exists()
    saved = ocp.StandardCheckpointer().metadata(tmp_path / "checkpoints" / "2" / "state").item_metadata
    shapes = {
        "/".join(str(getattr(k, "key", k)) for k in p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(saved)
    }
    params = {p: s for p, s in shapes.items() if p.startswith("params/")}
    assert params and all(p.endswith(("/down", "/up")) and 2 in s[-2:] for p, s in params.items()), params
    trained = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "2" / "state")["params"]
    pipe = FluxPipeline.from_pretrained(c.pipeline, dtype=jnp.float32)
    pipe.load_lora_weights(tmp_path / "lora.safetensors", merge=False)  # alpha = rank: scale 1, up as trained
    got = traverse_util.flatten_dict(pipe.adapters)
    want = traverse_util.flatten_dict(trained)
    assert {p for p in got if p[-1] != "scale"} == set(want)
    for p, x in want.items():
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(x))
