"""`python -m d4k_jax.data.build` against bad input, as a user runs it: an error naming the bad value and what
was expected (or a skipped line named in the summary), no traceback, and an existing dataset kept whole."""

import json

import numpy as np
from cli_runner import assert_user_error, record, run_cli
from PIL import Image

from d4k_jax.data import aesthetic4k, demo, input_pipeline

BUILD = "d4k_jax.data.build"


def _build(src, data_dir, *args, **kw):
    return run_cli(BUILD, f"--src={src}", f"--data_dir={data_dir}", *args, **kw)


def test_missing_path(tmp_path):
    result = _build(tmp_path / "nope", tmp_path / "tfds")
    assert_user_error(result, str(tmp_path / "nope"), "no such folder", "<split>", case="missing path")


def test_empty_folder(tmp_path):
    (tmp_path / "src").mkdir()
    result = _build(tmp_path / "src", tmp_path / "tfds")
    assert_user_error(result, str(tmp_path / "src" / "train" / "metadata.jsonl"), "not found", case="empty folder")


def test_empty_metadata(tmp_path):
    (tmp_path / "src" / "train").mkdir(parents=True)
    (tmp_path / "src" / "train" / "metadata.jsonl").write_text("")
    result = _build(tmp_path / "src", tmp_path / "tfds")
    assert_user_error(result, "metadata.jsonl", "no decodable image", case="empty metadata.jsonl")
    assert not aesthetic4k.dataset_dir(tmp_path / "tfds", "train").exists()


def test_corrupt_image_and_escaping_file_name_are_skipped_and_named(tmp_path):
    src = demo.write_folder(tmp_path / "src", 2, 16)
    (src / "train" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "secret.png")
    with open(src / "train" / "metadata.jsonl", "a") as f:
        for name in ("bad.jpg", "../secret.png"):
            f.write(json.dumps({"file_name": name, "text": "x"}) + "\n")
    result = _build(src, tmp_path / "tfds")
    assert result.returncode == 0 and "Traceback" not in result.output, result.output
    assert "2 records written" in result.stdout and "2 skipped" in result.stdout
    corrupt = next(x for x in result.stdout.splitlines() if "skipped bad.jpg:" in x)
    escape = next(x for x in result.stdout.splitlines() if "skipped ../secret.png:" in x)
    assert corrupt.endswith("UnidentifiedImageError: cannot identify image file") and "'..'" in escape
    record("corrupt image", result.command, f"exit 0; the summary lists `{corrupt.strip()}`")
    record("file_name escaping the split", result.command, f"exit 0; the summary lists `{escape.strip()}`")


def test_disk_full_with_overwrite_keeps_the_old_dataset(tmp_path):
    data_dir = tmp_path / "tfds"
    aesthetic4k.build(demo.write_folder(tmp_path / "old", 2, 16), "train", data_dir, num_threads=1)
    before = [input_pipeline.data_source(data_dir, "train")[i]["image"] for i in range(2)]
    new = demo.write_folder(tmp_path / "new", 12, 256, seed=1)  # about 1 MB of PNGs
    result = _build(new, data_dir, "--overwrite", file_size=100_000)
    assert_user_error(result, "disk is full", str(aesthetic4k.partial_dir(data_dir, "train")), case="disk full")
    src = input_pipeline.data_source(data_dir, "train")
    assert [src[i]["image"] for i in range(len(src))] == before
    assert not aesthetic4k.partial_dir(data_dir, "train").exists()
