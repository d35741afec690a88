"""`python -m d4k_jax.train` end to end on a tiny random pipeline and the procedural demo set: dataset
build, text cache, sharded training with image batches, eval grids, export; resume and SIGTERM."""

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny_pipelines import flux_pipeline, sd3_pipeline

from configs import flux_wlf, sd3_wlf
from d4k_jax import checkpoint, sample_eval, train, train_config
from d4k_jax.export import EXPORT_RECORD, export_pipeline, exported_step
from d4k_jax.pipelines import base
from d4k_jax.pipelines.flux import FluxPipeline
from d4k_jax.pipelines.sd3 import SD3Pipeline


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    flux_pipeline(root)
    return root / "flux"


def _config(pipe_dir, steps=6, module=flux_wlf):
    c = module.get_config("tiny")
    c.pipeline, c.vae_stride = str(pipe_dir), 1  # the test pipeline's VAE is a stock F8 one
    c.data.update(resolution=32, demo_images=24)
    c.train.update(steps=steps, batch_size=1, log_every=1, checkpoint_every=3, text_length=12)
    c.eval.update(every=3, height=64, width=64, steps=2, max_sequence_length=12, prompts=c.eval.prompts[:3])
    return c


def _losses(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def straight(pipe_dir, tmp_path_factory):
    """An uninterrupted 6-step run: (its workdir, its logged rows)."""
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, train.run(_config(pipe_dir), workdir)


def test_train_writes_metrics_samples_and_a_loadable_pipeline(pipe_dir, straight):
    tmp_path, rows = straight
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "step_time", "images_per_s"} <= set(rows[0])
    assert "eval_seconds" in rows[2] and "eval_seconds" not in rows[1]
    assert rows[2]["eval_glcm"] > 0 and rows[2]["eval_cr"] > 1  # the detail metrics of the eval samples
    assert rows[0]["images_per_s"] > 0 and len(jax.devices()) == 8  # global batch 8: one image per device
    for name in ("loss_curve.png", "sample_grid.png", "samples/step_000003.png", "config.json"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    cache = np.load(tmp_path / "text_cache" / "text.npy", mmap_mode="r")
    assert cache.shape == (24, 12, 24)  # every caption, T5 length 12, T5 width 24

    assert exported_step(tmp_path / "pipeline") == 6
    pipe = FluxPipeline.from_pretrained(tmp_path / "pipeline", dtype=np.float32)
    trained = jax.tree.leaves(pipe.transformer[1])
    start = jax.tree.leaves(FluxPipeline.from_pretrained(pipe_dir, dtype=np.float32).transformer[1])
    assert any(not np.array_equal(a, b) for a, b in zip(trained, start, strict=True))
    images = pipe(["a red circle"], height=32, width=32, num_inference_steps=2)
    assert images.shape == (1, 32, 32, 3)


def test_rerunning_resumes_with_the_uninterrupted_losses(pipe_dir, straight, tmp_path, monkeypatch):
    straight = _losses(straight[0])
    train.run(_config(pipe_dir, steps=3), tmp_path / "b")  # stops after step 3 (a checkpoint)
    read, load = [], base.load_component
    monkeypatch.setattr(base, "load_component", lambda path, **kw: read.append(Path(path).name) or load(path, **kw))
    resumed = train.run(_config(pipe_dir), tmp_path / "b")
    assert sorted(read) == ["transformer", "vae"]  # text cache and eval embeddings kept: no text encoder is read
    assert [r["step"] for r in resumed] == [4, 5, 6]
    # the data iterator's state is restored with the train state: same images, crops and flips
    np.testing.assert_allclose([r["loss"] for r in resumed], [straight[s] for s in (4, 5, 6)], rtol=1e-5)


def _files(folder) -> dict:
    files = (p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


def test_a_rerun_with_another_recipe_is_refused_and_changes_nothing(pipe_dir, straight, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(straight[0], work, symlinks=True)
    before = _files(work / "checkpoints") | {"config.json": (work / "config.json").read_text()}
    c = _config(pipe_dir, steps=9)  # more steps alone would resume (the lr so far is unchanged: warmup)
    c.train.lr, c.loss.shift = 0.01, 1.0
    with pytest.raises(ValueError) as e:
        train.run(c, work)
    assert "train.lr: 0.002 -> 0.01" in str(e.value) and "loss.shift: 3.0 -> 1.0" in str(e.value)
    assert "train.steps" not in str(e.value)
    assert _files(work / "checkpoints") | {"config.json": (work / "config.json").read_text()} == before


def test_the_export_is_redone_when_its_step_differs(tmp_path):
    source, dst = tmp_path / "src", tmp_path / "pipeline"
    (source / "transformer").mkdir(parents=True)
    (source / "vae").mkdir()
    (source / "model_index.json").write_text("{}")
    (source / "transformer" / "config.json").write_text("{}")
    params = lambda v: {"w": np.full(3, v, np.float32)}
    export = lambda v, step: export_pipeline(source, dst, None, params(v), step)
    exported = lambda: float(checkpoint.restore_params(dst / "transformer" / "params", params(0))["w"][0])

    export(1, step=20)
    assert exported_step(dst) == 20 and exported() == 1 and (dst / "vae").is_symlink()
    export(2, step=20)  # the same step (a rerun of a finished run): kept
    assert exported() == 1
    export(3, step=30)  # the run extended from 20 to 30 steps: replaced
    assert exported_step(dst) == 30 and exported() == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline", "src"]  # nothing left beside it
    dst.rename(tmp_path / "pipeline.old")  # killed between the two renames of the swap
    export(4, step=30)
    assert exported() == 3 and not (tmp_path / "pipeline.old").exists()  # the old export put back, still step 30
    (dst / EXPORT_RECORD).unlink()  # an export from before the step was recorded
    export(5, step=30)
    assert exported_step(dst) == 30 and exported() == 5


def test_sigterm_saves_a_checkpoint_and_stops(pipe_dir, tmp_path, monkeypatch):
    c = _config(pipe_dir)
    c.train.checkpoint_every = 100
    sampler_hook = sample_eval.SampleEval.hook

    def hook(self, num_steps):  # the preemption notice arrives during step 2
        inner = sampler_hook(self, num_steps)
        return lambda step, state, writer: (
            os.kill(os.getpid(), signal.SIGTERM) if step == 2 else inner(step, state, writer)
        )

    monkeypatch.setattr(sample_eval.SampleEval, "hook", hook)
    handler = signal.getsignal(signal.SIGTERM)
    rows = train.run(c, tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert max(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == 2
    assert signal.getsignal(signal.SIGTERM) is handler  # the trainer's handler is gone after the run
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:  # the run's config travels with it
        assert manager.metadata().custom_metadata["train"]["steps"] == 6
    monkeypatch.undo()
    assert [r["step"] for r in train.run(c, tmp_path)] == [3, 4, 5, 6]


def test_sd3_trains_with_cfg_eval_and_its_position_table_frozen(tmp_path):
    sd3_pipeline(tmp_path)
    c = _config(tmp_path / "sd3", steps=2, module=sd3_wlf)
    c.eval.update(every=2, height=32, width=32)  # the tiny SD3's position table stops at 24x24 latents
    c.train.rules = (("batch", ["data", "fsdp"]), ("embed", None))  # replicated params, as a config file says
    rows = train.run(c, tmp_path / "work")
    assert [r["step"] for r in rows] == [1, 2] and np.isfinite(rows[-1]["loss"])
    assert (tmp_path / "work" / "samples" / "step_000002.png").is_file()
    assert "eval_cr" in rows[-1] and "eval_glcm" not in rows[-1]  # 32² samples hold no 64x64 GLCM patch
    trained = SD3Pipeline.from_pretrained(tmp_path / "work" / "pipeline", dtype=np.float32).transformer[1]
    start = SD3Pipeline.from_pretrained(tmp_path / "sd3", dtype=np.float32).transformer[1]
    np.testing.assert_array_equal(trained["pos_embed"]["pos_embed"], start["pos_embed"]["pos_embed"])
    assert not np.array_equal(trained["proj_out"]["kernel"], start["proj_out"]["kernel"])


def test_configs_carry_the_reference_recipe():
    for module, model, batch in ((flux_wlf, "flux", 4), (sd3_wlf, "sd3", 8)):
        c = module.get_config()
        assert (c.model, c.train.batch_size, c.train.lr, c.train.schedule) == (model, batch, 1e-6, "constant")
        assert c.train.microbatches == c.train.encode_passes == batch  # one 4096² image per device per pass
        assert (c.train.steps, c.train.checkpoint_every, c.train.weight_decay, c.train.clip_norm) == (
            20_000,
            5_000,
            1e-4,
            1.0,
        )
        assert (c.data.resolution, c.vae_stride, c.dtype, c.param_dtype, c.loss.loss) == (
            4096,
            2,
            "bfloat16",
            "float32",
            "wlf",
        )
        loss = train_config.loss_config(c)
        assert (loss.model, loss.timesteps, loss.level, loss.subband_weights) == (model, "reference", 1, None)
    tiny = flux_wlf.get_config("tiny").train
    schedule = train_config.lr_schedule(tiny)
    assert float(schedule(0)) == 0.0 and float(schedule(tiny.warmup_steps)) == pytest.approx(tiny.lr)
    assert float(schedule(tiny.steps)) < 1e-9
