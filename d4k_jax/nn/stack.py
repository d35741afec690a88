"""Identical blocks stacked with `nn.scan` (one compiled body, params with a leading "layers" axis),
each wrapped in `nn.remat` with a policy chosen by name in the config."""

from __future__ import annotations

import flax.linen as nn
import jax

REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation (inference)
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def rematerialize(block: type[nn.Module], policy: str, *, in_scan: bool = False) -> type[nn.Module]:
    """`block` rematerialised with the named policy ("none": unchanged). Outside a scan, CSE must be
    prevented or XLA may merge the recompute back into the forward and keep the activations after all."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose from {sorted(REMAT_POLICIES)}")
    if policy == "none":
        return block
    return nn.remat(block, policy=REMAT_POLICIES[policy], prevent_cse=not in_scan)


def stack(block: type[nn.Module], length: int, *, remat: str = "none", num_broadcast: int = 0) -> type[nn.Module]:
    """A module class applying `block` `length` times.

    `block.__call__(carry, *broadcast) -> (carry, y)`: `carry` threads through the layers; the
    `num_broadcast` further positional arguments are the same for every layer; the per-layer outputs y
    come back stacked on a leading axis. Parameters get a leading "layers" logical axis.
    """
    return nn.scan(
        rematerialize(block, remat, in_scan=True),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * num_broadcast,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
