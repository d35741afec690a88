"""Layers shared by every model: attention dispatch, convolutions, norms, dense layers."""

from d4k_jax.nn.attention import dot_product_attention
from d4k_jax.nn.conv import Conv2d
from d4k_jax.nn.linear import Dense
from d4k_jax.nn.norms import GroupNorm, LayerNorm, RMSNorm
from d4k_jax.nn.stack import stack

__all__ = ["Conv2d", "Dense", "GroupNorm", "LayerNorm", "RMSNorm", "dot_product_attention", "stack"]
