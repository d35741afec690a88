"""Image sets for evaluation, streamed: a folder (captions from its metadata.jsonl when present) or an
Aesthetic-4K / `d4k_jax.sample` metadata.jsonl, read a batch at a time by a few threads so that thousands
of 4K images never sit in memory together. Also the JSON writer of the evaluation reports (standard JSON:
no NaN or Infinity, written whole or not at all)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from absl import logging
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
JPEG_SUFFIXES = {".jpg", ".jpeg"}


@dataclasses.dataclass(frozen=True)
class Item:
    path: Path
    caption: str | None = None


@dataclasses.dataclass
class Batch:
    items: list[Item]
    images: list[np.ndarray]  # uint8 [H, W, 3]
    jpeg: list[bytes | None]  # the file's bytes where it is a saved JPEG (kept only when asked)


def list_images(path: str | os.PathLike, limit: int = 0) -> list[Item]:
    """The images of a folder (sorted; captions from FOLDER/metadata.jsonl if it exists) or of a
    metadata.jsonl (`file_name` relative to its folder, `text` the caption)."""
    path = Path(path).expanduser()
    meta = path / "metadata.jsonl" if path.is_dir() else path
    if meta.suffix == ".jsonl" and meta.is_file():
        items = []
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "file_name" not in row:
                raise ValueError(f"{meta}:{n}: no 'file_name' (expected {{'file_name': ..., 'text': ...}})")
            items.append(Item(meta.parent / row["file_name"], row.get("text")))
    elif path.is_dir():
        items = [Item(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        raise FileNotFoundError(f"{path}: not a folder of images or a metadata.jsonl")
    if not items:
        raise FileNotFoundError(f"{path}: no images ({sorted(IMAGE_SUFFIXES)})")
    return items[:limit] if limit else items


def header_sizes(items: Sequence[Item], workers: int = 8) -> list[tuple[Item, tuple[int, int]]]:
    """(item, (height, width)) of every image whose header can be read (the pixels are not decoded)."""

    def header(item: Item) -> tuple[int, int] | None:
        try:
            with Image.open(item.path) as img:
                return img.height, img.width
        except (OSError, ValueError):  # unreadable: skipped and counted when the set is read
            return None

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return [(it, s) for it, s in zip(items, pool.map(header, items), strict=True) if s is not None]


def center_crop(img: Image.Image, size: int) -> np.ndarray:
    """RGB, shorter side resized to `size` (bilinear), centre square crop: uint8 [size, size, 3]."""
    img = img.convert("RGB")
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def _read(item: Item, size: int, keep_jpeg: bool) -> tuple[np.ndarray, bytes | None] | None:
    try:
        data = item.path.read_bytes()
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError) as e:  # unreadable or truncated: skipped, and counted by the caller
        logging.warning("skipping unreadable image %s: %s", item.path, e)
        return None
    as_is = not size or img.size == (size, size)  # an image already size² is not resampled
    pixels = np.asarray(img.convert("RGB")) if as_is else center_crop(img, size)
    saved = keep_jpeg and as_is and item.path.suffix.lower() in JPEG_SUFFIXES
    return pixels, data if saved else None


def batches(
    items: Sequence[Item], batch_size: int, size: int = 0, keep_jpeg: bool = False, workers: int = 4
) -> Iterator[Batch]:
    """Batches of decoded images in order; the next batch is read while the caller works on this one.
    `size` > 0 resizes (shorter side) and centre-crops to size² the images not already size²; `keep_jpeg`
    keeps the bytes of JPEG files read at their own size. Unreadable images are left out with a warning
    (see `Batch.items`)."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        submit = lambda start: [pool.submit(_read, it, size, keep_jpeg) for it in items[start : start + batch_size]]
        pending = submit(0)
        for start in range(0, len(items), batch_size):
            current, pending = pending, submit(start + batch_size)
            read = [(it, f.result()) for it, f in zip(items[start : start + batch_size], current, strict=True)]
            read = [(it, r) for it, r in read if r is not None]
            if read:
                yield Batch([it for it, _ in read], [r[0] for _, r in read], [r[1] for _, r in read])
