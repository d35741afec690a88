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


def test_reconstruct_folder_skips_corrupt_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, (img, _) in enumerate(demo_examples(2, 80)):
        Image.fromarray(img).save(images / f"im{i}.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    c = vae_recon.get_config("tiny")
    c.images, c.image_size, c.batch_size = str(images), 64, 2
    report = reconstruct.run(c, str(tmp_path / "out"))
    assert sorted(report["psnr"]) == ["im0", "im1"]
    assert report["random_weights"] is False and report["mean_psnr"] > 22  # the trained demo VAE
    out = np.asarray(Image.open(tmp_path / "out" / "recon_im0.png"))
    assert out.shape == (64, 128, 3)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["mean_psnr"] == report["mean_psnr"]


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
