"""Identical blocks stacked with `nn.scan` (one compiled body, params with a leading "layers" axis),
each wrapped in `nn.remat` with a policy chosen by name in the config."""

from __future__ import annotations

import flax.linen as nn
import jax

from d4k_jax.nn.attention import ATTENTION_OUT
from d4k_jax.nn.linear import LORA

# The primitive that the forward rule of jax's cuDNN attention (jax.nn.dot_product_attention(implementation="cudnn"))
# binds; its outputs are the attention output O [B, L, N, K] and the softmax statistics [B, N, L] (float32), which,
# with q, k and v, are all that its backward primitive reads. jax names no checkpoint inside that custom_vjp
# (jax PR #26374 was closed unmerged), so the policy matches the primitive by name, as axlearn's
# save_or_offload_flash_attention_policy does; tests/test_remat.py fails if jax renames it.
CUDNN_ATTENTION_FWD = "dot_product_attention_fwd_wrapper"


def _cudnn_attention_saveable(prim, *_, **__) -> bool:
    return prim.name == CUDNN_ATTENTION_FWD


# "save_attention": full remat, except that the attention kernel's outputs are kept for the backward pass, so that it
# does not rerun the attention forward, the largest part of the recompute (attention is 64 % of SD3's FLOPs at
# 4096²). The rest (projections, norms, RoPE, MLP) is recomputed as under "full"; q, k, v come back from the
# projections. Cost per attention and image: O in the compute dtype plus float32 statistics; SD3-medium trains at 4096²
# on 16,538 tokens (16,384 image + 154 text): 16,538 x 1536 x 2 B ≈ 51 MB + 16,538 x 24 x 4 B ≈ 1.6 MB per layer,
# ≈ 1.2 GB over its 24 layers per image in flight (FLUX.1-dev: ≈ 101 MB per block, 5.8 GB over 57). What each keeps:
#   - cuDNN: its forward primitive's outputs (O and the statistics), matched by name (CUDNN_ATTENTION_FWD);
#   - splash (TPU): O and the logsumexp, which the kernel names ATTENTION_OUT itself (residual_checkpoint_name);
#   - "chunked" and "xla": O, named ATTENTION_OUT; their backward still recomputes the softmax from q and k, so
#     there the policy saves only the product with v (about half the attention forward).
# Inside the Ulysses shard_map the policy applies too (jax's shard_map partial evaluation passes it in).
save_attention = jax.checkpoint_policies.save_from_both_policies(
    _cudnn_attention_saveable, jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT)
)

REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation (inference)
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_attention": save_attention,  # "full", but the attention outputs are kept (see above)
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
        variable_axes={"params": 0, LORA: 0},  # LoRA adapters (nn.linear), when given, are stacked like the params
        split_rngs={"params": True, "dropout": True},  # the adapters' dropout differs per layer
        in_axes=(nn.broadcast,) * num_broadcast,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
