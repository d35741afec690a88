"""The metric networks' weights, read strictly from safetensors files with their publishers' key names.

FID's Inception (torch-fidelity), LPIPS' backbone and heads (torchvision, lpips) and the LAION aesthetic
head are published as torch pickles: `python -m conversion.pickled FILE.pth` converts each once (same
tensor names), and a .pth given here is refused with that command. The CLIP towers: `io.clip_model`.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from d4k_jax.io.load import read_state_dict
from d4k_jax.models import inception_keys, lpips_keys
from d4k_jax.models.inception import InceptionV3
from d4k_jax.models.keymap import dense, to_flax


def load_inception(
    path: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
) -> tuple[InceptionV3, dict]:
    """(module, variables) for `module.apply(variables, images)`; strict about every key and shape."""
    module = InceptionV3(dtype=dtype, param_dtype=param_dtype)
    shapes = inception_keys.variable_shapes(module)
    source = read_state_dict(path, "the FID Inception weights")
    flat = to_flax(source, inception_keys.checkpoint_rules(shapes, frozenset(source)), shapes, what=str(path))
    # Running statistics stay float32: they are tiny and bf16 would shift every BatchNorm.
    cast = {p: jnp.asarray(a, param_dtype if p[0] == "params" else jnp.float32) for p, a in flat.items()}
    return module, traverse_util.unflatten_dict(cast)


def load_lpips(backbone: str | os.PathLike, heads: str | os.PathLike, net: str = "vgg") -> dict:
    """The Flax params of `LPIPS(net)` from a torchvision backbone file and an lpips heads file."""
    return lpips_keys.to_params(
        read_state_dict(backbone, "the LPIPS backbone"),
        read_state_dict(heads, "the LPIPS heads"),
        net,
        what=(str(backbone), str(heads)),
    )


# The LAION improved aesthetic predictor's head (`sac+logos+ava1-l14-linearMSE.pth`), as in Diffusion-4K's
# generate_and_eval_fid.py: `nn.Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
# Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1))`, no activations: the state dict holds
# `layers.{0,2,4,6,7}.weight/bias` (the dropouts hold nothing).
AESTHETIC_WIDTHS = (768, 1024, 128, 64, 16, 1)  # CLIP ViT-L/14 image embedding -> score
AESTHETIC_LAYERS = (0, 2, 4, 6, 7)  # the Linear layers' positions in the Sequential


def load_aesthetic_head(path: str | os.PathLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(kernel [in, out], bias [out])] for the five Linear layers in order; strict about keys and shapes."""
    layers = AESTHETIC_LAYERS
    rules = [r for i in layers for r in dense(f"layers.{i}", (f"layers_{i}",))]
    shapes = {}
    for i, d_in, d_out in zip(layers, AESTHETIC_WIDTHS[:-1], AESTHETIC_WIDTHS[1:], strict=True):
        shapes |= {(f"layers_{i}", "kernel"): (d_in, d_out), (f"layers_{i}", "bias"): (d_out,)}
    source = read_state_dict(path, "the aesthetic head")
    flat = to_flax(source, rules, shapes, what=f"{path} (LAION aesthetic predictor head)")
    return [(flat[(f"layers_{i}", "kernel")], flat[(f"layers_{i}", "bias")]) for i in layers]
