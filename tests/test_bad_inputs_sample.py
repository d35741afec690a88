"""`python -m d4k_jax.sample` against bad input, as a user runs it: one line naming the bad value and what
was expected, no traceback, nothing already written lost, and a killed run that a rerun completes.

The runs that sample share the session's compilation cache (conftest): the first compiles."""

from pathlib import Path

import pytest
from cli_runner import ROOT, assert_user_error, kill_when, record, run_cli, start_cli

DEMO = ROOT / "d4k_jax" / "data" / "demo_pipeline"  # FLUX.1 layout, F16 VAE: sizes in multiples of 16
DEMO_SD3 = ROOT / "d4k_jax" / "data" / "demo_pipeline_sd3"  # position table: at most 16 x 2 x 8 = 256 pixels
SAMPLE = "d4k_jax.sample"
# long prompts make long metadata lines: the file-size limit below is reached by metadata.jsonl first
PROMPTS = [f"a {c} circle on a white background, " * 8 for c in ("red", "blue")]
IMAGES = 2 * 8  # 16² PNGs of about 600 bytes
TINY = ("--config.sample.height=16", "--config.sample.width=16", "--config.sample.steps=2")
TINY += ("--config.sample.format=png", "--config.sample.images_per_prompt=8")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_sample")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _args(root: Path, outdir, *args, config="flux_wlf", pipeline=DEMO, prompts=None) -> list[str]:
    given = {a.partition("=")[0] for a in args}
    tiny = [a for a in TINY if a.partition("=")[0] not in given]  # each flag once, as a user writes it
    flags = [f"--config=configs/{config}.py:tiny", f"--config.pipeline={pipeline}", *tiny, *args]
    return [*flags, f"--prompts={prompts or root / 'prompts.txt'}", f"--outdir={outdir}"]


def _sample(root: Path, outdir, *args, file_size=None, **kw):
    return run_cli(SAMPLE, *_args(root, outdir, *args, **kw), file_size=file_size)


def _written(outdir: Path) -> tuple[dict[str, bytes], list[str]]:
    images = {p.name: p.read_bytes() for p in sorted(outdir.glob("*.png"))}
    meta = outdir / "metadata.jsonl"
    return images, meta.read_text().splitlines() if meta.exists() else []


@pytest.fixture(scope="module")
def finished(root):
    """An uninterrupted run: what every interrupted one must end up equal to."""
    result = _sample(root, root / "finished")
    assert result.returncode == 0, result.output
    images, lines = _written(root / "finished")
    assert len(images) == len(lines) == IMAGES
    return images, lines


def test_missing_pipeline_path(root):
    result = _sample(root, root / "out", pipeline=root / "nope")
    assert_user_error(result, str(root / "nope"), "pipeline folder", case="missing path")


def test_missing_and_empty_prompt_files(root):
    result = _sample(root, root / "out", prompts=root / "none.txt")
    assert_user_error(result, str(root / "none.txt"), "does not exist", case="missing prompt file")
    (root / "empty.txt").write_text("\n")
    result = _sample(root, root / "out", prompts=root / "empty.txt")
    assert_user_error(result, str(root / "empty.txt"), "holds no prompts", case="empty prompt file")
    assert not (root / "out").exists()


def test_size_not_a_multiple_of_the_pipeline_factor(root):
    result = _sample(root, root / "out", "--config.sample.height=40")
    assert_user_error(result, "height=40", "multiple of 16", case="non-multiple-of-32 size")


def test_size_beyond_the_position_table(root):
    result = _sample(root, root / "out", "--config.sample.width=272", config="sd3_wlf", pipeline=DEMO_SD3)
    assert_user_error(result, "width=272", "position table: at most 256 pixels", case="size beyond the position table")


def test_unknown_config_key_and_wrong_type(root):
    result = _sample(root, root / "out", "--config.sample.stepz=2")
    assert_user_error(result, "--config.sample.stepz", "steps", case="unknown config key")
    result = _sample(root, root / "out", "--config.sample.steps=two")
    assert_user_error(result, "--config.sample.steps=two", "int()", case="wrong config type")
    result = _sample(root, root / "out", "--config.sample.format=gif")
    assert_user_error(result, "format='gif'", "'jpeg', 'png'", case="wrong config value")


def test_existing_outdir_from_another_setting(root, finished):
    result = _sample(root, root / "finished", "--config.sample.steps=3")
    assert_user_error(result, str(root / "finished"), "steps 2 -> 3", case="existing output from another setting")
    assert _written(root / "finished") == finished


def test_disk_full_keeps_what_was_written(root, finished):
    """The process's metadata file (merged into metadata.jsonl when the run ends) reaches the size limit
    first: the images before are intact with their lines, the image whose line did not fit is on disk (a
    rerun makes it again), its line cut short."""
    out, limit = root / "full", 1500
    result = _sample(root, out, file_size=limit)
    assert_user_error(result, "disk is full", str(out / "metadata.process_0.jsonl"), case="disk full")
    fit = max(k for k in range(IMAGES) if sum(len(x) + 1 for x in finished[1][:k]) <= limit)
    text = (out / "metadata.process_0.jsonl").read_text()
    assert text.startswith("".join(x + "\n" for x in finished[1][:fit])) and len(text) <= limit
    images = _written(out)[0]
    assert sorted(images) == sorted(finished[0])[: fit + 1] and all(images[n] == finished[0][n] for n in images)


def test_sigkill_during_sampling_then_rerun(root, finished):
    out = root / "killed"
    proc = start_cli(SAMPLE, *_args(root, out), log=root / "killed.log")
    kill_when(proc, lambda: any(out.glob("*.png")))
    assert 0 < len(_written(out)[0]) < IMAGES, "the kill came after the run"
    result = _sample(root, out)
    assert result.returncode == 0, result.output
    assert _written(out) == finished
    record("SIGKILL during sampling, then a rerun", result.command, "the rerun completes: the same images and metadata")
