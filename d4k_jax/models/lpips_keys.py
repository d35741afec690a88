"""torchvision VGG16 / AlexNet weights and the lpips v0.1 linear heads -> `d4k_jax.models.lpips`.

LPIPS needs two files: the ImageNet backbone as torchvision ships it (`vgg16-397923af.pth`,
`alexnet-owt-7be5be79.pth`: keys `features.{i}.weight/bias` and `classifier.*`) and the learned heads the
lpips pip package ships (`lpips/weights/v0.1/{vgg,alex}.pth`: keys `lin{k}.model.1.weight`, (1, C, 1, 1)).
`d4k_jax.io.metric_nets.load_lpips` reads both as safetensors files with the same keys
(`python -m conversion.pickled FILE.pth` converts the published .pth files once).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from d4k_jax.models.keymap import Rule, conv, copy, param_shapes, to_flax, to_torch
from d4k_jax.models.lpips import LPIPS, conv_indices, tap_count

# The backbone file's ImageNet classifier: LPIPS never uses it, so its keys are read past, not "unexpected".
_CLASSIFIER = "classifier."


def backbone_rules(net: str) -> list[Rule]:
    """torchvision `features.{i}.weight/bias` <-> features/conv{i}/kernel, bias."""
    return [
        rule
        for i in conv_indices(net)
        for rule in (
            conv(f"features.{i}.weight", ("features", f"conv{i}", "kernel")),
            copy(f"features.{i}.bias", ("features", f"conv{i}", "bias")),
        )
    ]


def head_rules(net: str) -> list[Rule]:
    """lpips `lin{k}.model.1.weight` (1, C, 1, 1), a bias-free 1x1 conv <-> lin{k}/kernel (C, 1)."""
    return [
        Rule(
            (f"lin{k}.model.1.weight",),  # model.0 is the Dropout, which holds no weights
            ((f"lin{k}", "kernel"),),
            lambda w: (w[:, :, 0, 0].T,),
            lambda k: (k.T[:, :, None, None],),
        )
        for k in range(tap_count(net))
    ]


def param_shapes_for(net: str) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of every LPIPS parameter for `net` (no memory used)."""
    x = jnp.zeros((1, 64, 64, 3), jnp.float32)  # shapes do not depend on the size; AlexNet needs >= 31
    return param_shapes(LPIPS(net), (x, x))


def to_params(
    backbone: Mapping[str, np.ndarray], heads: Mapping[str, np.ndarray], net: str, what: tuple[str, str] = ("", "")
) -> dict:
    """Two state dicts -> the nested Flax params of `LPIPS(net)`; strict about every key and shape."""
    shapes = param_shapes_for(net)
    trunk = {k: v for k, v in backbone.items() if not k.startswith(_CLASSIFIER)}
    expected = {p: s for p, s in shapes.items() if p[0] == "features"}
    flat = to_flax(trunk, backbone_rules(net), expected, what=what[0] or f"torchvision {net} backbone")
    expected = {p: s for p, s in shapes.items() if p[0] != "features"}
    flat |= to_flax(heads, head_rules(net), expected, what=what[1] or f"lpips v0.1 {net} heads")
    return traverse_util.unflatten_dict({p: jnp.asarray(a, jnp.float32) for p, a in flat.items()})


def to_state_dicts(params: Mapping, net: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The inverse of `to_params`: (torchvision `features.*` state dict, lpips heads state dict)."""
    flat = {p: np.asarray(jax.device_get(a)) for p, a in traverse_util.flatten_dict(dict(params)).items()}
    return to_torch(flat, backbone_rules(net)), to_torch(flat, head_rules(net))
