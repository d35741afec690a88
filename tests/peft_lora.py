"""A peft LoRA on a tiny diffusers transformer and its weights (or gradients) in d4k_jax's adapter layout
(d4k_jax/lora.py: {module path: {"down": lora_A^T, "up": lora_B^T}}, the layers of a stack leading)."""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig

from d4k_jax import lora
from d4k_jax.io import lora as lora_io


def add_peft_lora(model, targets, rank=4, alpha=8, seed=0, std=0.2):
    """A peft adapter on `model` with random non-zero A and B (peft starts B at zero)."""
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def to_adapters(model, module, shapes, targets, grads=False) -> dict:
    """The peft adapter's A and B (or their .grad) of `model` as d4k_jax adapters of the `targets` it resolves to."""
    dotted, _ = lora_io.tables(module, shapes, bfl=False)
    where = {(slot.leaf.dst[0][:-1], slot.layer): name for name, slot in dotted.items() if len(slot.leaf.dst) == 1}
    tensors = dict(model.named_parameters())
    flat = {}
    for t in lora.resolve(module, shapes, targets):
        *lead, n_in, out = t.shape
        rank = None
        parts = {}
        for layer in t.layers if t.layers is not None else (None,):
            name = where[(t.path, layer)]
            a, b = (tensors[f"{name}.lora_{x}.default.weight"] for x in "AB")
            a, b = ((x.grad if grads else x).detach().double().numpy() for x in (a, b))
            parts[layer], rank = (a.T, b.T), a.shape[0]
        down, up = np.zeros((*lead, n_in, rank)), np.zeros((*lead, rank, out))
        for layer, (d, u) in parts.items():
            if layer is None:
                down, up = d, u
            else:
                down[layer], up[layer] = d, u
        flat[(*t.path, "down")], flat[(*t.path, "up")] = down, up
    from flax import traverse_util

    return traverse_util.unflatten_dict(flat)
