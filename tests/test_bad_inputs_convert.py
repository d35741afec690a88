"""`python -m conversion.convert` against bad input, as a user runs it: one line naming the bad value and
what was expected, no traceback, and nothing half-written that blocks a rerun."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_runner import ROOT, assert_user_error, kill_when, record, run_cli, start_cli
from helpers import edited_copy

from conversion import load_component
from conversion.convert import convert, partial_path

DEMO = ROOT / "d4k_jax" / "data" / "demo_pipeline"
CLIP = DEMO / "text_encoder"  # the smallest model there (about 120 KB)
CONVERT = "conversion.convert"


def _convert(src, dst, *args, **kw):
    return run_cli(CONVERT, f"--src={src}", f"--dst={dst}", *args, **kw)


def _same_params(a: Path, b: Path) -> None:
    jax.tree.map(np.testing.assert_array_equal, load_component(a)[1], load_component(b)[1])


def test_missing_path(tmp_path):
    assert_user_error(
        _convert(tmp_path / "nope", tmp_path / "out"), "nope", "no such component folder", case="missing path"
    )


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _convert(tmp_path / "empty", tmp_path / "out")
    assert_user_error(result, "empty", "model_index.json (a pipeline folder)", "config.json", case="empty folder")


def test_truncated_safetensors(tmp_path):
    src = shutil.copytree(CLIP, tmp_path / "cut")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    result = _convert(src, tmp_path / "out")
    assert_user_error(result, str(weights), "truncated", "end past", case="truncated safetensors")
    assert not (tmp_path / "out").exists()


def test_wrong_shaped_weights(tmp_path):
    def edit(state):
        state["text_model.final_layer_norm.weight"] = np.zeros(3, np.float32)

    result = _convert(edited_copy(CLIP, tmp_path, edit), tmp_path / "out")
    assert_user_error(result, "final_layer_norm.weight: (3,) -> (", "1 wrong shape", case="wrong-shaped weights")


def test_unknown_override_key(tmp_path):
    result = _convert(DEMO, tmp_path / "out", "--override=strde=2")
    assert_user_error(result, "['strde']", "vae/", "'stride'", case="unknown --override key")
    assert not (tmp_path / "out").exists() and not partial_path(tmp_path / "out").exists()


def test_existing_dst(tmp_path):
    (tmp_path / "out").mkdir()
    assert_user_error(_convert(CLIP, tmp_path / "out"), str(tmp_path / "out"), "exists", case="existing --dst")


def test_disk_full_leaves_nothing_that_blocks_a_rerun(tmp_path):
    dst = tmp_path / "out"
    result = _convert(CLIP, dst, file_size=16_000)  # the CLIP params hold 41 KB
    assert_user_error(result, "disk is full", str(partial_path(dst)), case="disk full")
    assert not dst.exists() and not partial_path(dst).exists()
    convert(CLIP, dst)  # the rerun, with space again
    _same_params(dst, CLIP)


@pytest.fixture
def pipeline(tmp_path):
    """A pipeline folder of the demo's two text encoders and a tokenizer: quick to convert."""
    pipe = tmp_path / "pipe"
    for name in ("text_encoder", "text_encoder_2", "tokenizer"):
        shutil.copytree(DEMO / name, pipe / name)
    index = json.loads((DEMO / "model_index.json").read_text())
    keep = {k: v for k, v in index.items() if k.startswith("_") or (pipe / k).is_dir()}
    (pipe / "model_index.json").write_text(json.dumps(keep))
    return pipe


def test_sigkill_during_convert_then_rerun(pipeline, tmp_path):
    dst = tmp_path / "out"
    proc = start_cli(CONVERT, f"--src={pipeline}", f"--dst={dst}")
    kill_when(proc, partial_path(dst).exists)
    assert not dst.exists()  # the killed run left only DST.partial
    result = _convert(pipeline, dst)
    assert result.returncode == 0, result.output
    assert f"removing {partial_path(dst)}" in result.output
    record(
        "SIGKILL during convert, then rerun",
        result.command,
        f"(rerun) exit 0, logs: removing {partial_path(dst)}, left by an interrupted convert",
    )
    assert not partial_path(dst).exists()
    for name in ("text_encoder", "text_encoder_2"):
        _same_params(dst / name, pipeline / name)
    assert (dst / "tokenizer" / "tokenizer.json").read_bytes() == (
        pipeline / "tokenizer" / "tokenizer.json"
    ).read_bytes()
