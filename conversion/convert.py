"""Convert checkpoints between diffusers / transformers folders and d4k_jax (orbax) folders.

  python -m conversion.convert --src=PIPELINE_OR_COMPONENT --dst=DIR             # -> d4k_jax, no torch needed
  python -m conversion.convert --src=DIR --dst=OUT --to=diffusers [--dtype=bfloat16]

A converted component folder holds config.json and the orbax checkpoint `params/`; `load_component`
reads it without torch. A pipeline folder (model_index.json) is converted component by component;
tokenizer and scheduler folders are copied as they are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
from absl import app, flags, logging

from conversion.components import KINDS, class_name
from conversion.export import STORAGE_DTYPES, export_component
from conversion.load import PARAMS_DIR, load_config, load_with_config
from d4k_jax import checkpoint, cli

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "diffusers/transformers pipeline or component folder, or a converted one")
flags.DEFINE_string("dst", None, "output folder (must not exist)")
flags.DEFINE_enum("to", "flax", ["flax", "diffusers"], "target format")
flags.DEFINE_enum("dtype", None, sorted(STORAGE_DTYPES), "storage dtype (default: float32 / as loaded)")
flags.DEFINE_multi_string("override", [], "config override key=JSON_VALUE, e.g. --override=stride=2")
flags.DEFINE_string("component", "transformer", "the model to take from a single file holding several (SAI SD3)")
flags.DEFINE_bool("skip_unsupported", False, "copy model components of unsupported classes instead of failing")


def convert_component(
    src: Path, dst: Path, to: str, dtype: str | None, overrides: dict, component: str = "transformer"
) -> None:
    param_dtype = jnp.dtype(STORAGE_DTYPES[dtype or "float32"])
    cfg, _, params = load_with_config(src, param_dtype=param_dtype, component=component, **overrides)
    if to == "diffusers":
        export_component(cfg, params, dst, dtype=dtype)
    else:
        dst.mkdir(parents=True)
        checkpoint.save_params(dst / PARAMS_DIR, params)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    logging.info("converted %s -> %s (%s)", src, dst, to)


def convert(
    src: Path,
    dst: Path,
    to: str = "flax",
    dtype: str | None = None,
    overrides: dict | None = None,
    skip_unsupported: bool = False,
    component: str = "transformer",
) -> None:
    overrides = overrides or {}
    if dst.exists():
        raise FileExistsError(f"--dst {dst} exists; choose a new folder")
    if not (src / "model_index.json").is_file():
        convert_component(src, dst, to, dtype, overrides, component)
        return
    supported = {n for k in KINDS for n in k.class_names}
    index = json.loads((src / "model_index.json").read_text())
    plan = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None or not (src / name).is_dir():
            continue
        is_model = (src / name / "config.json").is_file() and class_name(load_config(src / name))
        plan[name] = "convert" if is_model in supported else ("model" if is_model else "copy")
    unsupported = sorted(n for n, p in plan.items() if p == "model")
    if unsupported and not skip_unsupported:
        raise ValueError(
            f"{src}: components {unsupported} have model classes d4k_jax cannot convert yet "
            f"(supported: {sorted(supported)}); pass --skip_unsupported to copy them unconverted"
        )
    dst.mkdir(parents=True)
    shutil.copy(src / "model_index.json", dst / "model_index.json")
    for name, action in plan.items():
        if action == "convert":
            convert_component(src / name, dst / name, to, dtype, overrides if name == "vae" else {})
        else:
            if action == "model":
                logging.warning("%s: copied unconverted (unsupported model class)", name)
            shutil.copytree(src / name, dst / name)


def main(argv):
    del argv
    if not FLAGS.src or not FLAGS.dst:
        raise app.UsageError("--src and --dst are required")
    overrides = {}
    for item in FLAGS.override:
        key, sep, value = item.partition("=")
        if not sep:
            raise app.UsageError(f"--override expects key=value, got {item!r}")
        overrides[key] = json.loads(value)
    convert(Path(FLAGS.src), Path(FLAGS.dst), FLAGS.to, FLAGS.dtype, overrides, FLAGS.skip_unsupported, FLAGS.component)


if __name__ == "__main__":
    cli.run(main, config_flag=None)
