"""`python -m d4k_jax.reconstruct` against bad input, as a user runs it: one line naming the bad value and
what was expected, no traceback, and what an earlier run wrote left intact."""

from pathlib import Path

import pytest
from cli_runner import assert_user_error, run_cli

RECONSTRUCT = "d4k_jax.reconstruct"


def _reconstruct(workdir, *args, **kw):
    return run_cli(RECONSTRUCT, "--config=configs/vae_recon.py:tiny", "--config.num_images=2", *args,
                   f"--workdir={workdir}", **kw)  # fmt: skip


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "images").mkdir()
    return tmp_path / "images"


def test_missing_paths(tmp_path):
    result = _reconstruct(tmp_path / "out", f"--config.images={tmp_path / 'nope'}", f"--config.vae_path={tmp_path}")
    assert_user_error(
        result,
        f"--config.images={tmp_path / 'nope'} is not a folder",
        f"{tmp_path}: no config.json",
        case="missing path",
    )
    assert not (tmp_path / "out").exists()


def test_empty_folder(folder, tmp_path):
    result = _reconstruct(tmp_path / "out", f"--config.images={folder}")
    assert_user_error(result, f"--config.images={folder}: no images", case="empty folder")


def test_corrupt_images_only(folder, tmp_path):
    (folder / "x.png").write_bytes(b"not an image")
    result = _reconstruct(tmp_path / "out", f"--config.images={folder}")
    assert_user_error(result, "none of its 1 images can be read", "x.png", case="corrupt image (the only one)")


def test_size_not_a_multiple_of_the_vae_factor(tmp_path):
    result = _reconstruct(tmp_path / "out", "--config.image_size=60")
    assert_user_error(result, "image_size=60", "multiple of the VAE's factor 8", case="non-multiple size")


def test_disk_full_keeps_the_earlier_report(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"mean_psnr": 25.0}\n')  # an earlier run's report
    result = _reconstruct(out, file_size=2000)  # a 64x128 PNG is larger
    assert_user_error(result, "disk is full", str(out / "recon_demo_0000.png"), case="disk full")
    assert (out / "metrics.json").read_text() == '{"mean_psnr": 25.0}\n'
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]  # no half-written image
