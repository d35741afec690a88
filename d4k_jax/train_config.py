"""What a training config may be, checked before anything loads, and what a resumed run may change.

`validate(c, workdir, num_devices)` reads only JSON (the pipeline's vae/ and transformer/ config.json)
and the file system: no weights are read and no dataset is built, so a bad eval size, batch split or
mesh fails in seconds rather than after hours of training. One ValueError (one line) lists every
problem, each with the bad value and what was expected.

`check_resume(new, workdir, num_devices)` compares a run's config with the one its checkpoints were
trained with (WORKDIR/config.json, the last accepted config; else the checkpoints' metadata) and refuses
the changes that would mix two recipes in one run (RESUMABLE lists the fields that may change, and why),
unless `train.allow_config_change` is set; the accepted changes are logged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pywt
from absl import logging

from d4k_jax import lora
from d4k_jax import train_step as ts
from d4k_jax.data import aesthetic4k
from d4k_jax.nn.stack import REMAT_POLICIES
from d4k_jax.pipelines import base, pipeline_class
from d4k_jax.sharding import MESH_AXES, filled_sizes, resolve_mesh

CHOICES = {  # field -> the values the training code implements
    "model": ("flux", "sd3"),
    "loss.loss": ("wlf", "flow"),
    "loss.timesteps": ("reference", "shifted_uniform"),
    "train.schedule": ("constant", "cosine"),
    "train.nan_policy": ("stop", "skip"),
}

# Fields a resumed run may change (a prefix covers the fields under it): they change how the same training
# is computed, laid out, logged or evaluated, not what is trained. Any other change is refused.
RESUMABLE = {
    "train.steps": "extends the run; refused when it moves the lr of steps already trained (a cosine horizon)",
    "train.mesh": "the layout of the same step; refused when the global batch (batch_size x data x fsdp) changes",
    "train.mesh_dcn": "the layout of the same step across hosts (see train.mesh)",
    "train.rules": "the layout of the same step",
    "train.microbatches": "gradient accumulation: the same gradient in fewer images per pass",
    "train.encode_passes": "the same VAE encode in fewer images per pass",
    "train.remat": "recomputation in the backward pass: the same gradient",
    "train.nan_policy": "what happens at a non-finite step (stop, or skip it to get past one)",
    "train.log_every": "logging cadence",
    "train.checkpoint_every": "checkpoint cadence",
    "train.keep": "how many checkpoints are kept",
    "train.peak_flops": "the MFU denominator",
    "train.export": "whether WORKDIR/pipeline is written at the end",
    "train.allow_config_change": "this override",
    "eval": "evaluation during training: prompts, sizes, cadence, metrics",
    "sample": "the settings of d4k_jax.sample (eval reads only negative_prompt)",
    "mesh": "the sampling mesh",
    "num_devices": "sampling's device count",
    "shard_params": "sampling's parameter layout",
    "fused_qkv": "q/k/v computed as one matmul from the same weights: the same step",
    "distributed": "multi-process start-up",
    "compilation_cache": "where compiled programs are kept",
    "lora": "LoRA files merged by d4k_jax.sample (training refuses a set value)",
}
# Not in RESUMABLE, deliberately: data.worker_count (grain's stream, and its saved state, depend on it),
# data.folder / data_dir (what is trained on), dtype / param_dtype, seed (each step's noise and the data
# order), pipeline (the weights the run started from; a moved folder needs the override).
ABSENT = "<absent>"


def validate(c: ml_collections.ConfigDict, workdir: str | Path, num_devices: int, num_granules: int = 1) -> None:
    """Raise one ValueError listing everything wrong with the training config `c` (see the module doc);
    `num_granules`: the hosts (GPU) or slices (TPU) the devices are in (sharding.granules)."""
    mesh = mesh_problems(c.train.mesh, num_devices, dcn=c.train.get("mesh_dcn"), num_granules=num_granules)
    problems = [*_choice_problems(c), *_number_problems(c), *mesh]
    problems += _pipeline_problems(c) + _data_problems(c, Path(workdir))
    if c.get("lora"):  # sampling's option; training on a merged LoRA is not implemented
        problems.append(
            f"lora={c.lora!r}: LoRA files are merged by d4k_jax.sample only; training does not read them (to train "
            "LoRA adapters: --config.train.lora.rank=R)"
        )
    problems += lora.train_problems(c.train.get("lora"), c.pipeline and Path(c.pipeline) / "transformer")
    if not mesh:
        problems += _sequence_problems(c, mesh_sizes(c.train.mesh, num_devices, c.train.get("mesh_dcn"), num_granules))
    if problems:  # one line (the CLI's `error:` line), the problems in the order of the checks
        listed = "; ".join(problems)
        raise ValueError(f"the training config has {len(problems)} problem(s), nothing was loaded: {listed}")


def _choice_problems(c) -> list[str]:
    problems = []
    for field, allowed in {**CHOICES, "train.remat": tuple(REMAT_POLICIES)}.items():
        value = _get(c, field)
        if value not in allowed:
            problems.append(f"{field}={value!r}: expected one of {', '.join(map(repr, allowed))}")
    for field in ("dtype", "param_dtype"):
        try:
            ok = jnp.issubdtype(jnp.dtype(c[field]), jnp.floating)
        except TypeError:
            ok = False
        if not ok:
            problems.append(f"{field}={c[field]!r}: expected a float dtype name (bfloat16, float16, float32)")
    if c.loss.wavelet not in pywt.wavelist(kind="discrete"):
        problems.append(f"loss.wavelet={c.loss.wavelet!r}: expected a discrete wavelet name of pywt (e.g. 'haar')")
    weights, level = c.loss.subband_weights, c.loss.level
    if weights is not None and isinstance(level, int) and level >= 1 and len(weights) != 3 * level + 1:
        problems.append(
            f"loss.subband_weights={tuple(weights)}: expected {3 * level + 1} values for level {level} "
            "(LL, then LH, HL, HH per level)"
        )
    return problems


def _number_problems(c) -> list[str]:
    t, problems = c.train, []
    least = {"train.steps": 1, "train.batch_size": 1, "train.microbatches": 1, "train.encode_passes": 1}
    least |= {"train.log_every": 1, "train.checkpoint_every": 1, "train.keep": 1, "train.warmup_steps": 0}
    least |= {"eval.every": 0, "eval.steps": 1, "loss.level": 1, "data.worker_count": 0, "data.demo_images": 0}
    for field, low in least.items():
        value = _get(c, field)
        if not isinstance(value, int) or value < low:
            problems.append(f"{field}={value!r}: expected an integer >= {low}")
    for split in ("microbatches", "encode_passes"):
        n = t[split]
        if isinstance(n, int) and n >= 1 and isinstance(t.batch_size, int) and t.batch_size % n:
            problems.append(
                f"train.batch_size={t.batch_size} (per device): expected a multiple of train.{split}={n}, "
                f"so that each pass holds the same number of images on every device"
            )
    if not c.eval.prompts:
        problems.append("eval.prompts is empty: expected at least one prompt (the final sample grid)")
    return problems


def mesh_sizes(
    mesh: Mapping[str, Any], num_devices: int, dcn: Mapping[str, int] | None = None, num_granules: int = 1
) -> dict[str, int]:
    """The mesh's four axis sizes in all (within x across granules, see sharding.make_mesh), each -1 resolved
    to the rest (of the granules, then of the devices per granule); not checked (see mesh_problems)."""
    across = filled_sizes(dcn or {}, num_granules)
    within = filled_sizes(mesh, num_devices // int(np.prod(list(across.values()))))
    return {a: within[a] * across[a] for a in MESH_AXES}


def mesh_problems(
    mesh: Mapping[str, Any],
    num_devices: int,
    field: str = "train.mesh",
    dcn: Mapping[str, Any] | None = None,
    num_granules: int = 1,
) -> list[str]:
    """What is wrong with a mesh (and its dcn part, `field`_dcn) on `num_devices` in `num_granules` granules."""
    problems = []
    for name, sizes, rest in ((field, dict(mesh), "devices"), (f"{field}_dcn", dict(dcn or {}), "granules")):
        unknown = sorted(set(sizes) - set(MESH_AXES))
        bad = {a: s for a, s in sizes.items() if not isinstance(s, int) or (s < 1 and s != -1)}
        if unknown:
            problems.append(f"{name} has unknown axes {unknown}: expected axes among {list(MESH_AXES)}")
        elif bad or list(sizes.values()).count(-1) > 1:
            problems.append(f"{name}={sizes}: expected positive sizes, with at most one -1 (the rest of the {rest})")
    if problems:
        return problems
    try:
        resolve_mesh(dict(mesh), dict(dcn or {}), num_devices, num_granules)
    except ValueError as e:
        where = f"{num_devices} device(s)" + (f" in {num_granules} hosts / slices" if num_granules > 1 else "")
        given = f"{field}={dict(mesh)}" + (f" with {field}_dcn={dict(dcn)}" if dcn else "")
        return [f"{given} does not fit {where}: {e} (one size may be -1: the rest)"]
    return []


def _pipeline_problems(c) -> list[str]:
    """The pipeline folder, and the sizes against its factor and (SD3) position table."""
    if not c.pipeline:
        return ["pipeline is not set: expected --config.pipeline=a diffusers pipeline folder or a converted one"]
    if c.model not in CHOICES["model"]:
        return []  # reported above; the geometry depends on the model
    if c.vae_stride not in (0, None, 1, 2):
        return [f"vae_stride={c.vae_stride!r}: expected 1 (F8 VAE), 2 (F16 VAE) or 0 (as vae/config.json says)"]
    try:
        factor, largest = pipeline_class(c.model).geometry(
            c.pipeline, c.vae_stride or None
        )  # config.json only: no weights
    except (ValueError, OSError) as e:  # no such folder, no config.json, another model's transformer
        return [f"pipeline={c.pipeline}: {e}"]
    problems = []
    for field in ("data.resolution", "eval.height", "eval.width"):
        size = _get(c, field)
        if not isinstance(size, int) or size <= 0 or size % factor:
            problems.append(
                f"{field}={size!r}: expected a positive multiple of {factor} (this pipeline's VAE downsampling x "
                "the transformer's 2x2 patches)"
            )
        elif largest is not None and size > largest:
            problems.append(
                f"{field}={size}: beyond the SD3 transformer's position table, expected at most {largest} "
                "(pos_embed_max_size x patch size x the VAE's downsampling)"
            )
    return problems


def _sequence_problems(c, sizes: Mapping[str, int]) -> list[str]:
    """What keeps the mesh's `sequence` degree from splitting each training and eval image (nn.ulysses)."""
    if not c.pipeline or c.model not in CHOICES["model"] or c.vae_stride not in (0, None, 1, 2):
        return []
    images = {field: _get(c, field) for field in ("data.resolution", "eval.height")}
    found = base.sequence_problems(pipeline_class(c.model), c.pipeline, c.vae_stride or None, dict(sizes), images)
    return [f"train.mesh: {p}" for p in found]


def _data_problems(c, workdir: Path) -> list[str]:
    d = c.data
    data_dir = Path(d.data_dir or workdir / "data")
    if (aesthetic4k.dataset_dir(data_dir, d.split) / "dataset_info.json").is_file() or d.demo_images:
        return []
    if not d.folder:
        return [
            f"data.folder is not set and {data_dir} holds no built {d.split!r} dataset: expected "
            "--config.data.folder=an Aesthetic-4K-style root (SPLIT/metadata.jsonl), or --config.data.data_dir="
            "a folder where one was built"
        ]
    meta = Path(d.folder) / d.split / "metadata.jsonl"
    if not meta.is_file():
        return [f"data.folder={d.folder}: no {meta} (expected an Aesthetic-4K-style root: SPLIT/metadata.jsonl)"]
    return []


def _get(c, field: str) -> Any:
    for name in field.split("."):
        c = c[name]
    return c


# ------------------------------------------------------------------------------------------------------------
# Resume


def as_stored(c: ml_collections.ConfigDict, num_devices: int, num_granules: int = 1) -> dict:
    """The run's config as WORKDIR/config.json and the checkpoints keep it: JSON, with train.mesh resolved
    to the sizes it ran with (so that a rerun on another device count shows as a change of global batch)
    and the folders made absolute (so that the same folder named from another directory is no change)."""
    stored = json.loads(c.to_json_best_effort())
    ici, dcn = resolve_mesh(dict(c.train.mesh), dict(c.train.get("mesh_dcn") or {}), num_devices, num_granules)
    stored["train"]["mesh"], stored["train"]["mesh_dcn"] = ici, dcn
    for node, key in ((stored, "pipeline"), (stored["data"], "folder"), (stored["data"], "data_dir")):
        if node.get(key):
            node[key] = os.path.abspath(node[key])
    return stored


def changes(old: Mapping, new: Mapping, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(field, old, new) for every leaf that differs between two nested dicts (ABSENT where one lacks it)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, field = old.get(key, ABSENT), new.get(key, ABSENT), prefix + key
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += changes(a, b, field + ".")
        elif a != b:
            out.append((field, a, b))
    return out


def resumable(field: str) -> bool:
    return any(field == p or field.startswith(p + ".") for p in RESUMABLE)


def refused_changes(old: Mapping, new: Mapping, step: int, num_devices: int) -> list[tuple[str, Any, Any]]:
    """The changes from `old` to `new` that a run resumed at `step` may not make (see RESUMABLE)."""
    refused = [ch for ch in changes(old, new) if not resumable(ch[0])]
    before, after = global_batch(old, num_devices), global_batch(new, num_devices)
    if before != after:
        refused.append(("global batch (train.batch_size x mesh data x fsdp)", before, after))
    t_old, t_new = old["train"], new["train"]
    if t_old.get("steps") != t_new.get("steps") and step > 0:
        counts = np.arange(step)
        moved = lr_schedule(t_old)(counts), lr_schedule({**t_old, "steps": t_new.get("steps")})(counts)
        if not np.array_equal(*moved):
            refused.append(("train.steps (moves the lr of the steps already trained)", t_old["steps"], t_new["steps"]))
    return refused


def global_batch(config: Mapping, num_devices: int) -> int:
    t = config["train"]  # a stored config's meshes are resolved; older ones have no mesh_dcn
    sizes = mesh_sizes(
        t["mesh"], num_devices, t.get("mesh_dcn"), int(np.prod(list((t.get("mesh_dcn") or {}).values())))
    )
    return config["train"]["batch_size"] * sizes["data"] * sizes["fsdp"]


def lr_schedule(t: Mapping) -> optax.Schedule:
    """Linear warmup then constant (the reference: lr 1e-6, no warmup) or cosine to zero at `steps`."""
    if t["schedule"] == "constant":
        decay = optax.constant_schedule(t["lr"])
    elif t["schedule"] == "cosine":
        decay = optax.cosine_decay_schedule(t["lr"], max(t["steps"] - t["warmup_steps"], 1))
    else:
        raise ValueError(f"train.schedule={t['schedule']!r}: expected one of {CHOICES['train.schedule']}")
    if not t["warmup_steps"]:
        return decay
    warmup = optax.linear_schedule(0.0, t["lr"], t["warmup_steps"])
    return optax.join_schedules([warmup, decay], [t["warmup_steps"]])


def stored_config(workdir: str | Path) -> tuple[dict | None, int | None]:
    """(the config the checkpoints in WORKDIR/checkpoints were trained with, their latest step), or
    (None, None) when there is no checkpoint. WORKDIR/config.json is the last accepted config; the
    checkpoints' metadata (the first run's) stands in when config.json is missing or unreadable."""
    folder = Path(workdir) / "checkpoints"
    if not folder.is_dir():
        return None, None
    with ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(create=False)) as manager:
        step = manager.latest_step()
        if step is None:
            return None, None
        try:
            return json.loads((Path(workdir) / "config.json").read_text()), step
        except (OSError, ValueError):
            return dict(manager.metadata().custom_metadata or {}) or None, step


def check_resume(new: dict, workdir: str | Path, num_devices: int) -> list[tuple[str, Any, Any]]:
    """Refuse (ValueError) to resume the run in `workdir` with changes RESUMABLE does not allow, unless
    new["train"]["allow_config_change"]; returns every change made (logged), [] for a fresh run."""
    old, step = stored_config(workdir)
    if old is None:
        return []
    refused = refused_changes(old, new, step, num_devices)
    listed = _listed(refused)
    if refused and not new["train"].get("allow_config_change"):
        raise ValueError(
            f"{workdir} holds a run at step {step} trained with another config; resuming it with these changes "
            f"would mix two recipes in one run: {listed}. Expected the same values (rerun with the stored "
            f"config, {Path(workdir) / 'config.json'}), another --workdir, or "
            "--config.train.allow_config_change=True to resume with them anyway"
        )
    if refused:
        logging.warning("resuming step %d with changed fields (train.allow_config_change): %s", step, listed)
    made = changes(old, new)
    if made:
        logging.info("resuming step %d; changed: %s", step, _listed(made))
    return made


def _listed(fields: list[tuple[str, Any, Any]]) -> str:
    show = lambda v: v if v == ABSENT else json.dumps(v)
    return "; ".join(f"{f}: {show(a)} -> {show(b)}" for f, a, b in fields)


def loss_config(c: ml_collections.ConfigDict) -> ts.LossConfig:
    """The `loss` fields (and the model kind) as the train step takes them."""
    weights = c.loss.subband_weights
    return ts.LossConfig(
        model=c.model,
        loss=c.loss.loss,
        timesteps=c.loss.timesteps,
        shift=c.loss.shift,
        guidance=c.loss.guidance,
        wavelet=c.loss.wavelet,
        level=c.loss.level,
        subband_weights=None if weights is None else tuple(weights),
        latent_shift=c.loss.latent_shift,
    )
