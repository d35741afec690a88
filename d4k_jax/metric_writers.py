"""Where training metrics go: `workdir/metrics.jsonl` (one JSON object per logged step) and TensorBoard
event files under `workdir/tensorboard` (scalars and sample images). Only process 0 writes.

A run resumed from the checkpoint of step S redoes the steps after S, which a crash may already have
logged: opening the writer with `resume_step=S` drops those rows from metrics.jsonl (an atomic rewrite)
and hides those TensorBoard events (tensorboardX's purge_step), so that readers see each step once.
"""

from __future__ import annotations

import json
import numbers
import sys
from pathlib import Path

import jax
import numpy as np
from absl import logging

from d4k_jax import files


def summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without torch where torch is not loaded yet: tensorboardX.writer
    tries `import torch` only to accept torch tensors (we write numpy), and that import costs ~3 s a process."""
    if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    def __init__(self, workdir: str | Path, resume_step: int | None = None):
        self.workdir = Path(workdir)
        self.resume_step = resume_step
        self.active = jax.process_index() == 0
        self._log = self._tb = None

    def __enter__(self) -> MetricWriter:
        if self.active:
            SummaryWriter = summary_writer_class()
            purge = None
            if self.resume_step is not None:
                drop_rows_after(self.workdir / "metrics.jsonl", self.resume_step)
                purge = self.resume_step + 1  # events of steps >= purge are hidden
            self._log = (self.workdir / "metrics.jsonl").open("a")
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge)
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


def drop_rows_after(path: Path, step: int) -> int:
    """Rewrites the JSON-lines file `path` without its rows of steps > `step` (and without a line a kill cut
    short), through a temporary file and a rename, so a crash leaves the old file or the new one. Returns
    the number of lines dropped; the file is left untouched when every line is whole and kept."""
    if not path.is_file() or not path.stat().st_size:
        return 0
    text = path.read_text()
    kept, dropped = [], 0
    for line in text.splitlines():
        try:
            keep = json.loads(line).get("step", 0) <= step
        except (json.JSONDecodeError, AttributeError, TypeError):  # not a row of ours
            keep = False
        kept += [line] if keep else []
        dropped += not keep
    if dropped or not text.endswith("\n"):  # (a complete last row without its newline: the next would join it)
        files.write_text(path, "".join(line + "\n" for line in kept))
        logging.info("%s: dropped %d rows past the resumed step %d", path, dropped, step)
    return dropped
