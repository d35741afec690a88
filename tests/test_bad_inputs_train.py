"""`python -m d4k_jax.train` against bad input, as a user runs it (subprocesses, one CPU device, the
embedded demo pipeline at 32²): each case exits non-zero with one message naming the bad value and what
was expected, no traceback, and the outputs already written intact; a killed run resumes to the losses
of an uninterrupted one. The runs that train share the session's compilation cache (conftest): only the
first compiles."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from cli_runner import assert_user_error, kill_when, run_cli, start_cli

TRAIN = "d4k_jax.train"
TINY = (
    "--config=configs/flux_wlf.py:tiny",
    "--config.data.demo_images=8",
    "--config.data.resolution=32",
    "--config.train.steps=6",
    "--config.train.batch_size=2",
    "--config.train.checkpoint_every=2",
    "--config.train.log_every=1",
    "--config.train.schedule=constant",
    "--config.eval.height=32",
    "--config.eval.width=32",
    "--config.eval.steps=1",
    "--config.eval.prompts=('a red circle',)",
    "--config.eval.metrics=",
)


def test_bad_sizes_batch_mesh_and_names_are_all_reported_before_loading(tmp_path):
    work = tmp_path / "work"
    r = run_cli(
        TRAIN,
        "--config=configs/sd3_wlf.py:tiny",
        f"--workdir={work}",
        "--config.data.resolution=40",
        "--config.eval.height=512",
        "--config.train.microbatches=3",
        "--config.train.mesh.data=3",
        "--config.loss.loss=wavelet",
    )
    assert_user_error(r, "data.resolution=40", "multiple of 16", case="non-multiple-of-32 size")
    assert_user_error(r, "eval.height=512", "position table", "at most 256", case="size beyond the position table")
    assert_user_error(r, "train.microbatches=3", "train.batch_size=32", case="batch not divisible by microbatches")
    assert_user_error(r, "'data': 3", "does not fit 1 device(s)", case="mesh larger than the devices")
    assert_user_error(r, "loss.loss='wavelet'", "'wlf', 'flow'", case="unknown loss")
    assert not work.exists()  # nothing written


def test_missing_pipeline_and_data_folder(tmp_path):
    r = run_cli(
        TRAIN,
        *TINY,
        f"--workdir={tmp_path / 'work'}",
        "--config.pipeline=/no/such/pipeline",
        "--config.data.demo_images=0",
        "--config.data.folder=/no/such/images",
    )
    assert_user_error(r, "/no/such/pipeline", "expected a diffusers pipeline folder", case="missing path")
    assert_user_error(r, "/no/such/images/train/metadata.jsonl", "Aesthetic-4K", case="missing data folder")
    assert not (tmp_path / "work").exists()


def test_unknown_config_key_and_wrong_config_type(tmp_path):
    r = run_cli(TRAIN, *TINY, f"--workdir={tmp_path}", "--config.train.lrr=0.1")
    assert_user_error(r, "--config.train.lrr", "'lr'", case="unknown config key")
    r = run_cli(TRAIN, *TINY, f"--workdir={tmp_path}", "--config.train.steps=ten")
    assert_user_error(r, "--config.train.steps=ten", "int()", case="wrong config type")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of TINY: its workdir."""
    work = tmp_path_factory.mktemp("straight")
    r = run_cli(TRAIN, *TINY, f"--workdir={work}")
    assert r.returncode == 0, r.output
    return work


def _losses(work: Path) -> dict:
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}  # (a step logged twice, before and after a kill: the last)


def _files(folder: Path) -> dict:
    files = (p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


def _steps(work: Path) -> list[int]:
    return sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())


def test_a_rerun_with_another_lr_is_refused_and_changes_nothing(straight, tmp_path):
    before = _files(straight / "checkpoints") | {"config.json": (straight / "config.json").read_text()}
    r = run_cli(TRAIN, *TINY, f"--workdir={straight}", "--config.train.lr=0.01")
    assert_user_error(r, "train.lr: 0.002 -> 0.01", "allow_config_change", case="existing output from another setting")
    assert _files(straight / "checkpoints") | {"config.json": (straight / "config.json").read_text()} == before


def test_killed_in_a_checkpoint_save_then_disk_full_then_resumed_to_the_same_losses(straight, tmp_path):
    work = tmp_path / "work"
    args = (*TINY, f"--workdir={work}", "--config.train.checkpoint_every=1")  # a save after every step
    proc = start_cli(TRAIN, *args, log=tmp_path / "killed.log")
    ckpts = work / "checkpoints"

    def saving_after_a_checkpoint() -> bool:  # a save under way (orbax's tmp folder), one finished before it
        names = [p.name for p in ckpts.iterdir()] if ckpts.is_dir() else []
        return any(n.isdigit() for n in names) and any("tmp" in n for n in names)

    kill_when(proc, saving_after_a_checkpoint)
    kept = _steps(work)
    assert kept and max(kept) < 6, kept
    intact = _files(ckpts / str(max(kept)))

    # the rerun resumes from the last finished checkpoint, and finds the disk full at its next save
    r = run_cli(TRAIN, *args, file_size=1 << 20)
    assert f"resumed from step {max(kept)}" in r.output, r.output
    assert_user_error(r, "disk is full or a file size limit was reached", "free space and rerun", case="disk full")
    assert _files(ckpts / str(max(kept))) == intact

    r = run_cli(TRAIN, *args)  # space again: it completes
    assert r.returncode == 0, r.output
    assert f"resumed from step {max(kept)}" in r.output
    assert _losses(work) == pytest.approx(_losses(straight), rel=1e-6)
    assert sorted(_losses(work)) == [1, 2, 3, 4, 5, 6]
    assert (work / "pipeline" / "export.json").is_file()
    shutil.rmtree(work)  # (the checkpoints are 20 MB each)
