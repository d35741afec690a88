"""Compression Ratio (REFERENCE.md §5) and the JPEG-q95 files both detail metrics are measured on.

The reference saves every generated image as a quality-95 JPEG and measures the saved files: the
Compression Ratio counts their bytes, the GLCM Score reads them back. PIL (libjpeg-turbo, its default
4:2:0 chroma subsampling at q95) writes and decodes them here; its decode equals OpenCV's `imread`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
from PIL import Image

QUALITY = 95


def jpeg_bytes(image: np.ndarray | Image.Image, quality: int = QUALITY) -> bytes:
    """The JPEG file the reference would save for one uint8 RGB image [H, W, 3]."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    buf = io.BytesIO()
    pil.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """uint8 RGB [H, W, 3] of a JPEG file's bytes."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def jpeg_round_trip(image: np.ndarray | Image.Image, quality: int = QUALITY) -> tuple[np.ndarray, int]:
    """(the image as read back from its saved JPEG, the file's size in bytes)."""
    data = jpeg_bytes(image, quality)
    return decode_jpeg(data), len(data)


class CompressionRatio:
    """Pooled over a stream of images: (sum of H * W * 3) / (sum of JPEG-q95 bytes). Lower = more detail."""

    def __init__(self) -> None:
        self.raw_bytes = 0
        self.jpeg_bytes = 0
        self.count = 0

    def update(self, shape: tuple[int, ...], nbytes: int) -> None:
        """Adds one image of `shape` [H, W, 3] whose JPEG file has `nbytes` bytes."""
        self.count += 1
        self.raw_bytes += int(np.prod(shape))
        self.jpeg_bytes += int(nbytes)

    @property
    def value(self) -> float:
        if not self.jpeg_bytes:
            raise ValueError("compression ratio of no images")
        return self.raw_bytes / self.jpeg_bytes


def compression_ratio(images: np.ndarray | Iterable[np.ndarray]) -> float:
    """REFERENCE.md §5: (N * S² * 3) / (total bytes of the N JPEG-q95 files), for uint8 [N, S, S, 3]."""
    ratio = CompressionRatio()
    for image in images:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected uint8 RGB images [H, W, 3], got {image.dtype} {image.shape}")
        ratio.update(image.shape, len(jpeg_bytes(image)))
    return ratio.value
