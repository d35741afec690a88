"""`d4k_jax.evaluate` as 2 real processes x 4 CPU devices (tools.launch, gloo) equals 1 process x 8 devices: each
process measures its share of the set and the sums are added across processes."""

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
from d4k_jax import evaluate
from d4k_jax.data.demo import demo_examples
from d4k_jax.metrics import across, suite
from d4k_jax.metrics.fid import FeatureStats

ROOT = Path(__file__).resolve().parent.parent


def test_shares_cover_the_set_once_in_order():
    for n, count in ((7, 2), (2, 3), (0, 2), (9, 4)):
        shares = [across.share(n, i, count) for i in range(count)]
        assert [i for s in shares for i in s] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def _folder(root: Path, n: int, size: int, seed: int) -> Path:
    root.mkdir(parents=True)
    with (root / "metadata.jsonl").open("w") as f:
        for i, (image, caption) in enumerate(demo_examples(n, size, seed)):
            Image.fromarray(image).save(root / f"{i:05d}.png")
            f.write(json.dumps({"file_name": f"{i:05d}.png", "text": caption}) + "\n")
    return root


def _evaluate(tmp: Path, name: str, launch: list[str], env: dict, *args: str) -> tuple[dict, str]:
    out = tmp / f"{name}.json"
    cmd = [sys.executable, "-m", "d4k_jax.evaluate", f"--out={out}", *args]
    result = subprocess.run([*launch, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


@pytest.mark.skipif(not torch_fidelity_ref.AVAILABLE, reason=torch_fidelity_ref.SKIP_REASON)
def test_two_processes_of_four_devices_evaluate_as_one_of_eight(tmp_path):
    weights = pickled.to_safetensors(torch_fidelity_ref.random_inception_file(tmp_path / "inception.pth"))
    gen = _folder(tmp_path / "gen", 5, 64, seed=0)  # shares of 3 and 2
    (gen / "00001.png").write_bytes(b"not an image")  # in process 0's share: skipped, counted once
    real = _folder(tmp_path / "real", 3, 96, seed=1)  # cropped to 64; shares of 2 and 1
    args = [f"--images={gen}", f"--reference={real}", "--metrics=glcm,cr,fid,clip", f"--fid_weights={weights}"]
    args += ["--batch_size=2"]
    # the children compile with the suite's fast flags, but pick their device count with JAX_NUM_CPU_DEVICES
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    env |= {"XLA_FLAGS": os.environ["D4K_TEST_XLA_FLAGS"]}
    # 1 x 8: this process (the suite's 8 CPU devices, the same flags)
    one = evaluate.evaluate(
        str(gen), ["glcm", "cr", "fid", "clip"], suite.Weights(fid=str(weights)), reference=str(real),
        reference_cache=str(tmp_path / "one"), batch_size=2,
    )  # fmt: skip
    launch = [sys.executable, "-m", "tools.launch", "--processes=2", "--devices_per_process=4"]
    launch += ["--prefix=distributed.", "--"]
    two, stdout = _evaluate(tmp_path, "two", launch, env, *args, f"--fid_reference_stats={tmp_path / 'two'}")

    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["count"] == one["count"] == 4 and two["skipped_unreadable"] == one["skipped_unreadable"] == 1
    m1, m2 = one["metrics"], two["metrics"]
    assert m2["cr"] == m1["cr"]  # integer byte sums: exact
    assert m2["glcm"]["count"] == m1["glcm"]["count"] == 4
    assert m2["glcm"]["value"] == pytest.approx(m1["glcm"]["value"], rel=1e-13, abs=0)  # the mean of equal scores
    # The feature sums differ by float64 summation order only (1e-19 relative, checked below), but with fewer
    # images than its 2048 features a covariance is singular: its zero eigenvalues come out as +-1e-16 of the
    # largest and their square roots, ~1e-8 of it, enter the trace. One process changes as much with another
    # --batch_size. Measured between 1x8 and 2x4: 7e-9 and 2e-8.
    assert m2["fid"]["count"] == m1["fid"]["count"] == 4
    assert m2["fid"]["value"] == pytest.approx(m1["fid"]["value"], rel=1e-6, abs=0)
    assert m2["clip"] == m1["clip"] and "--clip" in m2["clip"]["not_computed"]
    # the reference statistics: computed over both shares, written once by process 0
    a, b = (FeatureStats.load(tmp_path / f"{n}.npz") for n in ("one", "two"))
    assert a.count == b.count == 3
    np.testing.assert_allclose(b.sum, a.sum, rtol=1e-12)
    np.testing.assert_allclose(b.outer, a.outer, rtol=1e-12, atol=1e-12 * np.abs(a.outer).max())
    assert not list(tmp_path.glob(".*partial*"))
    table = [line for line in stdout.splitlines() if "report:" in line]
    assert len(table) == 1 and table[0].startswith("[0] 4 images (1 unreadable skipped)"), stdout[-2000:]


def test_vae_reconstruction_over_two_processes_equals_one_with_their_devices(tmp_path):
    """Each process reconstructs its share on its own 4 devices (image rows split over them), so 2 x 4 equals
    1 x 4; 1 x 8 splits the rows 8 ways and differs by float32 rounding (measured: PSNR 2e-7, NMSE 2e-6)."""
    real = _folder(tmp_path / "real", 3, 64, seed=1)
    args = [f"--images={real}", f"--vae={ROOT / 'd4k_jax/data/demo_pipeline/vae'}", "--vae_dtype=float32"]
    args += ["--metrics=psnr,ssim,nmse", "--batch_size=2"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    env |= {"XLA_FLAGS": os.environ["D4K_TEST_XLA_FLAGS"]}
    one, _ = _evaluate(tmp_path, "one", [], env | {"JAX_NUM_CPU_DEVICES": "4"}, *args)
    launch = [sys.executable, "-m", "tools.launch", "--processes=2", "--devices_per_process=4"]
    two, _ = _evaluate(tmp_path, "two", [*launch, "--prefix=distributed.", "--"], env, *args)
    assert two["count"] == one["count"] == 3
    for name in ("psnr", "ssim", "nmse"):
        assert two["metrics"][name]["count"] == 3
        assert two["metrics"][name]["value"] == pytest.approx(one["metrics"][name]["value"], rel=1e-12, abs=0), name
