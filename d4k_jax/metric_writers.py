"""Where training metrics go: `workdir/metrics.jsonl` (one JSON object per logged step) and TensorBoard
event files under `workdir/tensorboard` (scalars and sample images). Only process 0 writes."""

from __future__ import annotations

import json
import numbers
from pathlib import Path

import jax
import numpy as np


class MetricWriter:
    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.active = jax.process_index() == 0
        self._log = self._tb = None

    def __enter__(self) -> MetricWriter:
        if self.active:
            from tensorboardX import SummaryWriter

            self._log = (self.workdir / "metrics.jsonl").open("a")
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
        return self

    def write(self, row: dict) -> None:
        """One JSON line; every numeric field also as a TensorBoard scalar at row["step"]."""
        if not self.active:
            return
        self._log.write(json.dumps(row) + "\n")
        self._log.flush()
        for name, value in row.items():
            if name != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._tb.add_scalar(name, value, row["step"])
        self._tb.flush()

    def images(self, step: int, name: str, images: np.ndarray) -> None:
        """uint8 images [N, H, W, 3] as one TensorBoard image grid."""
        if self.active:
            self._tb.add_images(name, np.asarray(images), step, dataformats="NHWC")
            self._tb.flush()

    def __exit__(self, *exc) -> None:
        if self.active:
            self._log.close()
            self._tb.close()
