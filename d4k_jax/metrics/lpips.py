"""LPIPS distance between uint8 image batches, as `lpips.LPIPS(net, version="0.1")` computes it.

Inputs map to [-1, 1] as lpips' `im2tensor` does (x / 127.5 - 1). The weights are two files the user
supplies (nothing is downloaded): the torchvision backbone (`vgg16-397923af.pth` /
`alexnet-owt-7be5be79.pth`) and the lpips v0.1 heads (`lpips/weights/v0.1/{vgg,alex}.pth` inside the lpips
pip package), each converted once to .safetensors with the same keys (`python -m conversion.pickled FILE.pth`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from d4k_jax.io.metric_nets import load_lpips
from d4k_jax.metrics import weights
from d4k_jax.models.lpips import LPIPS, NETS

BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}  # torchvision's names


class LPIPSMetric:
    """`metric(a, b)`: uint8 [B, H, W, 3] pairs -> LPIPS distance [B] float32 (lower = more similar)."""

    def __init__(self, params: Any, net: str = "vgg", dtype: Any = jnp.float32):
        if net not in NETS:
            raise ValueError(f"LPIPS net must be one of {sorted(NETS)}, got {net!r}")
        self.net, self.params = net, params
        self.module = LPIPS(net, dtype=dtype)
        self._distance = jax.jit(self._apply)

    @classmethod
    def from_files(
        cls,
        backbone: str | os.PathLike | None,
        heads: str | os.PathLike | None,
        net: str = "vgg",
        dtype: Any = jnp.float32,
    ) -> LPIPSMetric:
        """Load the torchvision `backbone` and lpips `heads` files; MissingWeights if either is absent."""
        if net not in NETS:
            raise ValueError(f"LPIPS net must be one of {sorted(NETS)}, got {net!r}")
        b = weights.require(backbone, f"LPIPS backbone (torchvision {BACKBONE_FILES[net]})", "--lpips_backbone")
        h = weights.require(heads, f"LPIPS heads (lpips/weights/v0.1/{net}.pth)", "--lpips_heads")

        return cls(load_lpips(b, h, net), net, dtype)

    def _apply(self, params: Any, a: jax.Array, b: jax.Array) -> jax.Array:
        x0, x1 = (x.astype(jnp.float32) / 127.5 - 1.0 for x in (a, b))  # lpips.im2tensor
        return self.module.apply({"params": params}, x0, x1)

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """a, b uint8 [B, H, W, 3] in [0, 255] -> [B] float32."""
        if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"LPIPS needs two uint8 image batches of one shape [B, H, W, 3], got {a.shape}, {b.shape}")
        return self._distance(self.params, a, b)
