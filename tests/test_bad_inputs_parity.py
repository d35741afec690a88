"""`python -m tools.parity` against bad input: one `error:` line naming the value, exit status 2, no traceback."""

import json
from pathlib import Path

from cli_runner import assert_user_error, run_cli

DEMO = Path(__file__).resolve().parent.parent / "d4k_jax" / "data" / "demo_pipeline"


def test_missing_path(tmp_path):
    missing = tmp_path / "no_such_pipeline"
    result = run_cli("tools.parity", f"--pipeline={missing}", f"--json={tmp_path / 'r.json'}")
    assert result.returncode == 2
    assert_user_error(
        result, f"error: pipeline folder {missing} does not exist", "diffusers pipeline folder", case="missing path"
    )
    assert not (tmp_path / "r.json").exists()


def test_folder_that_is_not_a_pipeline(tmp_path):
    result = run_cli("tools.parity", f"--pipeline={tmp_path}", f"--json={tmp_path / 'r.json'}")
    assert result.returncode == 2
    assert_user_error(result, f"error: {tmp_path}: not a pipeline folder (no model_index.json)", case="empty folder")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    result = run_cli("tools.parity", f"--pipeline={tmp_path}", f"--json={tmp_path / 'r.json'}")
    assert result.returncode == 2
    assert_user_error(
        result,
        "'StableDiffusionXLPipeline' is not a Flux or SD3 pipeline",
        "FluxPipeline",
        case="not a Flux/SD3 pipeline",
    )


def test_unsupported_scheduler_setting(tmp_path):
    """Found before torch or any weights load, with every unsupported setting named."""
    (tmp_path / "model_index.json").write_text((DEMO / "model_index.json").read_text())
    (tmp_path / "scheduler").mkdir()
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_karras_sigmas": True, "shift_terminal": 0.1}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    result = run_cli("tools.parity", f"--pipeline={tmp_path}", f"--json={tmp_path / 'r.json'}")
    assert result.returncode == 2
    assert_user_error(
        result, "scheduler_config.json", "use_karras_sigmas=True", "shift_terminal=0.1", case="unsupported scheduler"
    )
