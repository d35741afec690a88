"""What a finished training run leaves in its workdir: WORKDIR/pipeline, the trained transformer exported
as a converted pipeline folder that the pipelines and `python -m d4k_jax.sample` load (`export_pipeline`;
pipeline/export.json records its step), and the loss-curve and sample-grid PNGs (`finish`).

(`conversion/export.py` is the other direction's tool: d4k_jax params -> diffusers safetensors.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from flax import traverse_util

from d4k_jax import checkpoint, files, lora, plots
from d4k_jax.io.lora_export import save_lora
from d4k_jax.sharding import sync_processes

EXPORT_RECORD = "export.json"  # in the exported pipeline folder: {"step": the train step of its weights}
LORA_FILE = "lora.safetensors"  # a LoRA run's adapters, in WORKDIR


def export_lora(dst: Path, module: nn.Module, adapters: Any, base: Any, lora_cfg: Any, step: int) -> Path:
    """A LoRA run's trained `adapters` ({module path: {down, up}}) on the frozen `base` (train_step.Frozen: its
    scales mark the adapted layers of each stack) as one diffusers-format LoRA file at `dst`, which diffusers'
    `load_lora_weights` and `d4k_jax.sample --config.lora=DST` read; every process calls it (sharded adapters are
    gathered), process 0 writes. The file's metadata records the train step."""
    cfg = lora.from_config(lora_cfg)
    shapes = {p: tuple(x.shape) for p, x in traverse_util.flatten_dict(base.params).items()}
    flat = traverse_util.flatten_dict(adapters) | traverse_util.flatten_dict(base.scales)
    alpha = cfg.rank if cfg.alpha is None else cfg.alpha
    return save_lora(dst, module, shapes, traverse_util.unflatten_dict(flat), alpha=alpha, metadata={"step": str(step)})


def finish(
    c: ml_collections.ConfigDict, workdir: Path, source: Path, module: nn.Module, params: Any | None, step: int
) -> None:
    """The loss-curve and sample-grid PNGs, and WORKDIR/pipeline with the trained transformer of `step` (none for
    `params` None: a LoRA run, whose adapters are in its checkpoints)."""
    if c.train.export and params is not None:
        export_pipeline(source, workdir / "pipeline", module, params, step)
    if jax.process_index() != 0:
        return
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and not r.get("skipped")]
    if rows:
        smooth = max(1, min(20, len(rows) // 5))
        plots.loss_curve([r["step"] for r in rows], [r["loss"] for r in rows], workdir / "loss_curve.png", smooth)
    grids = sorted((workdir / "samples").glob("step_*.png"))
    if grids:
        shutil.copy(grids[-1], workdir / "sample_grid.png")


def export_pipeline(source: Path, dst: Path, module: nn.Module, params: Any, step: int) -> Path:
    """A converted pipeline folder: the trained transformer (config.json + orbax params/) and links to
    the source's other components, which training did not change.

    An export of the same step (EXPORT_RECORD) is kept; any other (a run extended from 20k to 30k steps,
    an export from before the record) is replaced: the new one is written beside as DST.partial, the old
    one moves to DST.old, the new one to DST, then DST.old is deleted. A crash between the two renames
    leaves DST.old, which the next export puts back first: there is always an export to go back to."""
    old, tmp = dst.with_name(dst.name + ".old"), dst.with_name(dst.name + ".partial")
    if jax.process_index() == 0 and old.is_dir():
        if dst.exists():
            shutil.rmtree(old)
        else:
            old.rename(dst)
    sync_processes("export_restored")
    if exported_step(dst) == step:
        return dst
    if jax.process_index() == 0:
        files.remove_tree(tmp)  # a failed export's, which a full disk can leave
        tmp.mkdir(parents=True)
        shutil.copy(source / "model_index.json", tmp / "model_index.json")
        for item in source.iterdir():
            if item.is_dir() and item.name != "transformer":
                (tmp / item.name).symlink_to(item.resolve(), target_is_directory=True)
        (tmp / "transformer").mkdir()
        cfg = json.loads((source / "transformer" / "config.json").read_text())
        (tmp / "transformer" / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    sync_processes("export")
    checkpoint.save_params(tmp / "transformer" / "params", params)  # every process writes its shards
    sync_processes("export_done")
    if jax.process_index() == 0:
        (tmp / EXPORT_RECORD).write_text(json.dumps({"step": step}) + "\n")
        if dst.exists():
            dst.rename(old)
        tmp.rename(dst)
        files.remove_tree(old)
        logging.info("exported the trained pipeline of step %d to %s", step, dst)
    sync_processes("export_swapped")
    return dst


def exported_step(folder: Path) -> int | None:
    """The train step whose weights the exported pipeline `folder` holds (None: no export, or an
    export from before the step was recorded)."""
    try:
        return int(json.loads((folder / EXPORT_RECORD).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
