"""tools/parity.py on tiny random pipelines: every component within the fp32 tolerance, report written."""

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_pipelines import flux_pipeline, sd3_pipeline

from tools import parity

DEMO = Path(__file__).resolve().parent.parent / "d4k_jax" / "data"


@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_parity_tool_passes_on_tiny_pipelines(tmp_path, model, capsys):
    (flux_pipeline if model == "flux" else sd3_pipeline)(tmp_path)
    report = tmp_path / "report.json"
    code = parity.main([f"--pipeline={tmp_path / model}", "--height=16", "--width=24", "--steps=2", f"--json={report}"])
    out = capsys.readouterr().out
    rows = json.loads(report.read_text())["rows"]
    assert code == 0, out
    assert len(rows) == 8 and all(r["ok"] and r["rel"] < 1e-4 for r in rows)
    assert "8 of 8 components within tolerance" in out


@pytest.mark.parametrize("folder", ["demo_pipeline", "demo_pipeline_sd3"])
def test_parity_tool_on_the_f16_demo_pipelines(tmp_path, folder, capsys):
    """F16 ("stride": 2): the VAE and the whole pipeline against the torch F16 reference (diffusers has no F16
    VAE; its pipeline used to die on a RoPE size mismatch), the text encoders and transformer against diffusers."""
    report = tmp_path / "report.json"
    code = parity.main([f"--pipeline={DEMO / folder}", "--height=32", "--width=32", "--steps=1", f"--json={report}"])
    out = capsys.readouterr().out
    rows = json.loads(report.read_text())["rows"]
    assert code == 0, out
    assert len(rows) == 8 and all(r["ok"] and r["rel"] < 1e-4 for r in rows), out
    assert [r["component"] for r in rows if "F16 reference" in r["component"]] == [
        "vae encode (mean, F16 reference)",
        "vae decode (F16 reference)",
        "pipeline (1 steps, 32x32, F16 reference)",
    ]


def test_parity_tool_flags_a_mismatch_and_a_failing_component(tmp_path, monkeypatch, capsys):
    """A component beyond its tolerance fails the run; one that raises is a failed row, not a traceback
    (the comparisons are stubbed: the real ones run in the tests above)."""

    def broken():
        raise RuntimeError("the VAE broke\nsecond line")

    def compare(*args):
        rows = parity.Rows(verbose=False)
        rows.check(["transformer at sigma 1.0"], lambda: [(np.ones(3), np.ones(3))])
        rows.check(["transformer at sigma 0.5"], lambda: [(np.full(3, 1.5), np.ones(3))])  # rel 0.5
        rows.check(["vae encode (mean)", "vae decode"], broken)
        return list(rows)

    monkeypatch.setattr(parity, "compare", compare)
    report = tmp_path / "r.json"
    assert parity.main([f"--pipeline={DEMO / 'demo_pipeline'}", f"--json={report}"]) == 1
    out = capsys.readouterr().out
    assert "NO  failed: RuntimeError: the VAE broke" in out and "second line" not in out
    assert "1 of 4 components within tolerance" in out
    rows = json.loads(report.read_text())["rows"]  # standard JSON: no NaN / Infinity
    assert [r["ok"] for r in rows] == [True, False, False, False] and rows[1]["rel"] == 0.5
    assert all(r["rel"] is None and r["note"].startswith("failed: RuntimeError") for r in rows[2:])


def test_parity_tool_user_errors_are_one_line(tmp_path, capsys):
    """In-process: a folder that is not a pipeline, a bad size; exit status 2 and one `error:` line."""
    assert parity.main([f"--pipeline={tmp_path}", f"--json={tmp_path / 'r.json'}"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: not a pipeline folder (no model_index.json)\n"
    code = parity.main([f"--pipeline={DEMO / 'demo_pipeline'}", f"--json={tmp_path / 'no' / 'r.json'}"])
    assert code == 2 and "folder " + str(tmp_path / "no") + " does not exist" in capsys.readouterr().err
