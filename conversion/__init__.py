"""Offline tooling around d4k_jax's loader (`d4k_jax.io`): the convert CLI, the export to diffusers /
transformers folders, and readers of torch-pickled weights. It imports d4k_jax, never the reverse."""

from conversion.export import export_component
from conversion.load import load_component
from d4k_jax.io.load import load_config
from d4k_jax.io.safetensors_io import SafetensorsError
from d4k_jax.models.keymap import ConversionError

__all__ = ["ConversionError", "SafetensorsError", "export_component", "load_component", "load_config"]
