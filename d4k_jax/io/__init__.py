"""Runtime loading: component folders (diffusers / transformers safetensors, converted orbax `params/`) and
single files -> (module, params), strictly, through each model's key map (`models/*_keys.py`)."""

from d4k_jax.io.components import class_name, kind_for, kind_of_module
from d4k_jax.io.load import load_component, load_config
from d4k_jax.io.lora import merge_lora
from d4k_jax.io.safetensors_io import SafetensorsError
from d4k_jax.models.keymap import ConversionError

__all__ = [
    "ConversionError",
    "SafetensorsError",
    "class_name",
    "kind_for",
    "kind_of_module",
    "load_component",
    "load_config",
    "merge_lora",
]
