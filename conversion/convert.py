"""Convert checkpoints between diffusers / transformers folders and d4k_jax (orbax) folders.

  python -m conversion.convert --src=PIPELINE_OR_COMPONENT --dst=DIR             # -> d4k_jax, no torch needed
  python -m conversion.convert --src=DIR --dst=OUT --to=diffusers [--dtype=bfloat16]

A converted component folder holds config.json and the orbax checkpoint `params/`; `load_component`
reads it without torch. A pipeline folder (model_index.json) is converted component by component;
tokenizer and scheduler folders are copied as they are.

`--override=KEY=JSON` (repeatable) changes a key of a component's config.json before conversion, and the
converted config.json keeps it (`stride=2` makes the F16 VAE). Converting one component, KEY is one of
its config keys; converting a pipeline, `KEY=JSON` reaches the VAE only and `COMPONENT.KEY=JSON` reaches
the component of that name (`transformer.axes_dims_rope=[16,56,56]`). A key the model does not read is an
error that lists the keys it reads, before anything is written.

The output is written into DST.partial and renamed to DST when complete: a failed or killed run leaves
no DST, and a rerun removes the DST.partial it left. An existing DST is never touched.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from absl import app, flags, logging

from conversion.export import STORAGE_DTYPES, export_component
from conversion.load import load_with_config
from d4k_jax import checkpoint, cli, files
from d4k_jax.io.components import KINDS, class_name, override_problem
from d4k_jax.io.load import PARAMS_DIR, load_config


def _define_flags() -> None:
    # Defined only when run as a program, as every CLI does, so that importing this module (the tests, another
    # program) never defines or clashes with flags.
    flags.DEFINE_string("src", None, "diffusers/transformers pipeline or component folder, or a converted one")
    flags.DEFINE_string("dst", None, "output folder (must not exist; written as DST.partial, then renamed)")
    flags.DEFINE_enum("to", "flax", ["flax", "diffusers"], "target format")
    flags.DEFINE_enum("dtype", None, sorted(STORAGE_DTYPES), "storage dtype (default: float32 / as loaded)")
    flags.DEFINE_multi_string(
        "override",
        [],
        "config override KEY=JSON_VALUE, e.g. --override=stride=2 (the F16 VAE). For a component folder KEY is "
        "one of its config keys; for a pipeline folder KEY=VALUE reaches the VAE only and COMPONENT.KEY=VALUE "
        "the named component (e.g. vae.stride=2). A key the model does not read is an error listing valid keys.",
    )
    flags.DEFINE_string("component", "transformer", "the model to take from a single file holding several (SAI SD3)")
    flags.DEFINE_bool("skip_unsupported", False, "copy model components of unsupported classes instead of failing")


PIPELINE_DEFAULT = "vae"  # the component a bare KEY=VALUE override reaches in a pipeline folder


def partial_path(dst: Path) -> Path:
    """Where `convert` writes before renaming to `dst`."""
    return dst.with_name(dst.name + ".partial")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`KEY=JSON` / `COMPONENT.KEY=JSON` flag values -> {KEY or COMPONENT.KEY: value}; one error for all bad ones."""
    out, bad = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            bad.append(f"{item!r} (expected KEY=VALUE)")
            continue
        try:
            out[key] = json.loads(value)
        except ValueError:
            bad.append(f'{item!r}: the value {value!r} is not JSON (expected e.g. 2, true, 0.5, "text", [1, 2])')
    if bad:
        raise ValueError("--override: " + "; ".join(bad))
    return out


def by_component(overrides: Mapping[str, Any]) -> dict[str | None, dict[str, Any]]:
    """{COMPONENT (None for a bare KEY): {KEY: value}}."""
    out: dict[str | None, dict[str, Any]] = {}
    for key, value in overrides.items():
        component, dot, name = key.rpartition(".")
        out.setdefault(component if dot else None, {})[name] = value
    return out


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
    """Convert `src` (a pipeline or component folder, or a single file) into the new folder `dst`.
    `overrides` keys are KEY or, for a pipeline folder, COMPONENT.KEY (see the module docstring)."""
    src, dst = Path(src), Path(dst)
    overrides = by_component(overrides or {})
    if dst.exists():
        raise FileExistsError(f"--dst {dst} exists; choose a new folder (it is never overwritten)")
    pipeline = (src / "model_index.json").is_file()
    if src.is_dir() and not pipeline and not (src / "config.json").is_file():
        raise FileNotFoundError(
            f"--src {src} holds neither model_index.json (a pipeline folder) nor config.json (a component folder)"
        )
    if not pipeline:
        addressed = sorted(f"{c}.{k}" for c, kv in overrides.items() if c is not None for k in kv)
        if addressed:
            raise ValueError(
                f"--override {addressed}: COMPONENT.KEY overrides need a pipeline folder (model_index.json), "
                f"and --src {src} is one component; pass KEY=VALUE"
            )
        _written(dst, lambda out: convert_component(src, out, to, dtype, overrides.get(None, {}), component))
        return
    plan = _plan(src, skip_unsupported)
    per_component = _pipeline_overrides(src, plan, overrides)
    _written(dst, lambda out: _convert_pipeline(src, out, plan, to, dtype, per_component))


def _plan(src: Path, skip_unsupported: bool) -> dict[str, str]:
    """{component: "convert" | "model" (unsupported model class, copied) | "copy"}."""
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
    return plan


def _pipeline_overrides(src: Path, plan: dict[str, str], overrides: dict) -> dict[str, dict[str, Any]]:
    """The overrides of each converted component, checked against its config before anything is written."""
    converted = sorted(n for n, action in plan.items() if action == "convert")
    per_component: dict[str, dict[str, Any]] = {}
    for name, kv in overrides.items():
        target = PIPELINE_DEFAULT if name is None else name
        per_component.setdefault(target, {}).update(kv)
    problems = []
    for name, kv in per_component.items():
        if name not in converted:
            how = "a bare KEY=VALUE override reaches the VAE, and there is" if name == PIPELINE_DEFAULT else "there is"
            keys = sorted(kv) if name == PIPELINE_DEFAULT else [f"{name}.{k}" for k in sorted(kv)]
            problems.append(f"--override {keys}: {how} no {name!r} to convert in {src} (converted: {converted})")
            continue
        cfg = load_config(src / name, **kv)
        problems.append(override_problem(cfg, kv, f"--override for {name}/"))
    problems = [p for p in problems if p]
    if problems:
        raise ValueError("; ".join(problems))
    return per_component


def _convert_pipeline(src: Path, dst: Path, plan: dict[str, str], to: str, dtype, overrides: dict) -> None:
    dst.mkdir(parents=True)
    shutil.copy(src / "model_index.json", dst / "model_index.json")
    for name, action in plan.items():
        if action == "convert":
            convert_component(src / name, dst / name, to, dtype, overrides.get(name, {}))
        else:
            if action == "model":
                logging.warning("%s: copied unconverted (unsupported model class)", name)
            shutil.copytree(src / name, dst / name)


def _written(dst: Path, write) -> None:
    """`write(folder)` into DST.partial, then rename it to `dst`; a stale DST.partial (a killed run) is
    removed first, and a failed run removes its own (a full disk gets its space back)."""
    partial = partial_path(dst)
    if partial.exists():
        logging.warning("removing %s, left by an interrupted convert", partial)
        shutil.rmtree(partial)
    try:
        write(partial)
        partial.rename(dst)
    except BaseException:
        files.remove_tree(partial)
        raise


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.src or not f.dst:
        raise app.UsageError("--src and --dst are required")
    convert(Path(f.src), Path(f.dst), f.to, f.dtype, parse_overrides(f.override), f.skip_unsupported, f.component)


if __name__ == "__main__":
    _define_flags()
    cli.run(main, config_flag=None)
