"""Orbax save / restore of parameter pytrees."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Write a parameter pytree as an orbax checkpoint at `path` (which must not exist)."""
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(path), params)


def restore_params(path: str | os.PathLike, target: Any) -> Any:
    """Read the pytree saved at `path`. `target` gives structure, shapes, dtypes (and shardings):
    arrays, or `jax.ShapeDtypeStruct`s from `jax.eval_shape`, so nothing is allocated twice."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no orbax checkpoint at {path}")
    abstract = jax.tree.map(_abstract, target)
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(path, abstract)


def _abstract(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
