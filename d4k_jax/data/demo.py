"""The embedded demo set: images drawn deterministically, with captions that say what is drawn.

Nothing is downloaded: `demo_examples(n, size)` returns the same n images for the same arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")


def demo_examples(n: int, size: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """n (uint8 image [size, size, 3], caption) pairs: one or two shapes on a two-tone background."""
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    out = []
    for _ in range(n):
        bg, fg, fg2 = rng.choice(len(names), 3, replace=False)
        shape, shape2 = rng.choice(SHAPES, 2)
        img = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(img)
        _gradient(draw, size, COLORS[names[bg]])
        r = size * rng.uniform(0.18, 0.3)
        cx, cy = size * rng.uniform(0.3, 0.7, 2)
        _shape(draw, shape, cx, cy, r, COLORS[names[fg]])
        caption = f"a {names[fg]} {shape} on a {names[bg]} background"
        if rng.random() < 0.5:
            r2 = r * 0.45
            cx2, cy2 = (cx + size / 2) % size, (cy + size / 3) % size
            _shape(draw, shape2, cx2, cy2, r2, COLORS[names[fg2]])
            caption += f" with a small {names[fg2]} {shape2}"
        out.append((np.asarray(img), caption))
    return out


def _gradient(draw: ImageDraw.ImageDraw, size: int, color: tuple[int, int, int]) -> None:
    for y in range(size):
        t = 0.75 + 0.25 * y / max(size - 1, 1)
        draw.line([(0, y), (size, y)], fill=tuple(int(c * t) for c in color))


def _shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)


def write_folder(root: str | Path, n: int, size: int, seed: int = 0, split: str = "train") -> Path:
    """Writes demo_examples(n, size, seed) as an imagefolder `<root>/<split>/{images/*.png, metadata.jsonl}`.

    Returns `root`, the `--src` of `python -m d4k_jax.data.build`.
    """
    root = Path(root)
    folder = root / split
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, caption) in enumerate(demo_examples(n, size, seed)):
        name = f"images/{i:05d}.png"
        Image.fromarray(image).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root
