"""The LAION improved aesthetic predictor's head (`sac+logos+ava1-l14-linearMSE.pth`) -> a list of (kernel, bias).

The reference (improved-aesthetic-predictor's `MLP`, also in Diffusion-4K's generate_and_eval_fid.py) is
`layers = nn.Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64),
Dropout(0.1), Linear(64, 16), Linear(16, 1))` with no activations, so the state dict holds
`layers.{0,2,4,6,7}.weight/bias` (the dropouts hold nothing). A .safetensors file with the same keys is read
without torch; a .pth/.pt only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os

import numpy as np

from conversion.load import read_state_dict
from conversion.rules import dense, to_flax

WIDTHS = (768, 1024, 128, 64, 16, 1)  # CLIP ViT-L/14 image embedding -> score
INDICES = (0, 2, 4, 6, 7)  # the Linear layers' positions in the Sequential


def load_head(path: str | os.PathLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(kernel [in, out], bias [out])] for the five Linear layers in order; strict about keys and shapes."""
    rules = [r for i in INDICES for r in dense(f"layers.{i}", (f"layers_{i}",))]
    shapes = {}
    for i, d_in, d_out in zip(INDICES, WIDTHS[:-1], WIDTHS[1:], strict=True):
        shapes |= {(f"layers_{i}", "kernel"): (d_in, d_out), (f"layers_{i}", "bias"): (d_out,)}
    source = read_state_dict(path, "the aesthetic head")
    flat = to_flax(source, rules, shapes, what=f"{path} (LAION aesthetic predictor head)")
    return [(flat[(f"layers_{i}", "kernel")], flat[(f"layers_{i}", "bias")]) for i in INDICES]
