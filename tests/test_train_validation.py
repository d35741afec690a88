"""d4k_jax.train_config: the training config checked before anything loads, and the resume config check
(in-process, no compile: the configs are the tiny ones on the embedded demo pipelines)."""

import json
import re

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import flux_wlf, sd3_wlf
from d4k_jax import train, train_config
from d4k_jax.data import aesthetic4k
from d4k_jax.io import load as io_load


def _bad(c, workdir, devices=1) -> str:
    with pytest.raises(ValueError) as e:
        train_config.validate(c, workdir, devices)
    return str(e.value)


def test_the_tiny_and_full_configs_pass(tmp_path):
    for module in (flux_wlf, sd3_wlf):
        train_config.validate(module.get_config("tiny"), tmp_path, 8)
        full = module.get_config()
        full.update(pipeline=module.get_config("tiny").pipeline, data={"folder": str(tmp_path)})
        (tmp_path / "train").mkdir(exist_ok=True)
        (tmp_path / "train" / "metadata.jsonl").write_text("")
        full.data.resolution = full.eval.height = full.eval.width = 128  # the demo pipelines' sizes
        train_config.validate(full, tmp_path, 8)


CASES = {  # case -> (config changes, what the message must name: the bad value and what was expected)
    "resolution not a multiple of the factor": (
        lambda c: c.data.update(resolution=40),
        ["data.resolution=40", "multiple of 16"],
    ),
    "eval size not a multiple of the factor": (lambda c: c.eval.update(width=72), ["eval.width=72", "multiple of 16"]),
    "eval size beyond the SD3 position table": (
        lambda c: c.update(model="sd3", pipeline=sd3_wlf.get_config("tiny").pipeline, eval={"height": 512}),
        ["eval.height=512", "position table", "at most 256"],
    ),
    "batch not divisible by microbatches": (
        lambda c: c.train.update(microbatches=3),
        ["train.batch_size=32", "train.microbatches=3"],
    ),
    "batch not divisible by encode passes": (
        lambda c: c.train.update(encode_passes=5),
        ["train.batch_size=32", "train.encode_passes=5"],
    ),
    "mesh larger than the devices": (lambda c: c.train.mesh.update(fsdp=16), ["'fsdp': 16", "product is 8"]),
    "sequence degree that does not divide the heads": (
        lambda c: c.train.update(mesh={"data": 1, "fsdp": -1, "sequence": 8, "tensor": 1}),
        ["train.mesh: sequence degree 8", "4 attention heads", "among [1, 2, 4]", "eval.height=64"],
    ),
    "mesh with two -1": (lambda c: c.train.mesh.update(fsdp=-1), ["train.mesh=", "at most one -1"]),
    "unknown loss": (lambda c: c.loss.update(loss="wavelet"), ["loss.loss='wavelet'", "'wlf', 'flow'"]),
    "unknown timesteps": (
        lambda c: c.loss.update(timesteps="uniform"),
        ["loss.timesteps='uniform'", "'reference', 'shifted_uniform'"],
    ),
    "unknown schedule": (lambda c: c.train.update(schedule="linear"), ["train.schedule='linear'", "'cosine'"]),
    "unknown remat": (lambda c: c.train.update(remat="all"), ["train.remat='all'", "'dots'"]),
    "unknown nan policy": (lambda c: c.train.update(nan_policy="ignore"), ["train.nan_policy='ignore'", "'skip'"]),
    "unknown model": (lambda c: c.update(model="sdxl"), ["model='sdxl'", "'flux', 'sd3'"]),
    "another model's pipeline": (lambda c: c.update(model="sd3"), ["config.model='sd3'", "FluxTransformer2DModel"]),
    "missing pipeline folder": (lambda c: c.update(pipeline="/no/such/pipe"), ["pipeline=/no/such/pipe", "expected"]),
    "pipeline not set": (lambda c: c.update(pipeline=None), ["pipeline is not set", "--config.pipeline="]),
    "missing data folder": (
        lambda c: c.data.update(demo_images=0, folder="/no/such/data"),
        ["data.folder=/no/such/data", "train/metadata.jsonl"],
    ),
    "no data at all": (lambda c: c.data.update(demo_images=0), ["data.folder is not set", "--config.data.data_dir="]),
    "bad dtype": (lambda c: c.update(dtype="bf16"), ["dtype='bf16'", "bfloat16"]),
    "subband weights of another level": (
        lambda c: c.loss.update(subband_weights=(1.0, 2.0)),
        ["loss.subband_weights=(1.0, 2.0)", "4 values"],
    ),
    "zero steps": (lambda c: c.train.update(steps=0, log_every=0), ["train.steps=0", "train.log_every=0", ">= 1"]),
    "no eval prompts": (lambda c: c.eval.update(prompts=()), ["eval.prompts is empty"]),
    "a LoRA (sampling's option)": (
        lambda c: c.update(lora="style.safetensors:0.5"),
        ["lora='style.safetensors:0.5'", "merged by d4k_jax.sample only"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_field_is_named_with_what_was_expected(case, tmp_path):
    change, needles = CASES[case]
    c = flux_wlf.get_config("tiny")
    change(c)
    message = _bad(c, tmp_path, devices=8)
    for needle in needles:
        assert needle in message, (needle, message)


def test_one_error_lists_every_problem(tmp_path):
    c = flux_wlf.get_config("tiny")
    for change, _ in (CASES["unknown loss"], CASES["eval size not a multiple of the factor"], CASES["bad dtype"]):
        change(c)
    message = _bad(c, tmp_path)
    assert "3 problem(s)" in message
    assert all(s in message for s in ("loss.loss='wavelet'", "eval.width=72", "dtype='bf16'"))


def test_a_dataset_already_built_needs_no_folder(tmp_path):
    c = flux_wlf.get_config("tiny")
    c.data.update(demo_images=0, data_dir=str(tmp_path / "tfds"))
    assert "data.folder is not set" in _bad(c, tmp_path)
    built = aesthetic4k.dataset_dir(tmp_path / "tfds", "train")
    built.mkdir(parents=True)
    (built / "dataset_info.json").write_text("{}")
    train_config.validate(c, tmp_path, 1)


def test_train_checks_before_loading_or_writing_anything(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read before the config was checked")

    monkeypatch.setattr(io_load, "load_with_config", no_loading)
    monkeypatch.setattr(aesthetic4k, "build", no_loading)
    c = flux_wlf.get_config("tiny")
    c.eval.height = 4100  # a bad eval size used to fail at the first evaluation, after the training steps
    with pytest.raises(ValueError, match=re.escape("eval.height=4100")):
        train.run(c, tmp_path / "work")
    assert not (tmp_path / "work").exists()


# ------------------------------------------------------------------------------------------------------------
# Resume


def _stored(**train):
    c = flux_wlf.get_config("tiny")
    c.train.update(train)
    return train_config.as_stored(c, num_devices=8)


def test_changes_lists_every_differing_leaf():
    old = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "gone": 0}
    new = {"a": 1, "b": {"c": [1, 3], "d": "x", "e": None}}
    assert train_config.changes(old, new) == [
        ("b.c", [1, 2], [1, 3]),
        ("b.e", train_config.ABSENT, None),
        ("gone", 0, train_config.ABSENT),
    ]


def test_recipe_changes_are_refused_and_layout_logging_and_eval_changes_allowed():
    old = _stored(schedule="constant")
    refused = lambda new, step=100: [f for f, _, _ in train_config.refused_changes(old, new, step, num_devices=8)]
    new = _stored(schedule="constant", lr=1e-3, steps=5000, log_every=1, microbatches=2, remat="full")
    new["loss"]["loss"], new["seed"], new["eval"]["height"] = "flow", 1, 128
    assert refused(new) == ["loss.loss", "seed", "train.lr"]  # steps, logging, memory knobs and eval pass
    assert refused(_stored(schedule="constant", mesh={"data": 2, "fsdp": 4})) == []  # same global batch of 256
    assert refused(_stored(schedule="constant", batch_size=16)) == [
        "train.batch_size",
        "global batch (train.batch_size x mesh data x fsdp)",
    ]
    assert train_config.global_batch(old, 8) == 256


def test_a_rerun_on_more_devices_is_a_change_of_global_batch():
    old = _stored()  # train.mesh {"data": -1, ...} resolved on 8 devices: data 8
    c = flux_wlf.get_config("tiny")
    new = train_config.as_stored(c, num_devices=16)
    assert new["train"]["mesh"]["data"] == 16
    fields = [f for f, _, _ in train_config.refused_changes(old, new, 10, num_devices=16)]
    assert fields == ["global batch (train.batch_size x mesh data x fsdp)"]


def test_extending_steps_is_refused_only_when_it_moves_the_lr_already_used():
    cosine = _stored(schedule="cosine", warmup_steps=30, steps=2000)
    longer = _stored(schedule="cosine", warmup_steps=30, steps=3000)
    assert train_config.refused_changes(cosine, longer, 20, 8) == []  # still in the warmup: the same lr so far
    moved = train_config.refused_changes(cosine, longer, 1000, 8)
    assert [(f.split(" ")[0], a, b) for f, a, b in moved] == [("train.steps", 2000, 3000)]
    constant = _stored(schedule="constant", steps=2000)
    assert train_config.refused_changes(constant, _stored(schedule="constant", steps=3000), 2000, 8) == []


def _workdir_with_checkpoint(path, stored, step=3):
    """A WORKDIR as train leaves it: config.json and an orbax checkpoint carrying the config as metadata."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(stored))
    with ocp.CheckpointManager(path / "checkpoints", metadata=stored) as manager:
        manager.save(step, args=ocp.args.StandardSave({"w": np.zeros(2)}))
    return path


def test_check_resume_refuses_with_the_fields_and_old_and_new_values(tmp_path):
    old = _stored(schedule="constant")
    work = _workdir_with_checkpoint(tmp_path / "w", old)
    assert train_config.check_resume(old, work, 8) == []  # the same config resumes
    assert train_config.check_resume(old, tmp_path / "fresh", 8) == []  # nothing to resume
    new = _stored(schedule="constant", lr=0.01, steps=9)
    new["loss"]["timesteps"] = "reference"
    with pytest.raises(ValueError) as e:
        train_config.check_resume(new, work, 8)
    message = str(e.value)
    assert "train.lr: 0.002 -> 0.01" in message and 'loss.timesteps: "shifted_uniform" -> "reference"' in message
    assert "train.steps" not in message and "allow_config_change=True" in message and "step 3" in message
    new["train"]["allow_config_change"] = True  # the override: resumes, with the changes returned (and logged)
    made = train_config.check_resume(new, work, 8)
    assert {f for f, _, _ in made} == {"train.allow_config_change", "train.lr", "train.steps", "loss.timesteps"}


def test_check_resume_reads_the_checkpoint_metadata_without_config_json(tmp_path):
    work = _workdir_with_checkpoint(tmp_path / "w", _stored(schedule="constant"))
    (work / "config.json").unlink()
    with pytest.raises(ValueError, match=re.escape("train.lr: 0.002 -> 0.5")):
        train_config.check_resume(_stored(schedule="constant", lr=0.5), work, 8)
