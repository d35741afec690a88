"""PNG figures a person looks at after a run: the loss curve and sample grids (PIL only, no plotting stack)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def image_grid(images: np.ndarray, path: str | Path, cols: int = 4, captions: Sequence[str] | None = None) -> Path:
    """uint8 images [N, H, W, 3] tiled `cols` wide, each with its caption (wrapped) underneath."""
    n, h, w, _ = images.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    cell_w = max(w, 160)
    text_h = 46 if captions else 0
    canvas = Image.new("RGB", (cols * cell_w, rows * (h + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, image in enumerate(images):
        x, y = (i % cols) * cell_w, (i // cols) * (h + text_h)
        canvas.paste(Image.fromarray(image), (x + (cell_w - w) // 2, y))
        if captions:
            draw.multiline_text((x + 3, y + h + 2), _wrap(captions[i], cell_w // 6), fill="black")
    canvas.save(path)
    return Path(path)


def loss_curve(steps: Sequence[int], losses: Sequence[float], path: str | Path, smooth: int = 20) -> Path:
    """Loss per logged step (grey) and its running mean over `smooth` points (blue), log-scaled y."""
    width, height, pad = 640, 400, 56
    steps, losses = np.asarray(steps, float), np.log10(np.maximum(np.asarray(losses, float), 1e-12))
    mean = np.convolve(losses, np.ones(smooth) / smooth, mode="valid") if len(losses) >= smooth else losses
    x0, x1 = steps.min(), max(steps.max(), steps.min() + 1)
    y0, y1 = losses.min(), max(losses.max(), losses.min() + 1e-3)
    sx = lambda s: pad + (s - x0) / (x1 - x0) * (width - 2 * pad)
    sy = lambda v: height - pad - (v - y0) / (y1 - y0) * (height - 2 * pad)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([pad, pad, width - pad, height - pad], outline="black")
    for frac in np.linspace(0, 1, 5):
        v, s = y0 + frac * (y1 - y0), x0 + frac * (x1 - x0)
        draw.text((4, sy(v) - 6), f"{10**v:.3g}", fill="black")
        draw.text((sx(s) - 12, height - pad + 6), f"{int(s)}", fill="black")
    draw.line([(sx(s), sy(v)) for s, v in zip(steps, losses, strict=True)], fill=(170, 170, 170))
    tail = steps[len(steps) - len(mean) :]
    draw.line([(sx(s), sy(v)) for s, v in zip(tail, mean, strict=True)], fill="blue", width=2)
    draw.text((pad, 20), f"training loss (log scale); blue: mean of {smooth} logged steps", fill="black")
    draw.text((width // 2 - 12, height - 20), "step", fill="black")
    img.save(path)
    return Path(path)


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line][:3])
