"""tools/parity.py on tiny random pipelines: every component within the fp32 tolerance, report written."""

import json

import pytest
from tiny_pipelines import flux_pipeline, sd3_pipeline

from tools import parity


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


def test_parity_tool_flags_a_mismatch(tmp_path, monkeypatch):
    flux_pipeline(tmp_path)
    real = parity.errors
    monkeypatch.setattr(parity, "errors", lambda ours, ref: {**real(ours, ref), "rel": 1.0})
    assert (
        parity.main(
            [
                f"--pipeline={tmp_path / 'flux'}",
                "--height=16",
                "--width=16",
                "--steps=1",
                f"--json={tmp_path / 'r.json'}",
            ]
        )
        == 1
    )
