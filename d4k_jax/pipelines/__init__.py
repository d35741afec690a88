"""Text -> image pipelines behind one interface, `base.Pipeline`: `FluxPipeline` (FLUX.1) and `SD3Pipeline`
(SD3 / SD3.5), each `.from_pretrained(path)` on a diffusers pipeline folder or its converted directory, then
called with prompts. `pipeline_class(model)` gives the class of a config's model kind (the keys of
`PIPELINES`), so that the CLIs never branch on the model. Modules: base (the interface, `Component`,
loading, noise, decode), conditioning (text states from the encoders), tokenizer, scheduler
(scheduler_config.json), flux, sd3.

"""

from __future__ import annotations

from d4k_jax.pipelines.base import Pipeline
from d4k_jax.pipelines.flux import FluxPipeline
from d4k_jax.pipelines.sd3 import SD3Pipeline

__all__ = ["FluxPipeline", "SD3Pipeline"]  # the public names; PIPELINES / pipeline_class for the CLIs
# config.model (the model kind) -> its pipeline class
PIPELINES: dict[str, type[Pipeline]] = {cls.model: cls for cls in (FluxPipeline, SD3Pipeline)}


def pipeline_class(model: str) -> type[Pipeline]:
    """The pipeline class of a model kind ("flux", "sd3"), or an error naming the kinds there are."""
    if model not in PIPELINES:
        raise ValueError(f"model kind {model!r} has no pipeline: expected one of {sorted(PIPELINES)}")
    return PIPELINES[model]
