"""GLCM Score and Compression Ratio against the reference's own tools: the JPEG-q95 file read by OpenCV,
OpenCV's grayscale, skimage's graycomatrix + shannon_entropy per 64x64 patch; PIL's byte counts."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage.feature import graycomatrix
from skimage.measure import shannon_entropy

from d4k_jax.metrics import compression, glcm


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _reference_image_score(image: np.ndarray, jpeg: bool = True) -> float:
    if jpeg:
        bgr = cv2.imdecode(np.frombuffer(_jpeg(image), np.uint8), cv2.IMREAD_COLOR)
    else:
        bgr = np.ascontiguousarray(image[..., ::-1])
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) // 4
    h, w = gray.shape
    scores = [
        shannon_entropy(
            graycomatrix(
                gray[i : i + 64, j : j + 64], [1, 2, 3, 4], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], 64, normed=True
            )
        )
        for i in range(0, h - 63, 64)
        for j in range(0, w - 63, 64)
    ]
    return float(np.mean(scores))


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:256, 0:256]
    smooth = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)  # gradients: few distinct counts
    stripes = np.where((x // 3 + y // 5) % 2, 200, 30)[..., None].repeat(3, -1).astype(np.uint8)
    noisy = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    return [
        rng.integers(0, 256, (128, 192, 3), dtype=np.uint8),  # texture everywhere
        smooth,
        stripes[:200, :130],  # a border narrower than a patch is left out
        noisy,
        np.full((64, 64, 3), 7, np.uint8),  # one value: entropy of a near-constant histogram
    ]


@pytest.mark.parametrize("jpeg", [True, False])
def test_glcm_scores_match_the_reference(jpeg):
    images = _images()
    ours = glcm.glcm_scores(images, jpeg=jpeg)
    ref = np.array([_reference_image_score(im, jpeg) for im in images])
    err = np.abs(ours - ref) / np.abs(ref)
    print(f"GLCM relative error (jpeg={jpeg}): max {err.max():.2e}, scores {np.round(ref, 4)}")
    assert err.max() < 1e-5
    assert glcm.glcm_score(images, jpeg=jpeg) == pytest.approx(ref.mean(), rel=1e-5)


def test_batched_gray_scores_and_chunking_agree():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (3, 192, 128), dtype=np.uint8)
    one_by_one = [glcm.glcm_scores_gray(g[None])[0] for g in gray]
    np.testing.assert_allclose(glcm.glcm_scores_gray(gray, chunk=5), one_by_one, rtol=1e-6)


def test_opencv_grayscale_is_exact_over_the_rgb_cube():
    v = np.arange(256)
    cube = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).astype(np.uint8).reshape(4096, 4096, 3)
    ref = cv2.cvtColor(np.ascontiguousarray(cube[..., ::-1]), cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(np.asarray(glcm.opencv_gray(cube)), ref)


def test_jpeg_round_trip_equals_opencv_decode():
    image = _images()[3]
    decoded, nbytes = compression.jpeg_round_trip(image)
    data = _jpeg(image)
    assert nbytes == len(data)
    np.testing.assert_array_equal(decoded, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1])


def test_compression_ratio_is_pooled_over_pil_byte_counts():
    images = [im for im in _images() if im.shape[0] == im.shape[1]]
    expected = sum(im.size for im in images) / sum(len(_jpeg(im)) for im in images)
    assert compression.compression_ratio(images) == pytest.approx(expected, rel=1e-12)
    assert compression.compression_ratio(np.stack(images[:2])) == pytest.approx(
        2 * images[0].size / sum(len(_jpeg(im)) for im in images[:2])
    )


def test_bad_inputs_name_what_was_expected():
    with pytest.raises(ValueError, match="uint8 RGB"):
        glcm.glcm_score([np.zeros((64, 64, 3), np.float32)])
    with pytest.raises(ValueError, match="no 64x64 patch"):
        glcm.glcm_score([np.zeros((32, 80, 3), np.uint8)])
    with pytest.raises(ValueError, match="no images"):
        compression.compression_ratio([])
