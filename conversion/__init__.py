"""PyTorch / safetensors checkpoints <-> d4k_jax parameters; the only code that knows torch key names."""

from conversion.export import export_component
from conversion.load import load_component, load_config
from conversion.rules import ConversionError
from conversion.safetensors_io import SafetensorsError

__all__ = ["ConversionError", "SafetensorsError", "export_component", "load_component", "load_config"]
