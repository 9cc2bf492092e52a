"""`gradguard doctor TARGET`: prints the diagnosis; exit 0 healthy, 1 error finding, 2 bad input."""

from __future__ import annotations

import json
import textwrap

from typer.testing import CliRunner

from gradguard.cli import app

runner = CliRunner()
EXAMPLE = "examples/doctor_example.py"


def test_example_factory_is_diagnosed_exploding_with_exit_1(tmp_path) -> None:
    html, data = tmp_path / "doctor.html", tmp_path / "doctor.json"
    result = runner.invoke(app, ["doctor", f"{EXAMPLE}:build", "--html", str(html), "--json", str(data)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("gradguard doctor: EXPLODING (starts at 0)")
    assert "stable): gg.init.auto_(model)" in result.output
    assert html.read_text().startswith("<!DOCTYPE html>")
    assert json.loads(data.read_text())["verdict"] == "exploding"


def test_fixed_example_is_healthy_with_exit_0() -> None:
    result = runner.invoke(app, ["doctor", f"{EXAMPLE}:build_fixed"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("gradguard doctor: STABLE")


def test_dotted_module_target(tmp_path, monkeypatch) -> None:
    (tmp_path / "patient_pkg").mkdir()
    (tmp_path / "patient_pkg" / "__init__.py").write_text("")
    (tmp_path / "patient_pkg" / "models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def factory():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
            return model, (torch.randn(8, 4), torch.randn(8, 1)), nn.functional.mse_loss
    """))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["doctor", "patient_pkg.models:factory"])
    assert result.exit_code == 0, result.output
    assert "STABLE" in result.output


def test_bad_input_exits_2_with_a_message(tmp_path) -> None:
    cases = {
        "no_colon_here": "target must look like package.module:factory",
        "gradguard_no_such_module_xyz:build": "cannot import module",
        f"{EXAMPLE}:nope": "has no attribute 'nope'",
        f"{tmp_path}/missing.py:build": "no such file",
    }
    bad = tmp_path / "bad.py"
    bad.write_text("def build():\n    return 1, 2\n")
    cases[f"{bad}:build"] = "must return (model, batch, loss_fn)"
    wrong_model = tmp_path / "wrong.py"
    wrong_model.write_text("def build():\n    return 'model', (1, 2), print\n")
    cases[f"{wrong_model}:build"] = "the model (item 0) must be an nn.Module"
    raising = tmp_path / "raising.py"
    raising.write_text("def build():\n    raise RuntimeError('no data here')\n")
    cases[f"{raising}:build"] = "raised RuntimeError: no data here"
    for target, message in cases.items():
        result = runner.invoke(app, ["doctor", target])
        assert result.exit_code == 2, (target, result.output)
        assert message in result.output, (target, result.output)


def test_a_model_failing_on_its_batch_and_unwritable_outputs_exit_2_with_one_line(tmp_path) -> None:
    """Issue 9.14: exit 1 means an error finding; bad input is exit 2, said in one line, before any work."""
    broken = tmp_path / "broken.py"
    broken.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            return nn.Linear(4, 1), (torch.randn(8, 5), torch.randn(8, 1)), nn.functional.mse_loss
    """))
    result = runner.invoke(app, ["doctor", f"{broken}:build"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0
    assert "the model fails on its batch: RuntimeError: mat1 and mat2 shapes cannot be multiplied" in result.output
    for option in ("--html", "--json"):
        result = runner.invoke(app, ["doctor", f"{EXAMPLE}:build_fixed", option, str(tmp_path / "missing" / "r")])
        assert result.exit_code == 2, result.output
        assert result.output.strip().count("\n") == 0 and "no such folder" in result.output
