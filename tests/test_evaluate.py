"""`d4k_jax.evaluate`: the report over a folder made here, not-computed entries, FID plumbing, the VAE
reconstruction protocol and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch_fidelity_ref
from PIL import Image

from conversion import pickled
from d4k_jax import evaluate, reconstruct, sharding
from d4k_jax.data.demo import demo_examples
from d4k_jax.metrics import compression, glcm, suite
from d4k_jax.metrics.fid import FeatureStats, InceptionFeatures, fid
from d4k_jax.metrics.images import center_crop

DEMO_VAE = Path(__file__).resolve().parent.parent / "d4k_jax" / "data" / "demo_pipeline" / "vae"


def _folder(root: Path, n: int = 4, size: int = 64, seed: int = 0) -> tuple[Path, list[np.ndarray]]:
    root.mkdir(parents=True)
    examples = demo_examples(n, size, seed)
    with (root / "metadata.jsonl").open("w") as f:
        for i, (image, caption) in enumerate(examples):
            Image.fromarray(image).save(root / f"{i:05d}.png")
            f.write(json.dumps({"file_name": f"{i:05d}.png", "text": caption}) + "\n")
    return root, [im for im, _ in examples]


def test_detail_metrics_and_not_computed_entries(tmp_path):
    root, images = _folder(tmp_path / "gen")
    report = evaluate.evaluate(str(root), list(suite.GENERATION), suite.Weights())
    m = report["metrics"]
    assert report["count"] == 4 and report["size"] == 64
    assert m["glcm"]["value"] == pytest.approx(glcm.glcm_score(images), rel=1e-6)
    assert m["cr"]["value"] == pytest.approx(compression.compression_ratio(images), rel=1e-12)
    for name, flag in (("fid", "--fid_weights"), ("clip", "--clip"), ("aesthetics", "--aesthetic_head")):
        assert flag in m[name]["not_computed"], m[name]
    assert set(report["protocol"]) == set(suite.GENERATION)


def test_saved_jpegs_are_measured_as_they_are_and_unreadable_files_skipped(tmp_path):
    root, images = _folder(tmp_path / "gen", n=2)
    Image.fromarray(images[0]).save(root / "low.jpg", quality=60)
    (root / "broken.png").write_bytes(b"not an image")
    (root / "metadata.jsonl").unlink()  # no captions: the folder's images, sorted
    report = evaluate.evaluate(str(root), ["cr", "clip"], suite.Weights(clip=str(tmp_path)))
    jpeg = (root / "low.jpg").read_bytes()
    pngs = [compression.jpeg_bytes(im) for im in images]
    expected = 3 * images[0].size / (len(jpeg) + sum(map(len, pngs)))
    assert report["metrics"]["cr"]["value"] == pytest.approx(expected, rel=1e-12)
    assert report["count"] == 3 and report["skipped_unreadable"] == 1
    assert "--clip" in report["metrics"]["clip"]["not_computed"]  # tmp_path holds no CLIP folder


@pytest.mark.skipif(not torch_fidelity_ref.AVAILABLE, reason=torch_fidelity_ref.SKIP_REASON)
def test_fid_against_a_reference_folder_with_cached_statistics(tmp_path, monkeypatch):
    """The network sees exactly the generated images and the reference ones center-cropped to their size, and the
    FID is fid() of its features (recorded as it runs: a second pass of InceptionV3 costs a minute of CPU here)."""
    weights = str(pickled.to_safetensors(torch_fidelity_ref.random_inception_file(tmp_path / "inception.pth")))
    root, images = _folder(tmp_path / "gen", n=3, size=64)
    real, real_images = _folder(tmp_path / "real", n=4, size=96, seed=1)  # cropped to the generated size
    cache = tmp_path / "ref.npz"
    kw = dict(reference=str(real / "metadata.jsonl"), reference_cache=str(cache))
    seen, call = [], InceptionFeatures.__call__
    monkeypatch.setattr(InceptionFeatures, "__call__", lambda net, x: seen.append((x, call(net, x))) or seen[-1][1])
    report = evaluate.evaluate(str(root), ["fid"], suite.Weights(fid=weights), **kw)
    inputs, features = (np.concatenate([np.asarray(pair[i]) for pair in seen]) for i in (0, 1))
    a, b = FeatureStats(), FeatureStats()
    for stats, want in ((a, images), (b, [center_crop(Image.fromarray(im), 64) for im in real_images])):
        rows = [next(i for i, x in enumerate(inputs) if np.array_equal(x, w)) for w in want]
        stats.update(features[rows])
    assert len(inputs) == 7 and report["metrics"]["fid"]["value"] == pytest.approx(fid(a, b), rel=1e-6)
    assert cache.is_file()
    again = evaluate.evaluate(str(root), ["fid"], suite.Weights(fid=weights), reference="", reference_cache=str(cache))
    assert again["metrics"]["fid"]["value"] == pytest.approx(report["metrics"]["fid"]["value"], rel=1e-9)


def test_vae_reconstruction_protocol(tmp_path):
    root, images = _folder(tmp_path / "real", n=3, size=64)
    names = ["psnr", "ssim", "nmse", "lpips", "rfid"]
    report = evaluate.evaluate(str(root), names, suite.Weights(), vae=str(DEMO_VAE), vae_dtype="float32", size=64)
    m = report["metrics"]
    from d4k_jax.io import load_component

    module, params = load_component(DEMO_VAE, stride=2)
    rec = reconstruct.roundtrip_fn(module, sharding.make_mesh({"data": 1, "sequence": -1}), False)(
        params, np.stack(images), None
    )
    assert m["psnr"]["value"] == pytest.approx(
        np.mean([10 * np.log10(255.0**2 / np.mean((a / 1.0 - b) ** 2)) for a, b in zip(images, rec, strict=True)]),
        rel=1e-5,
    )
    x, y = np.stack(images) / 255.0, rec / 255.0
    nmse = (((x - y) ** 2).sum(axis=(1, 2, 3)) / (x**2).sum(axis=(1, 2, 3))).mean()
    assert m["nmse"]["value"] == pytest.approx(nmse, rel=1e-5)
    assert 0 < m["ssim"]["value"] < 1
    assert "--lpips_backbone" in m["lpips"]["not_computed"] and "--fid_weights" in m["rfid"]["not_computed"]
    assert "stride 2" in report["protocol"]["vae"]


def test_cli_writes_the_report_and_prints_the_table(tmp_path):
    root, _ = _folder(tmp_path / "gen", n=2)
    with (root / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "a broken image"}) + "\n")
    (root / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "new" / "report.json"  # its folder is made
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "d4k_jax.evaluate", f"--images={root}", "--metrics=glcm,cr,fid", f"--out={out}"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["metrics"]["glcm"]["count"] == 2 and report["skipped_unreadable"] == 1
    assert "not computed" in result.stdout and "glcm" in result.stdout
    assert "2 images (1 unreadable skipped)" in result.stdout and "broken.png" in result.stderr


def test_fid_reference_statistics_are_found_again_without_the_npz_suffix(tmp_path):
    stats = FeatureStats(4)
    stats.update(np.arange(12.0).reshape(3, 4))
    stats.save(tmp_path / "stats")  # numpy writes stats.npz
    assert evaluate.stats_file(str(tmp_path / "stats")) == tmp_path / "stats.npz"
    found = evaluate.reference_stats(suite.Weights(), "", str(tmp_path / "stats"), 64, 8, 0)
    assert found is not None and found.count == 3 and np.array_equal(found.sum, stats.sum)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"bad\.npz is not FID statistics written by d4k_jax\.evaluate"):
        evaluate.reference_stats(suite.Weights(), "", str(tmp_path / "bad"), 64, 8, 0)


def test_mixed_sizes_need_size_and_an_unreadable_first_image_is_skipped(tmp_path):
    root, images = _folder(tmp_path / "gen", n=2)
    (root / "metadata.jsonl").unlink()
    Image.fromarray(demo_examples(1, 80)[0][0]).save(root / "big.png")
    with pytest.raises(ValueError, match=r"different sizes: .*00000\.png is 64x64, .*big\.png is 80x80; pass --size"):
        evaluate.evaluate(str(root), ["glcm", "cr"], suite.Weights())
    report = evaluate.evaluate(str(root), ["glcm", "cr"], suite.Weights(), size=64)
    big = center_crop(Image.open(root / "big.png"), 64)
    assert report["metrics"]["cr"]["value"] == pytest.approx(compression.compression_ratio([*images, big]), rel=1e-12)
    (root / "big.png").unlink()
    (root / "0_broken.png").write_bytes(b"\x89PNG not really")  # sorted first
    report = evaluate.evaluate(str(root), ["cr"], suite.Weights())
    assert report["count"] == 2 and report["skipped_unreadable"] == 1 and report["size"] == 64
    for p in root.glob("0000*.png"):
        p.unlink()
    with pytest.raises(ValueError, match=r"none of the 1 images can be read \(the first: .*0_broken\.png\)"):
        evaluate.evaluate(str(root), ["cr"], suite.Weights())


def test_out_is_checked_before_the_work(tmp_path):
    assert evaluate.check_out(tmp_path / "a" / "b" / "report.json") == tmp_path / "a" / "b" / "report.json"
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    with pytest.raises(IsADirectoryError, match="is a folder; expected the path of a JSON file"):
        evaluate.check_out(tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"file is a file, expected a folder to hold the report"):
        evaluate.check_out(tmp_path / "file" / "report.json")
