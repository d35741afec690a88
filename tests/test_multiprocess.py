"""Several processes compute what one does: the loader's global batches, and one training scenario run as real
processes (tools.launch, gloo): 2 x 4 CPU devices against 1 x 8, stopped by a SIGTERM to one process, resumed on
2 x 4 and 1 x 4."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from d4k_jax.data import aesthetic4k, demo, input_pipeline
from d4k_jax.io import load_component

ROOT = Path(__file__).resolve().parent.parent
STEPS, SIGTERM_AFTER = 4, 1  # SIGTERM to process 1 at step 1: both save step 2 (tests/preempt_train.py)


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


def test_a_loader_seeks_to_the_position_of_another_process_count(dataset):
    kw = dict(resolution=16, global_batch_size=4, seed=3)
    one = input_pipeline.make_loader(dataset, "train", process_index=0, process_count=1, **kw)
    for _ in range(4):
        next(one)
    want = next(one)
    two = [input_pipeline.make_loader(dataset, "train", process_index=p, process_count=2, **kw) for p in (0, 1)]
    assert [loader.seek(4 * 4 + 3) for loader in two] == [16, 16]  # rounded down to whole batches
    np.testing.assert_array_equal(np.concatenate([next(loader)["key"] for loader in two]), want["key"])


def _train(workdir: Path, processes: int, devices: int, *extra: str, sigterm: str = "") -> tuple[list[dict], str]:
    """(metrics.jsonl's rows, the launcher's output) of the tiny Flux run in `workdir` as `processes` x `devices`."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # its device count would fight JAX_NUM_CPU_DEVICES
    env |= {"XLA_FLAGS": os.environ["D4K_TEST_XLA_FLAGS"], "D4K_TEST_SIGTERM": sigterm}
    # every program in the cache, however quick to compile: the later runs read back the small ones (init, orbax) too
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    launch = [sys.executable, "-m", "tools.launch", f"--processes={processes}", f"--devices_per_process={devices}"]
    program = [str(ROOT / "tests" / "preempt_train.py")] if sigterm else ["-m", "d4k_jax.train"]
    cmd = [*launch, "--", sys.executable, *program, "--config=configs/flux_wlf.py:tiny", f"--workdir={workdir}"]
    cmd += [f"--config.train.steps={STEPS}", "--config.train.batch_size=1", "--config.train.log_every=1"]
    cmd += ["--config.eval.every=0", "--config.eval.steps=1", "--config.data.demo_images=16"]
    cmd += ["--config.train.export=False", *extra]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()], out.stdout


def _close(rows: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in want]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in want], rtol=1e-5)


def test_training_stopped_on_one_process_resumes_on_any_process_count(tmp_path):
    """A SIGTERM to process 1 of 2 x 4 stops both at the same step, with exit code 0 (the launcher's, which
    is 0 only when both are); up to there the run equals 1 x 8. Copies of it resumed on 2 x 4 (grain's own
    state) and on one process of 4 devices (two images each: the same global batch, the data position
    recomputed) give the uninterrupted 1 x 8 losses."""
    stopped, out = _train(tmp_path / "two", 2, 4, sigterm=f"1:{SIGTERM_AFTER}")
    saved = {int(m[1]): int(m[2]) for m in re.finditer(r"\[(\d)\] .*SIGTERM: saved the checkpoint of step (\d+)", out)}
    assert sorted(saved) == [0, 1] and len(set(saved.values())) == 1, out[-3000:]
    stop = saved[0]  # SIGTERM_AFTER + 1 unless the machine stalled (tests/preempt_train.py)
    assert SIGTERM_AFTER < stop < STEPS and [r["step"] for r in stopped] == list(range(1, stop + 1)), out[-3000:]
    assert max(int(p.name) for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()) == stop

    for built in ("data", "text_cache"):  # the reference reads the same records and embeddings
        shutil.copytree(tmp_path / "two" / built, tmp_path / "one" / built)
    want, _ = _train(tmp_path / "one", 1, 8, "--config.train.export=True")
    assert [r["step"] for r in want] == list(range(1, STEPS + 1))
    _close(stopped, want[:stop])

    exported = "--config.train.export=True"  # the 2 x 4 run's export is loaded on one device below
    two_each = ("--config.train.batch_size=2", "--config.train.allow_config_change=True")  # global batch 8 again
    for processes, devices, *extra in [(2, 4, exported), (1, 4, *two_each)]:
        workdir = tmp_path / f"resumed_{processes}x{devices}"
        shutil.copytree(tmp_path / "two", workdir)
        rows, out = _train(workdir, processes, devices, *extra)
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and np.isfinite([r["loss"] for r in rows]).all()
        recomputed = re.search(r"data position recomputed .* resuming at record (\d+)", out)
        if processes == 2:
            assert not recomputed, out[-3000:]  # the same process count and batch: grain's exact state
        else:
            assert recomputed and int(recomputed[1]) == 8 * stop, out[-3000:]  # global batches of 8 before
        _close(rows, want)  # the rows the resumed run kept, then its own

    # an export written by 2 processes (each its shards) loads on one device: the 1 x 8 run's parameters
    two = load_component(tmp_path / "resumed_2x4" / "pipeline" / "transformer")[1]
    one = load_component(tmp_path / "one" / "pipeline" / "transformer")[1]
    assert {a.sharding.device_set == {jax.devices()[0]} for a in jax.tree.leaves(two)} == {True}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), two, one)  # measured: equal
