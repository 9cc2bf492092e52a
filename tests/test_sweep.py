"""gradguard sweep on the local executor: the factory contract, remedies not applicable, the cache (resume,
nothing rerun, an edited factory reruns), the figures per remedy, the warm-up, the command line."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gradguard.cli import app
from gradguard.explain.factory import FactoryError
from gradguard.lab.executors import LocalExecutor
from gradguard.lab.remedies import Remedy
from gradguard.lab.runner import cache_path
from gradguard.lab.sweep import lr_range, run_sweep
from gradguard.lab.sweep_report import sweep_rows
from gradguard.lab.sweep_run import WarmupStep
from gradguard.stats import grad_stats

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "sweep_factory.py") + ":build"

#: an ordinary regression script as a factory, returning the plain 4-tuple; it takes no qk_norm / z_loss
PLAIN_FACTORY = """
import torch
from torch import nn

def build(lr):
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    inputs = torch.randn(64, 4)
    targets = inputs.sum(dim=1, keepdim=True)
    data = [(inputs[i : i + 16], targets[i : i + 16]) for i in range(0, 64, 16)]
    return model, optimizer, data, nn.functional.mse_loss
"""


@pytest.fixture
def plain_factory(tmp_path: Path) -> str:
    path = tmp_path / "plain.py"
    path.write_text(PLAIN_FACTORY)
    return f"{path}:build"


def test_lr_range_is_log_spaced_and_checks_its_arguments() -> None:
    assert lr_range(1e-3, 1.0, 4) == [0.001, 0.01, 0.1, 1.0]
    with pytest.raises(ValueError, match="points must be an int >= 2"):
        lr_range(1e-3, 1.0, 1)
    with pytest.raises(ValueError, match="lr_min < lr_max"):
        lr_range(1.0, 1e-3, 4)


def test_a_plain_factory_sweeps_and_model_remedies_are_not_applicable(tmp_path: Path, plain_factory: str) -> None:
    result = run_sweep(plain_factory, lr_min=0.01, lr_max=10.0, points=3, remedies=["none", "global_norm", "qk_norm",
                       "z_loss"], seeds=2, steps=20, out=tmp_path / "out", workers=1, progress=False)
    assert result.not_applicable == {"qk-layernorm": "the factory does not take qk_norm=",
                                     "z-loss 0.0001": "the factory does not take z_loss="}
    assert len(result.records) == 2 * 2 * 3 and all("error" not in r for r in result.records)
    rows = {row.remedy: row for row in result.rows}
    assert set(rows) == {"no remedy", "GlobalNorm(1)"}
    baseline = rows["no remedy"]
    assert baseline.sensitivity.lrs == [0.01, 0.316, 10.0]
    # SGD at lr 10 on this regression diverges; lr 0.01 and 0.316 train
    assert baseline.largest_lr == 0.316 and baseline.first_diverged_lr == 10.0
    assert baseline.sensitivity.diverged == 2
    # the figure is the capped-loss mean of Wortsman et al. 2023, recomputed here from the records
    per_seed = []
    for seed in (0, 1):
        runs = sorted((r for r in result.records if r["config"]["seed"] == seed
                       and r["config"]["remedy_key"] == "none"), key=lambda r: r["config"]["lr"])
        capped = [min(r["val_loss"], r["initial_loss"]) if r["val_loss"] is not None else r["initial_loss"]
                  for r in runs]
        per_seed.append(sum(c - min(capped) for c in capped) / len(capped))
    assert baseline.sensitivity.sensitivity == pytest.approx(sum(per_seed) / 2)
    table = result.table.read_text()
    assert "| qk-layernorm | not applicable: the factory does not take qk_norm= |" in table
    assert "| no remedy | " in table
    html = result.report.read_text()
    assert "LR sensitivity" in html and html.count("data:image/png;base64,") == 2


def test_a_rerun_executes_nothing_an_interrupted_sweep_resumes_and_an_edit_reruns(
    tmp_path: Path, plain_factory: str
) -> None:
    options = dict(lr_min=0.01, lr_max=1.0, points=2, remedies=["none"], seeds=1, steps=10, out=tmp_path / "out",
                   workers=1, progress=False)
    first = run_sweep(plain_factory, **options)
    assert first.executed == 2
    assert run_sweep(plain_factory, **options).executed == 0
    cache_path(tmp_path / "out", first.records[1]["config"]).unlink()  # a sweep interrupted before its last run
    resumed = run_sweep(plain_factory, **options)
    assert resumed.executed == 1
    assert resumed.records[1]["val_loss"] == first.records[1]["val_loss"]
    path = Path(plain_factory.rpartition(":")[0])
    path.write_text(PLAIN_FACTORY.replace("nn.Tanh()", "nn.ReLU()"))
    assert run_sweep(plain_factory, **options).executed == 2


def test_the_example_factory_takes_qk_norm_and_z_loss(tmp_path: Path) -> None:
    result = run_sweep(EXAMPLE, lr_min=1e-3, lr_max=1e-2, points=2, remedies=["none", "qk_norm", "z_loss", "warmup",
                       "guard"], seeds=1, steps=4, out=tmp_path, workers=1, progress=False)
    assert result.not_applicable == {}
    assert all("error" not in r for r in result.records)
    assert [row.remedy for row in result.rows] == ["no remedy", "qk-layernorm", "z-loss 0.0001",
                                                    "warm-up (25% of steps)", "Guard (defaults)"]
    by = {(r["config"]["remedy_key"], r["config"]["lr"]): r for r in result.records}
    assert by["qk_norm", 1e-3]["val_loss"] != by["none", 1e-3]["val_loss"]  # a different model
    assert by["qk_norm", 1e-3]["initial_loss"] != by["none", 1e-3]["initial_loss"]
    assert by["z_loss", 1e-3]["initial_loss"] == by["none", 1e-3]["initial_loss"]  # same model, another loss
    assert by["z_loss", 1e-3]["val_loss"] != by["none", 1e-3]["val_loss"]
    assert by["warmup", 1e-3]["config"]["warmup"] == 1


@pytest.mark.parametrize("source, message", [
    ("def build(lr):\n    return 3", "must return"),
    ("import torch\nfrom torch import nn\ndef build(lr):\n    m = nn.Linear(2, 1)\n"
     "    return m, torch.optim.SGD(m.parameters(), lr=0.1), [(torch.ones(4, 2), torch.ones(4, 1))], nn.functional.mse_loss",
     "built with the lr it was given"),
    ("import torch\nfrom torch import nn\ndef build(lr):\n    m = nn.Linear(2, 1)\n"
     "    return m, torch.optim.SGD(m.parameters(), lr=lr), [(torch.ones(4, 3), torch.ones(4, 1))], nn.functional.mse_loss",
     "fails on its first batch"),
])
def test_a_factory_that_cannot_be_swept_fails_before_any_run(tmp_path: Path, source: str, message: str) -> None:
    path = tmp_path / "bad.py"
    path.write_text(source)
    with pytest.raises(FactoryError, match=message):
        run_sweep(f"{path}:build", points=2, seeds=1, steps=2, out=tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_options_are_named(plain_factory: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="remedies must be among"):
        run_sweep(plain_factory, remedies=["clip_everything"], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="seeds must be an int >= 1"):
        run_sweep(plain_factory, seeds=0, out=tmp_path, progress=False)


def test_warmup_scales_the_lr_in_force_and_gives_it_back() -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4)
    seen = []

    class Recording(Remedy):
        def step(self, loss, stats, batch=None):
            seen.append(self.optimizer.param_groups[0]["lr"])

    step = WarmupStep(Recording(optimizer), warmup=4)
    model(torch.ones(1, 2)).sum().backward()
    for _ in range(6):
        step.step(torch.tensor(1.0), grad_stats(model))
        assert optimizer.param_groups[0]["lr"] == 0.4
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


def test_largest_lr_that_trains_needs_every_seed() -> None:
    def record(lr: float, seed: int, final: float | None, diverged: bool = False) -> dict:
        return {"config": {"remedy_label": "r", "lr": lr, "seed": seed}, "val_loss": final, "initial_loss": 4.0,
                "diverged": diverged}

    records = [record(0.1, 0, 1.0), record(0.1, 1, 1.5), record(1.0, 0, 2.0), record(1.0, 1, None, diverged=True),
               record(0.01, 0, 3.0), record(0.01, 1, 3.0)]
    (row,) = sweep_rows(records)
    assert row.largest_lr == 0.1 and row.first_diverged_lr == 1.0
    # capped losses per seed: seed 0 [3, 1, 2] -> mean excess (2 + 0 + 1) / 3 = 1; seed 1 [3, 1.5, 4] (the
    # diverged run counts as L0 = 4) -> (1.5 + 0 + 2.5) / 3 = 4/3; the mean over seeds: 7/6
    assert row.sensitivity.sensitivity == pytest.approx(7 / 6)
    assert math.isclose(row.sensitivity.best_lr, 0.1)


def test_command_line_writes_the_report_and_the_table(tmp_path: Path, plain_factory: str) -> None:
    result = CliRunner().invoke(app, ["sweep", plain_factory, "--lr-min", "0.01", "--lr-max", "1", "--points", "2",
                                      "--seeds", "1", "--steps", "5", "--remedies", "none,qk_norm", "--workers", "1",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "LR sensitivity" in result.output and "not applicable" in result.output
    assert "[min, max] over seeds" in result.output  # printed as text, not read as rich markup
    assert (tmp_path / "report.html").is_file() and (tmp_path / "table.md").is_file()
    assert (tmp_path / "results.csv").is_file()
    bad = CliRunner().invoke(app, ["sweep", str(tmp_path / "missing.py") + ":build", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "no such file" in bad.output


def test_factory_source_is_a_module_target_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_factory.py").write_text(textwrap.dedent(PLAIN_FACTORY))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run_sweep("my_factory:build", lr_min=0.01, lr_max=0.1, points=2, remedies=["none"], seeds=1, steps=4,
                       out=tmp_path / "out", workers=1, progress=False)
    assert all("error" not in r for r in result.records)


def test_a_local_worker_that_dies_becomes_an_error_record_and_runs_again(tmp_path: Path) -> None:
    path = tmp_path / "dies.py"
    path.write_text(PLAIN_FACTORY.replace("def build(lr):\n", "def build(lr):\n"
                                          "    import multiprocessing, os\n"
                                          "    if lr == 1.0 and multiprocessing.current_process().name != 'MainProcess'"
                                          " and os.path.exists(__file__ + '.die'):\n"
                                          "        os._exit(1)\n"))
    (tmp_path / "dies.py.die").write_text("")
    options = dict(lr_min=0.01, lr_max=1.0, points=2, remedies=["none"], seeds=1, steps=4, out=tmp_path / "out",
                   progress=False)
    result = run_sweep(f"{path}:build", executor=LocalExecutor(2), **options)
    lost = {r["config"]["lr"]: r["error"] for r in result.records if "error" in r}
    assert 1.0 in lost and lost[1.0].startswith("run lost: BrokenProcessPool")
    (tmp_path / "dies.py.die").unlink()
    again = run_sweep(f"{path}:build", executor=LocalExecutor(1), **options)
    assert again.executed == len(lost) and all("error" not in r for r in again.records)
