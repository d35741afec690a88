"""d4k_jax.sample across processes: 2 real processes x 4 CPU devices (tools.launch, gloo) write the same files
as 1 process x 8 devices (each image split over a sequence pair), each process the images it holds; a run
whose process 1 is killed mid-run is completed by a rerun with another process count, with no duplicates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_pipelines import sd3_pipeline

from configs import sd3_wlf
from d4k_jax import sample

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red cat on the sky", "a blue dog", "a green square on a red background", "a house"]
# SD3 with CFG: prompt and negative embeddings and noise are all global inputs. Each image split over 2 devices
# (mesh.sequence=2, nn.ulysses: the 4 heads' attention and the 4 token rows; a pair within one process), rows
# over data=4: 4 prompts x 3 images = 12 images, three batches of 4.
SETTINGS = {
    "mesh.sequence": 2,
    "vae_stride": 1,
    "sample.height": 16,
    "sample.width": 16,
    "sample.steps": 2,
    "sample.images_per_prompt": 3,
    "sample.format": "png",
    "sample.max_sequence_length": 12,
}
# `python -c KILLER N ARGS...` runs `python -m d4k_jax.sample ARGS...`, except that process 1 kills itself
# (SIGKILL) just after it saved its Nth image, before that image's metadata line: a crash at the worst moment.
KILLER = """
import contextlib, os, runpy, signal, sys
from d4k_jax import files
after, replaced, saved = int(sys.argv.pop(1)), files.replaced, []

@contextlib.contextmanager
def replaced_then_killed(path):
    with replaced(path) as tmp:
        yield tmp
    saved.extend([path] if path.suffix == ".png" else [])
    if len(saved) == after and "--config.distributed.process_id=1" in sys.argv:
        os.kill(os.getpid(), signal.SIGKILL)

files.replaced = replaced_then_killed
runpy.run_module("d4k_jax.sample", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp_pipes")
    sd3_pipeline(root)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _config(root: Path):
    c = sd3_wlf.get_config("tiny")
    c.pipeline = str(root / "sd3")
    c.update_from_flattened_dict(SETTINGS)
    return c


def _launch(root: Path, outdir: Path, kill_after: int = 0) -> subprocess.CompletedProcess:
    """`d4k_jax.sample` as 2 processes x 4 CPU devices."""
    flags = ["--config=configs/sd3_wlf.py:tiny", f"--config.pipeline={root / 'sd3'}"]
    flags += [f"--config.{k}={v}" for k, v in SETTINGS.items()]
    flags += [f"--prompts={root / 'prompts.txt'}", f"--outdir={outdir}"]
    program = ["-c", KILLER, str(kill_after)] if kill_after else ["-m", "d4k_jax.sample"]
    launch = [sys.executable, "-m", "tools.launch", "--processes=2", "--devices_per_process=4", "--"]
    # XLA_FLAGS' forced device count would override JAX_NUM_CPU_DEVICES: the children get the tests' other flags
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ["D4K_TEST_XLA_FLAGS"]}
    cmd = [*launch, sys.executable, *program, *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _same_files(got: Path, want: Path) -> None:
    a, b = _files(got), _files(want)
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []  # byte-identical PNGs, metadata.jsonl, settings.json


def test_two_processes_write_what_one_writes_and_a_killed_run_completes(pipes, tmp_path):
    one = tmp_path / "one"
    assert sample.run(_config(pipes), pipes / "prompts.txt", one) == 12  # 1 process x 8 devices, in this process
    lines = (one / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(x)["file_name"] for x in lines] == [f"{p:05d}_{k:02d}.png" for p in range(4) for k in range(3)]

    two = tmp_path / "two"
    run = _launch(pipes, two)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _same_files(two, one)  # no process files left: merged into one metadata.jsonl, sorted

    killed = tmp_path / "killed"
    run = _launch(pipes, killed, kill_after=2)
    assert run.returncode != 0, run.stdout[-3000:]  # process 1 died; the launcher stopped process 0
    assert not (killed / "metadata.jsonl").exists()
    own = (killed / "metadata.process_1.jsonl").read_text().splitlines()  # process 1 wrote its own images
    assert len(own) == 1  # its first image's line; its second image was saved without one
    counted = sum(len(p.read_text().splitlines()) for p in killed.glob("metadata.process_*.jsonl"))
    assert sample.run(_config(pipes), pipes / "prompts.txt", killed) == 12 - counted  # the rerun: 1 process
    _same_files(killed, one)  # each image once in metadata.jsonl, the unlisted one made again (the same bytes)
