"""Several processes compute what one does: the loader's global batches, and a training run as 2 real
processes x 4 CPU devices (tools.launch, gloo) against 1 process x 8 devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d4k_jax.data import aesthetic4k, demo, input_pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = demo.write_folder(tmp_path_factory.mktemp("demo"), 12, 32, seed=0)
    data_dir = tmp_path_factory.mktemp("tfds")
    aesthetic4k.build(root, "train", data_dir, num_threads=2)
    return data_dir


@pytest.mark.parametrize("num_epochs", [1, None])
def test_global_batches_do_not_depend_on_the_process_count(dataset, num_epochs):
    kw = dict(resolution=16, global_batch_size=4, seed=3, num_epochs=num_epochs)
    one = input_pipeline.make_loader(dataset, "train", process_index=0, process_count=1, **kw)
    two = [input_pipeline.make_loader(dataset, "train", process_index=p, process_count=2, **kw) for p in (0, 1)]
    for _ in range(3 if num_epochs else 7):  # past the first epoch of 12 records when repeating
        want = next(one)
        got = [next(loader) for loader in two]
        np.testing.assert_array_equal(np.concatenate([g["key"] for g in got]), want["key"])
        np.testing.assert_array_equal(np.concatenate([g["image"] for g in got]), want["image"])  # same crops


def _train(workdir: Path, launch: list[str], env: dict) -> list[dict]:
    cmd = [sys.executable, "-m", "d4k_jax.train", "--config=configs/flux_wlf.py:tiny", f"--workdir={workdir}"]
    cmd += ["--config.train.steps=3", "--config.train.log_every=1", "--config.eval.every=0"]
    cmd += ["--config.data.demo_images=32", "--config.train.export=False"]
    out = subprocess.run([*launch, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_of_four_devices_train_as_one_of_eight(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    one = _train(tmp_path / "one", [], env | {"JAX_NUM_CPU_DEVICES": "8"})
    launch = [sys.executable, "-m", "tools.launch", "--processes=2", "--devices_per_process=4", "--"]
    two = _train(tmp_path / "two", launch, env)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-5)
