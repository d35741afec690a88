"""Text -> image pipelines behind one interface, `base.Pipeline`: `FluxPipeline` (FLUX.1) and `SD3Pipeline`
(SD3 / SD3.5), each `.from_pretrained(path)` on a diffusers pipeline folder or its converted directory, then
called with prompts. `pipeline_class(model)` gives the class of a config's model kind (the keys of
`PIPELINES`), so that the CLIs never branch on the model. Modules: base (the interface, `Component`,
loading, noise, decode), conditioning (text states from the encoders), tokenizer, scheduler
(scheduler_config.json), flux, sd3.

The two classes are imported on first use (PEP 562), so that `from d4k_jax.pipelines import base` does not
load both pipelines and flux.py / sd3.py can import this package's modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from d4k_jax.pipelines.base import Pipeline
    from d4k_jax.pipelines.flux import FluxPipeline
    from d4k_jax.pipelines.sd3 import SD3Pipeline

__all__ = ["FluxPipeline", "SD3Pipeline"]
_HOME = {"FluxPipeline": "d4k_jax.pipelines.flux", "SD3Pipeline": "d4k_jax.pipelines.sd3"}
PIPELINES = {"flux": "FluxPipeline", "sd3": "SD3Pipeline"}  # model kind (config.model) -> its class's name


def pipeline_class(model: str) -> type[Pipeline]:
    """The pipeline class of a model kind ("flux", "sd3"), or an error naming the kinds there are."""
    if model not in PIPELINES:
        raise ValueError(f"model kind {model!r} has no pipeline: expected one of {sorted(PIPELINES)}")
    return __getattr__(PIPELINES[model])


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
