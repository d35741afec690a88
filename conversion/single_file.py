"""Single-file checkpoints (no config.json): which model a file holds, its config, and its key map.

BFL FLUX.1 files hold the transformer alone; SAI SD3 files hold the transformer under
`model.diffusion_model.` and may also hold the text encoders and the VAE, which are left to their own
loaders: only the transformer's tensors are read (and all of them must be used).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from conversion import flux as flux_map
from conversion import sd3 as sd3_map
from conversion.rules import Rule

RulesFor = Callable[[Any, dict], list[Rule]]


class Prefixed(Mapping):
    """The tensors of `source` whose names start with `prefix` (lazy: nothing is read)."""

    def __init__(self, source: Mapping, prefix: str):
        self.source, self.keys_ = source, [k for k in source if k.startswith(prefix)]

    def __getitem__(self, key):
        if key not in self.keys_:
            raise KeyError(key)
        return self.source[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def identify(source, where: str) -> tuple[dict[str, Any], RulesFor, Mapping]:
    """(diffusers-style config dict, rules(model config, shapes), the tensors those rules read)."""
    keys = list(source)
    shapes = {k: source.shape(k) for k in keys}
    if flux_map.is_bfl(keys):
        prefix = flux_map._BFL_PREFIX if keys[0].startswith(flux_map._BFL_PREFIX) else ""
        cfg = flux_map.config_from_bfl(shapes)
        return cfg, lambda model_cfg, s: flux_map.bfl_rules(model_cfg, s, prefix), source
    if sd3_map.is_sai(keys):
        return sd3_map.config_from_sai(shapes), sd3_map.sai_rules, Prefixed(source, sd3_map.SAI_PREFIX)
    raise ValueError(
        f"{where}: not a recognised single-file checkpoint (supported: BFL FLUX.1, SAI SD3 transformer); "
        f"first keys: {sorted(keys)[:5]}"
    )
