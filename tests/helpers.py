"""Small conversions between torch NCHW and our NHWC, and saving torch models as component folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy().transpose(0, 2, 3, 1)


def save_component(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder
