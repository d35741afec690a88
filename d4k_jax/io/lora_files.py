"""LoRA safetensors files as written by diffusers / peft and by kohya's sd-scripts (and ComfyUI): each LoRA module's
down (A [r, in]) and up (B [out, r]) tensors and its weight scale alpha / r, named as in the file.

Key layouts read (one file may mix them; every key must be understood, or one error lists those that are not):
- diffusers / peft: `transformer.<module>.lora_A.weight` / `.lora_B.weight` (peft's own `save_lora_adapter` writes
  them without `transformer.`), the older `.lora.down.weight` / `.lora.up.weight`, and `.lora_down` / `.lora_up`
  under `transformer.` (a mix some trainers write); `<module>` is a diffusers module name (`transformer_blocks.0.
  attn.to_q`).
- kohya / sd-scripts: `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`, `<module>` the BFL name
  with `_` for `.` (`double_blocks_0_img_attn_qkv`, fused q/k/v); `lora_transformer_<module>` with a diffusers name
  the same way; ComfyUI's `diffusion_model.<BFL name>.lora_down.weight`.

alpha, per module: its `<module>.alpha` tensor; else diffusers' `lora_adapter_metadata` (the peft LoraConfig as JSON
in the safetensors metadata: `lora_alpha`, `alpha_pattern`, `use_rslora`; keys under `transformer.` when a pipeline
saved it); else alpha = r (peft's and kohya's default: scale 1). The weight delta is (alpha / r) B @ A, or
(alpha / sqrt(r)) B @ A with use_rslora. Every kohya module is scaled by its alpha, as sd-scripts trains it; diffusers
0.42.1 drops the alpha of kohya's final_layer modules (a TODO in its converter), so there the two differ.

Refused, by name: text-encoder LoRAs (`text_encoder.`, `lora_te*_`; only the transformer's are read), DoRA
(`dora_scale`, `lora_magnitude_vector`, use_dora), LoRA biases (`lora_B.bias`), LoKr / LoHa and full-weight diffs
(`diff`, `diff_b`), XLabs' `processor` layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from d4k_jax.io.safetensors_io import TensorSource
from d4k_jax.models.keymap import ConversionError

# key suffix -> which tensor of the module it is
SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
}
# module-name prefixes, longest first; what is left is a diffusers or BFL name, with dots or (kohya) underscores
PREFIXES = ("model.diffusion_model.", "base_model.model.", "diffusion_model.", "lora_transformer_", "transformer.")
KOHYA_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("text_encoder", "text_encoders.", "lora_te")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's lora_alpha default, which diffusers gets when the metadata has no lora_alpha


@dataclasses.dataclass
class Module:
    """One LoRA module of a file: its tensors' keys (None where absent) and its alpha (None: from the metadata)."""

    name: str  # as in the file, less the prefix and suffix
    kohya: bool  # a `lora_unet_` name (underscores for dots)
    down: str | None = None
    up: str | None = None
    alpha_key: str | None = None


@dataclasses.dataclass
class LoraFile:
    path: Path
    source: TensorSource
    modules: dict[str, Module]
    config: dict[str, Any]  # the peft LoraConfig from the metadata ({} without one)

    def rank(self, m: Module) -> int:
        return int(self.source.shape(m.down)[0])

    def scale(self, m: Module) -> float:
        """alpha / r of module `m` (alpha / sqrt(r) with use_rslora)."""
        r = self.rank(m)
        if m.alpha_key is not None:
            alpha = float(np.asarray(self.source[m.alpha_key], np.float64).reshape(()))
        elif self.config:
            alpha = _pattern(self.config.get("alpha_pattern") or {}, m.name, self.config.get("lora_alpha"))
            alpha = PEFT_DEFAULT_ALPHA if alpha is None else float(alpha)
        else:
            alpha = r
        return alpha / (math.sqrt(r) if self.config.get("use_rslora") else r)


def read_lora_file(path: str | os.PathLike) -> LoraFile:
    """The LoRA modules of a safetensors file (headers and metadata only; nothing else is read). Every key must be
    one of a module's tensors, each module must have both down and up (rank-2, the same rank) and a scalar alpha
    if any, or one ConversionError lists every key that is not."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise FileNotFoundError(f"LoRA file {path}: expected an existing .safetensors file")
    source = TensorSource([path])
    config = _metadata_config(path)
    modules: dict[str, Module] = {}
    unexpected, missing, misshaped = [], [], []
    for key in source:
        why = _refused(key)
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if why is None and suffix is None:
            why = "not a LoRA down / up / alpha tensor"
        if why:
            unexpected.append(f"{key} ({why})")
            continue
        raw = key[: -len(suffix)]
        kohya = raw.startswith(KOHYA_PREFIX)
        name = raw[len(KOHYA_PREFIX) :] if kohya else next((raw[len(p) :] for p in PREFIXES if raw.startswith(p)), raw)
        m = modules.setdefault(raw, Module(name, kohya))
        setattr(m, "alpha_key" if SUFFIXES[suffix] == "alpha" else SUFFIXES[suffix], key)
    for raw, m in modules.items():
        if m.down is None or m.up is None:
            have = [k for k in (m.down, m.up, m.alpha_key) if k]
            missing.append(f"{raw}: {'up' if m.down else 'down'} (lora_B / lora_up) tensor, beside {have}")
            continue
        down, up = source.shape(m.down), source.shape(m.up)
        if len(down) != 2 or len(up) != 2 or down[0] != up[1]:
            misshaped.append(f"{raw}: down {down}, up {up} (expected a Linear's [r, in] and [out, r])")
        if m.alpha_key is not None and int(np.prod(source.shape(m.alpha_key))) != 1:
            misshaped.append(f"{m.alpha_key}: {source.shape(m.alpha_key)} (expected one number)")
    if unexpected or missing or misshaped:
        raise ConversionError(f"LoRA file {path}", missing, unexpected, misshaped)
    return LoraFile(path, source, modules, config)


def _refused(key: str) -> str | None:
    if key.startswith(TEXT_ENCODER_PREFIXES):
        return "a text-encoder LoRA: only the transformer's are read"
    if key.endswith((".diff", ".diff_b")):
        return "a full-weight diff is not supported"
    for part, what in (
        ("dora_scale", "DoRA"),
        ("lora_magnitude_vector", "DoRA"),
        ("lora_B.bias", "a LoRA bias"),
        (".processor.", "the XLabs layout"),
        ("hada_", "LoHa"),
        ("lokr_", "LoKr"),
    ):
        if part in key:
            return f"{what} is not supported"
    return None


def _metadata_config(path: Path) -> dict[str, Any]:
    """The transformer's peft LoraConfig from diffusers' `lora_adapter_metadata` ({} without one)."""
    with safe_open(path, framework="numpy") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"LoRA file {path}: its {METADATA_KEY} metadata is not JSON ({e})") from None
    if any(k.startswith("transformer.") for k in config):  # a pipeline's save_lora_weights: one prefix per component
        config = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    if config.get("use_dora"):
        raise ValueError(f"LoRA file {path}: a DoRA adapter (use_dora in its metadata) is not supported")
    return config


def _pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """peft's `get_pattern_key`: the value of the first pattern that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
