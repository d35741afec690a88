"""The reconstruct CLI (make demo), its config and the embedded demo set."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import vae_recon
from d4k_jax import reconstruct
from d4k_jax.data.demo import COLORS, demo_examples
from d4k_jax.files import write_json


def test_demo_set_is_deterministic_and_captioned():
    a, b = demo_examples(3, 64, seed=1), demo_examples(3, 64, seed=1)
    for (img_a, cap_a), (img_b, cap_b) in zip(a, b, strict=True):
        np.testing.assert_array_equal(img_a, img_b)
        assert cap_a == cap_b
    img, caption = a[0]
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    bg = caption.split(" on a ")[1].split(" background")[0]
    # the bottom-left corner shows the background colour the caption names
    assert np.abs(img[-1, 0].astype(int) - np.array(COLORS[bg])).max() < 8
    assert not np.array_equal(demo_examples(1, 64, seed=2)[0][0], img)


def test_config_variants():
    full, tiny = vae_recon.get_config(), vae_recon.get_config("tiny")
    assert full.image_size == 4096 and full.stride == 2 and not full.random_vae.enabled
    assert not tiny.random_vae.enabled and tiny.vae_path.endswith("demo_pipeline/vae") and tiny.image_size < 4096
    with pytest.raises(ValueError, match="unknown config variant"):
        vae_recon.get_config("huge")


def test_full_config_needs_weights(tmp_path):
    with pytest.raises(ValueError, match="vae_path"):
        reconstruct.run(vae_recon.get_config(), str(tmp_path))


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}: not standard JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_reconstruct_folder_skips_corrupt_images_and_keeps_same_named_files_apart(tmp_path):
    images = tmp_path / "images"
    for sub in ("a", "b"):
        (images / sub).mkdir(parents=True)
    demo = demo_examples(3, 80)
    Image.fromarray(demo[0][0]).save(images / "im0.png")
    Image.fromarray(demo[1][0]).save(images / "a" / "x.png")  # same name, other subfolder, other image
    Image.fromarray(demo[2][0]).save(images / "b" / "x.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    c = vae_recon.get_config("tiny")
    c.images, c.image_size, c.batch_size = str(images), 64, 3  # one batch: one compile
    report = reconstruct.run(c, str(tmp_path / "out"))
    assert sorted(report["psnr"]) == ["a/x.png", "b/x.png", "im0.png"]
    assert report["random_weights"] is False and report["mean_psnr"] > 22  # the trained demo VAE
    out = {
        p.relative_to(tmp_path / "out").as_posix(): np.asarray(Image.open(p)) for p in (tmp_path / "out").rglob("*.png")
    }
    assert sorted(out) == ["a/recon_x.png.png", "b/recon_x.png.png", "recon_im0.png.png"]
    assert out["recon_im0.png.png"].shape == (64, 128, 3)
    assert not np.array_equal(out["a/recon_x.png.png"], out["b/recon_x.png.png"])
    assert _strict_json(tmp_path / "out" / "metrics.json")["mean_psnr"] == report["mean_psnr"]


def test_reports_are_standard_json(tmp_path):
    write_json(tmp_path / "r.json", {"psnr": {"a": float("inf"), "b": 30.0}, "mean": float("nan"), "n": [1, 2.5]})
    assert _strict_json(tmp_path / "r.json") == {"psnr": {"a": None, "b": 30.0}, "mean": None, "n": [1, 2.5]}
    assert not list(tmp_path.glob("*.tmp"))


def _no_weights(*_):
    raise AssertionError("the weights were loaded before the inputs were checked")


def test_bad_sets_and_sizes_are_refused_before_the_weights_load(tmp_path, monkeypatch):
    monkeypatch.setattr(reconstruct, "load_vae", _no_weights)
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "images" / name).write_bytes(b"not an image")
    c = vae_recon.get_config("tiny")
    c.images, c.image_size = str(tmp_path / "images"), 64
    with pytest.raises(ValueError, match=r"images: none of its 2 images can be read \(first: .*a\.png\)"):
        reconstruct.run(c, str(tmp_path / "out"))
    c.image_size, c.batch_size, c.images = 60, 0, str(tmp_path / "none")
    with pytest.raises(ValueError) as e:
        reconstruct.run(c, str(tmp_path / "out"))
    for needle in ("image_size=60 is not a positive multiple of the VAE's factor 8", "batch_size=0", "none is not a"):
        assert needle in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_with_config_overrides(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "d4k_jax.reconstruct",
        "--config=configs/vae_recon.py:tiny",
        "--config.num_images=2",
        "--config.image_size=64",
        f"--workdir={tmp_path}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in tmp_path.glob("recon_*.png")) == ["recon_demo_0000.png", "recon_demo_0001.png"]
