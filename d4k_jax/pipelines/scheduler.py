"""A pipeline's scheduler/scheduler_config.json -> the flow.SchedulerConfig it asks for, or one error.

diffusers builds a FlowMatchEulerDiscreteScheduler from that file, with the class defaults for the keys it
leaves out (shift 1.0, no dynamic shifting, ...). d4k_jax implements the settings in SchedulerConfig; any
other setting at a value other than its default would give a different schedule, so it is refused by name
rather than ignored. A pipeline without a scheduler/ folder keeps the schedule of its base model (the
caller's `default`: FLUX.1-dev's for Flux, SD3-medium's for SD3). (StableDiffusion3Pipeline's fallback
max_shift of 1.16 never applies: a loaded scheduler's config always holds the class default, 1.15.)
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from pathlib import Path
from typing import Any

from d4k_jax.diffusion.flow import SchedulerConfig

CLASS = "FlowMatchEulerDiscreteScheduler"
# The class's other settings, at their defaults; a value other than these is not implemented.
NOT_IMPLEMENTED: dict[str, Any] = {
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}
_INTS = ("num_train_timesteps", "base_image_seq_len", "max_image_seq_len")
_FLOATS = ("shift", "base_shift", "max_shift")


def load_scheduler(pipeline: Path, default: SchedulerConfig) -> SchedulerConfig:
    """The schedule settings of the pipeline folder `pipeline` (diffusers or converted: conversion copies
    scheduler/ as it is); `default` when it has no scheduler/ folder."""
    folder = pipeline / "scheduler"
    if not folder.is_dir():
        return default
    file = folder / "scheduler_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no scheduler_config.json (expected the diffusers scheduler config)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object of scheduler settings, got {type(config).__name__}")
    return scheduler_from_config(config, file, _indexed_class(pipeline))


def scheduler_from_config(config: dict, where: Path | str, indexed_class: str | None = None) -> SchedulerConfig:
    """Validates a scheduler config dict (`where` names it in the error) and keeps what SchedulerConfig holds."""
    problems = []
    for name, found in (("_class_name", config.get("_class_name", CLASS)), ("model_index.json", indexed_class)):
        if found is not None and found != CLASS:
            problems.append(f"{name} {found!r} (only {CLASS} is implemented)")
    fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
    for key, value in config.items():
        if key.startswith("_") or key in fields:
            continue
        if key in NOT_IMPLEMENTED:
            if _differs(value, NOT_IMPLEMENTED[key]):
                problems.append(f"{key}={value!r} (not implemented; the default is {NOT_IMPLEMENTED[key]!r})")
        elif value not in (None, False):  # diffusers keeps unknown keys in the config, where pipelines may read them
            problems.append(f"{key}={value!r} (not a {CLASS} setting d4k_jax knows)")
    values = {k: config[k] for k in fields if k in config}
    dynamic = values.get("use_dynamic_shifting", False)
    if not isinstance(dynamic, bool):
        problems.append(f"use_dynamic_shifting={dynamic!r} (expected true or false)")
    for key in _INTS:
        if key in values and (not _is_int(values[key]) or values[key] < 1):
            problems.append(f"{key}={values[key]!r} (expected an integer >= 1)")
    for key in _FLOATS:
        optional = key != "shift" and dynamic is not True  # base/max_shift may be null: only a dynamic shift uses them
        if key in values and not _is_number(values[key]) and not (optional and values[key] is None):
            problems.append(f"{key}={values[key]!r} (expected a number)")
    if "shift" in values and _is_number(values["shift"]) and values["shift"] <= 0:
        problems.append(f"shift={values['shift']!r} (expected a number > 0)")
    if dynamic is True and values.get("base_image_seq_len", 256) == values.get("max_image_seq_len", 4096):
        problems.append("base_image_seq_len == max_image_seq_len (a dynamic shift needs two different lengths)")
    if problems:
        raise ValueError(f"{where}: unsupported scheduler settings: " + "; ".join(problems))
    values = {k: v for k, v in values.items() if v is not None}  # base/max_shift may be null without dynamic shift
    return SchedulerConfig(**{k: float(v) if k in _FLOATS else v for k, v in values.items()})


def _indexed_class(pipeline: Path) -> str | None:
    """The scheduler class model_index.json names (diffusers builds that class from the config)."""
    try:
        entry = json.loads((pipeline / "model_index.json").read_text()).get("scheduler")
    except (OSError, ValueError, AttributeError):
        return None
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None


def _differs(value: Any, default: Any) -> bool:
    if default is None or isinstance(default, bool):  # diffusers tests these settings' truth value
        return bool(value) != bool(default)
    return value != default


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)
