"""The config files: every mesh lists the four axes, and every `--config.a.b=v` override the README shows
parses with the real ml_collections flag machinery (in-process; no CLI is run)."""

import ast
import re
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from d4k_jax.sharding import MESH_AXES

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("configs/flux_wlf.py", "configs/sd3_wlf.py", "configs/vae_recon.py")
MESHES = {"configs/flux_wlf.py": ("mesh", "train.mesh"), "configs/sd3_wlf.py": ("mesh", "train.mesh")}
MESHES["configs/vae_recon.py"] = ("mesh",)


def parse(config: str, *overrides: str):
    """The config as `python -m d4k_jax.<cli> --config=config overrides...` would see it."""
    argv = ["prog", f"--config={config}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


def _field(c, path: str):
    for name in path.split("."):
        c = c[name]
    return c


@pytest.mark.parametrize("variant", ["", ":tiny", ":tiny_lora"])
@pytest.mark.parametrize("config", CONFIGS)
def test_every_mesh_axis_can_be_overridden(config, variant):
    if variant == ":tiny_lora" and "vae_recon" in config:
        pytest.skip("a training variant: vae_recon.py has none")
    for mesh in MESHES[config]:
        assert set(_field(parse(config + variant), mesh)) == set(MESH_AXES), mesh
        for axis in MESH_AXES:
            assert _field(parse(config + variant, f"--config.{mesh}.{axis}=2"), mesh)[axis] == 2


def readme_overrides() -> list[tuple[str, str]]:
    """(field, value) of every `--config.field=value` in README.md (N, a placeholder size, read as 2)."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"--config\.([A-Za-z_][\w.]*)=('[^']*'|\"[^\"]*\"|[^\s`'\\]+)", text)
    return sorted({(field, "2" if value == "N" else value.strip("'\"")) for field, value in found if field != "a.b"})


def test_the_readme_shows_overrides():
    fields = {field for field, _ in readme_overrides()}
    assert {"mesh.fsdp", "train.mesh.fsdp", "shard_params", "pipeline"} <= fields, fields


@pytest.mark.parametrize(("field", "value"), readme_overrides())
def test_each_readme_override_parses(field, value):
    """Parsed with every config that has the field (all of them for the mesh axes); it must be one at least."""
    expected = _literal(value)
    configs = [c for c in CONFIGS if _has(parse(c), field)]
    assert configs, f"--config.{field} names a field of no config in {CONFIGS}"
    for config in configs:
        got = _field(parse(config, f"--config.{field}={value}"), field)
        assert got == expected or (isinstance(got, tuple) and list(got) == list(expected)), (config, got)


def _has(c, path: str) -> bool:
    try:
        _field(c, path)
        return True
    except (KeyError, AttributeError):
        return False


def _literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
