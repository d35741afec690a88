"""Single-file checkpoints (no config.json): which model a file holds, its config, and its key map."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from conversion import flux as flux_map
from conversion.rules import Rule
from conversion.safetensors_io import TensorSource

RulesFor = Callable[[Any, dict], list[Rule]]


def identify(source: TensorSource, where: str) -> tuple[dict[str, Any], RulesFor]:
    """(diffusers-style config dict, rules(model config, shapes)) for the checkpoint in `source`."""
    keys = list(source)
    if flux_map.is_bfl(keys):
        prefix = flux_map._BFL_PREFIX if keys[0].startswith(flux_map._BFL_PREFIX) else ""
        cfg = flux_map.config_from_bfl({k: source.shape(k) for k in keys})
        return cfg, lambda model_cfg, shapes: flux_map.bfl_rules(model_cfg, shapes, prefix)
    raise ValueError(
        f"{where}: not a recognised single-file checkpoint (supported: BFL FLUX.1); first keys: {sorted(keys)[:5]}"
    )
