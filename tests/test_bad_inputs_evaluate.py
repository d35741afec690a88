"""`python -m d4k_jax.evaluate` against bad input, as a user runs it: one line naming the bad value and what
was expected, no traceback, and nothing computed before a bad --out is found."""

from pathlib import Path

import numpy as np
import pytest
from cli_runner import assert_user_error, run_cli
from PIL import Image

EVALUATE = "d4k_jax.evaluate"


def _evaluate(images, *args):
    return run_cli(EVALUATE, f"--images={images}", "--metrics=glcm,cr", *args)


def _image(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(size).integers(0, 255, (size, size, 3), np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_images")
    _image(root / "a.png", 64)
    return root


def test_missing_path(tmp_path):
    result = _evaluate(tmp_path / "nope", f"--out={tmp_path / 'r.json'}")
    assert_user_error(result, str(tmp_path / "nope"), "not a folder of images or a metadata.jsonl", case="missing path")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _evaluate(tmp_path / "empty", f"--out={tmp_path / 'r.json'}")
    assert_user_error(result, str(tmp_path / "empty"), "no images", case="empty folder")


def test_corrupt_image_alone(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "x.png").write_bytes(b"not an image")
    result = _evaluate(tmp_path / "set", f"--out={tmp_path / 'r.json'}")
    assert_user_error(result, "none of the 1 images can be read", "x.png", case="corrupt image (the only one)")
    assert not (tmp_path / "r.json").exists()


def test_out_is_a_folder_or_under_a_file(images, tmp_path):
    result = _evaluate(images, f"--out={tmp_path}")
    assert_user_error(
        result, f"--out={tmp_path} is a folder", "expected the path of a JSON file", case="--out a folder"
    )
    (tmp_path / "file").write_text("x")
    result = _evaluate(images, f"--out={tmp_path / 'file' / 'r.json'}")
    assert_user_error(result, str(tmp_path / "file"), "expected a folder", case="--out under a file")


def test_mixed_sizes(images, tmp_path):
    mixed = tmp_path / "mixed"
    _image(mixed / "a.png", 64), _image(mixed / "b.png", 96)
    result = _evaluate(mixed, f"--out={tmp_path / 'r.json'}")
    assert_user_error(result, "a.png is 64x64", "b.png is 96x96", "--size", case="mixed sizes")


def test_bad_distributed_flags_and_request_in_one_error(images, tmp_path):
    result = run_cli(
        EVALUATE, f"--images={images}", "--metrics=glcm,bogus", "--batch_size=0", f"--out={tmp_path / 'r.json'}",
        "--distributed.coordinator_address=nohost", "--distributed.num_processes=2", "--distributed.process_id=5",
    )  # fmt: skip
    assert_user_error(
        result, "distributed.coordinator_address='nohost': expected HOST:PORT", "distributed.process_id=5",
        "expected 0 to 1", "unknown metrics ['bogus']", "--batch_size=0", case="bad --distributed.* flags",
    )  # fmt: skip
    assert not (tmp_path / "r.json").exists()
