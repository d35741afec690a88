"""Reconstruction metrics (paper Table 2) against skimage 0.26 (float64) and NMSE's numpy formula."""

import jax
import numpy as np
import pytest
from conftest import rel_err
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from d4k_jax.metrics import recon

RTOL, ATOL = 1e-5, 1e-6


def _pairs(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [4, h, w, 3]: random pair; smooth image + noise; bright flat image + faint noise; a darkened copy."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    smooth = 127 + 120 * np.sin(xx / 9.0)[..., None] * np.cos(yy / 13.0)[..., None] * np.array([1.0, 0.7, 0.4])
    a = np.stack([rng.integers(0, 256, (h, w, 3)), smooth, np.full((h, w, 3), 250), smooth]).astype(np.int64)
    b = a + rng.normal(0, [[[[60.0]]], [[[6.0]]], [[[1.5]]], [[[3.0]]]], a.shape).round().astype(np.int64)
    b[3] = b[3] * 3 // 4  # a darker reconstruction: the luminance term matters
    b[0] = rng.integers(0, 256, (h, w, 3))  # unrelated random images
    return a.clip(0, 255).astype(np.uint8), b.clip(0, 255).astype(np.uint8)


def _rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64) / ref - 1)))


@pytest.mark.parametrize("size", [(37, 53), (64, 96), (7, 9)])
def test_psnr_and_ssim_match_skimage(size):
    a, b = _pairs(*size)
    got_psnr, got_ssim = np.asarray(recon.psnr(a, b)), np.asarray(recon.ssim(a, b))
    ref_psnr = np.array([peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b, strict=True)])
    ref_ssim = np.array(
        [structural_similarity(x, y, data_range=255, channel_axis=-1) for x, y in zip(a, b, strict=True)]
    )
    print(f"\n{size}: psnr max rel err {_rel(got_psnr, ref_psnr):.2e}, ssim max rel err {_rel(got_ssim, ref_ssim):.2e}")
    assert got_psnr.shape == got_ssim.shape == (4,) and got_ssim.dtype == np.float32
    np.testing.assert_allclose(got_psnr, ref_psnr, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got_ssim, ref_ssim, rtol=RTOL, atol=ATOL)
    assert len(set(np.round(ref_ssim, 3))) == 4  # the four pairs are distinct cases


def test_float_inputs_match_skimage():
    """Float images in [0, 255] with fractions: the round + frac split keeps float32 SSIM at skimage's float64."""
    a, b = _pairs(40, 64, seed=1)
    rng = np.random.default_rng(2)
    af = np.clip(a + rng.uniform(-0.5, 0.5, a.shape), 0, 255).astype(np.float32)
    bf = np.clip(b + rng.uniform(-0.5, 0.5, b.shape), 0, 255).astype(np.float32)
    pairs = list(zip(af.astype(np.float64), bf.astype(np.float64), strict=True))
    ref_ssim = np.array([structural_similarity(x, y, data_range=255, channel_axis=-1) for x, y in pairs])
    ref_psnr = np.array([peak_signal_noise_ratio(x, y, data_range=255) for x, y in pairs])
    got_ssim, got_psnr = np.asarray(recon.ssim(af, bf)), np.asarray(recon.psnr(af, bf))
    print(f"\nfloat: psnr max rel err {_rel(got_psnr, ref_psnr):.2e}, ssim max rel err {_rel(got_ssim, ref_ssim):.2e}")
    np.testing.assert_allclose(got_ssim, ref_ssim, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got_psnr, ref_psnr, rtol=RTOL, atol=ATOL)
    mixed = np.asarray(recon.ssim(a, bf))  # uint8 original, float reconstruction
    ref = [
        structural_similarity(x.astype(np.float64), y, data_range=255, channel_axis=-1)
        for x, y in zip(a, bf, strict=True)
    ]
    np.testing.assert_allclose(mixed, ref, rtol=RTOL, atol=ATOL)


def test_nmse_matches_numpy_float64():
    a, b = _pairs(37, 53)
    x, y = a / 255.0, b / 255.0
    ref = ((x - y) ** 2).sum(axis=(1, 2, 3)) / (x**2).sum(axis=(1, 2, 3))
    got = np.asarray(recon.nmse(a, b))
    print(f"\nnmse max rel err {_rel(got, ref):.2e}")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(recon.nmse(a.astype(np.float32), b.astype(np.float32)), ref, rtol=RTOL, atol=ATOL)


def test_identical_images():
    a, _ = _pairs(20, 30)
    assert np.all(np.isposinf(recon.psnr(a, a)))
    np.testing.assert_array_equal(recon.ssim(a, a), np.ones(4, np.float32))
    np.testing.assert_array_equal(recon.nmse(a, a), np.zeros(4, np.float32))


def test_jittable_and_batch_independent():
    """Each image alone gives what it gives in the batch, to DESIGN's relative error over the batch (max |diff| /
    max |value|). Not per value: the SSIM of the unrelated random pair is 0.0012, a mean of terms of size ~1
    that cancel, whose float32 sum moves by 1e-9 with the order XLA sums in (1e-6 of itself)."""
    a, b = _pairs(16, 24)
    f = jax.jit(lambda x, y: (recon.psnr(x, y), recon.ssim(x, y), recon.nmse(x, y)))
    batched = f(a, b)
    singles = [f(a[i : i + 1], b[i : i + 1]) for i in range(len(a))]
    for k, ref in enumerate(batched):
        assert rel_err(np.concatenate([s[k] for s in singles]), ref) < 1e-6, k


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros((1, 8, 8, 3), np.int16), np.zeros((1, 8, 8, 3), np.int16), "uint8 or float"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8), r"\[B, H, W, 3\]"),
        (np.zeros((1, 8, 8, 4), np.uint8), np.zeros((1, 8, 8, 4), np.uint8), r"\[B, H, W, 3\]"),
        (np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 9, 3), np.uint8), r"equal shape"),
    ],
)
@pytest.mark.parametrize("metric", [recon.psnr, recon.ssim, recon.nmse])
def test_bad_inputs_raise(metric, a, b, match):
    with pytest.raises(ValueError, match=match):
        metric(a, b)


def test_ssim_needs_the_window():
    with pytest.raises(ValueError, match="at least 7x7"):
        recon.ssim(np.zeros((1, 6, 32, 3), np.uint8), np.zeros((1, 6, 32, 3), np.uint8))
