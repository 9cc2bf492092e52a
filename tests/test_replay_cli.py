"""``gradguard replay`` run as a user runs it (a subprocess): one line and exit 2 for every bad input, the
bundle's checksum, and a diagnosis of the step on its trained weights (issue 18, items 1-3)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradguard as gg
from gradguard.forensics.bundle import checksum, load_bundle
from gradguard.forensics.replay import diagnose_step

FACTORY = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def build(width=32):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                              nn.Linear(width, 1))
        return model, (torch.randn(4, 8), torch.randn(4, 1)), F.mse_loss

    def wider():
        return build(48)

    def renamed():
        model = nn.Sequential()
        model.add_module("first", nn.Linear(8, 32))
        model.add_module("out", nn.Linear(32, 1))
        return model, (torch.randn(4, 8), torch.randn(4, 1)), F.mse_loss
""")


def teacher_batches(steps: int, corrupt: dict[int, dict[int, float]], size: int = 16) -> list:
    """``(x, y, ids)`` from a linear teacher, ids the dataset indices; ``corrupt[step] = {position: scale}``."""
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 1, generator=g)
    out = []
    for step in range(steps):
        x = torch.randn(size, 8, generator=g)
        y = x @ teacher + 0.1 * torch.randn(size, 1, generator=g)
        for i, scale in corrupt.get(step, {}).items():
            x[i] = x[i] * scale
        out.append((x, y, torch.arange(step * size, (step + 1) * size)))
    return out


def train_to_bundles(folder: Path, corrupt: dict[int, dict[int, float]], steps: int = 14, before=None) -> list[str]:
    namespace: dict = {}
    exec(FACTORY, namespace)
    model = namespace["build"]()[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, opt, forensics=gg.Forensics(loss_fn=F.mse_loss, bundle_dir=str(folder)),
                     # the warm-up's floor a little under its default 0.5: the x100 rows move this small tanh net's
                     # gradient norm 5.6x over a noisy start (z 3.4 at the default floor, not a spike)
                     detector=gg.detect.Detector(warmup_steps=6, warmup_sigma_floor=0.3), log_every=4)
    for step, batch in enumerate(teacher_batches(steps, corrupt)):
        if before is not None:
            before(step, model)
        loss = F.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        guard.step(loss, batch=batch)
        opt.zero_grad(set_to_none=True)
    guard.close()
    return guard.forensics.bundles  # type: ignore[union-attr]


def replays(calls: list[tuple[str | Path, Path, str]]) -> list[subprocess.CompletedProcess]:
    """``gradguard replay BUNDLE --model FACTORY:NAME`` for each call, as subprocesses, two at a time."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    results: list[subprocess.CompletedProcess] = []
    for start in range(0, len(calls), 2):
        running = [(args, subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
                   for bundle, factory, name in calls[start:start + 2]
                   for args in [[sys.executable, "-m", "gradguard", "replay", str(bundle), "--model",
                                 f"{factory}:{name}"]]]
        for args, process in running:
            stdout, stderr = process.communicate(timeout=120)
            results.append(subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
    return results


def replay(bundle: str | Path, factory: Path, name: str = "build") -> subprocess.CompletedProcess:
    return replays([(bundle, factory, name)])[0]


def replay_in_process(bundle: str | Path, factory: Path, name: str = "build") -> subprocess.CompletedProcess:
    """The same command through typer's runner, in this process (each subprocess costs an import of torch:
    the cases the issue names run as subprocesses, the others here)."""
    from typer.testing import CliRunner

    from gradguard.cli import app

    result = CliRunner().invoke(app, ["replay", str(bundle), "--model", f"{factory}:{name}"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return subprocess.CompletedProcess([], result.exit_code, result.stdout, result.stderr)


def refused(result: subprocess.CompletedProcess) -> str:
    """The one line of a refusal (exit 2, no traceback)."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradguard replay: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def data_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """A bundle of a step whose spike comes from x100-weighted rows (ids 163 and 169), and the factory."""
    folder = tmp_path_factory.mktemp("replay")
    factory = folder / "factory.py"
    factory.write_text(FACTORY)
    bundles = train_to_bundles(folder / "bundles", {10: {3: 100.0, 9: 100.0}})
    return Path(bundles[0]), factory


def resave(bundle: Path, path: Path, change, rehash: bool = True) -> Path:
    data = torch.load(bundle, weights_only=True)
    change(data)
    if rehash:
        data["checksum"] = checksum(data)
    torch.save(data, path)
    return path


def test_data_to_blame_names_the_samples_and_the_exclude_line_and_no_reinit(data_bundle) -> None:
    """Issue 18.3: on a step whose spike came from x100-weighted rows, the replayed doctor said EXPLODING and
    recommended gg.init.auto_(model); nothing pointed at the samples forensics had named."""
    bundle, factory = data_bundle
    assert load_bundle(bundle)["forensics"]["bundle"] == str(bundle)  # the bundle records its own path
    result = replay(bundle, factory)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "trained weights of step 10" in result.stdout and "reproduces" in result.stdout
    named = load_bundle(bundle)["forensics"]["samples"]
    assert named and set(named) <= {163, 169}
    assert f"verdict: data: the data: sample(s) {named[0]} (" in result.stdout
    assert f"fix: loader = DataLoader(gg.forensics.exclude(dataset, {named!r})" in result.stdout
    assert "auto_" not in result.stdout and "re-initialis" not in result.stdout


CONTENTS = [  # an edit of a bundle, its checksum recomputed (a buggy writer, a hand edit), and the refusal
    (lambda d: d.pop("batches"), "not a complete bundle: missing keys ['batches'], unexpected keys []"),
    (lambda d: d.update(extra=1), "not a complete bundle: missing keys [], unexpected keys ['extra']"),
    (lambda d: d["batches"][0].update(rng={"cpu": torch.zeros(7, dtype=torch.uint8), "cuda": None}),
     "micro-batch 0: bad RNG state: the CPU generator's state must be 5056 bytes (uint8), got torch.uint8 [7]"),
    (lambda d: d["batches"][0].update(rng="seed 0"), "micro-batch 0: bad RNG state: expected {'cpu', 'cuda'}, got str"),
    (lambda d: d.update(version=1), "bundle version 1, this gradguard reads 2"),
]


def test_every_bad_input_is_refused_in_one_line_with_exit_2(data_bundle, tmp_path) -> None:
    """Issue 18.1-2, one regression per defect, the CLI as a subprocess (its exit code, its one line):
    another architecture by shapes (was a RuntimeError traceback, exit 1); a bundle missing its batches
    (KeyError); a bad RNG state (RuntimeError); 64 bytes flipped (loaded silently, then the doctor blamed
    the init); a truncated file; a foreign one."""
    bundle, factory = data_bundle
    missing = resave(bundle, tmp_path / "missing.pt", CONTENTS[0][0])
    bad_rng = resave(bundle, tmp_path / "rng.pt", CONTENTS[2][0])
    raw = bytearray(bundle.read_bytes())
    weights = torch.load(bundle, weights_only=True)["model_state"]["2.weight"].numpy().tobytes()
    at = bytes(raw).index(weights[:256]) + 128  # inside the tensor data of '2.weight'
    raw[at:at + 64] = bytes(b ^ 0xFF for b in raw[at:at + 64])
    flipped, cut, foreign = tmp_path / "flipped.pt", tmp_path / "cut.pt", tmp_path / "foreign.pt"
    flipped.write_bytes(bytes(raw))
    cut.write_bytes(bundle.read_bytes()[: len(raw) // 2])
    torch.save({"weights": torch.ones(3)}, foreign)
    results = replays([(bundle, factory, "wider"), (missing, factory, "build"), (bad_rng, factory, "build"),
                       (flipped, factory, "build"), (cut, factory, "build"), (foreign, factory, "build")])
    lines = [refused(result) for result in results]
    assert lines[0] == ("gradguard replay: the model does not match the bundle: '0.weight' is [48, 8] in the model, "
                        "[32, 8] in the bundle (and 4 more)")
    assert lines[1] == f"gradguard replay: {missing}: {CONTENTS[0][1]}"
    assert lines[2] == f"gradguard replay: {bad_rng}: {CONTENTS[2][1]}"
    assert lines[3].startswith(f"gradguard replay: {flipped}: bundle corrupted: its contents hash to ")
    assert lines[4].startswith(f"gradguard replay: {cut}: bundle corrupted or truncated (")
    assert lines[5] == f"gradguard replay: {foreign} is not a gradguard replay bundle (no format 'gradguard-replay')"


def test_the_other_bad_inputs_are_refused_in_one_line_with_exit_2(data_bundle, tmp_path) -> None:
    """Issue 18.1: another architecture by names; an extra key, an RNG state of another type, an old version;
    a missing or unreadable file, a text file; an edit that did not recompute the checksum."""
    bundle, factory = data_bundle
    assert refused(replay_in_process(bundle, factory, "renamed")) == (
        "gradguard replay: the model does not match the bundle: missing ['first.bias', 'first.weight', 'out.bias', "
        "'out.weight'], unexpected ['0.bias', '0.weight', '2.bias', '2.weight', '4.bias']")
    for i, (change, message) in enumerate(CONTENTS[1:]):
        path = resave(bundle, tmp_path / f"edited{i}.pt", change)
        assert refused(replay_in_process(path, factory)) == f"gradguard replay: {path}: {message}"
    unhashed = resave(bundle, tmp_path / "unhashed.pt", lambda d: d.update(step=9), rehash=False)
    assert refused(replay_in_process(unhashed, factory)).startswith(
        f"gradguard replay: {unhashed}: bundle corrupted: its contents hash to ")
    assert refused(replay_in_process(factory, factory)).startswith(
        f"gradguard replay: {factory}: not a gradguard replay bundle (")
    assert refused(replay_in_process(tmp_path / "none.pt", factory)) == (
        f"gradguard replay: no such bundle: {tmp_path / 'none.pt'}")
    assert refused(replay_in_process(tmp_path, factory)).startswith(f"gradguard replay: cannot read {tmp_path}: ")


def test_transient_step_says_transient(tmp_path) -> None:
    """Issue 18.3: when the step does not reproduce, replay says transient (exit 0: nothing to fix)."""
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)
    fired = {"armed": False}

    def once(module, args, output):
        if fired["armed"]:
            fired["armed"] = False
            return output * 1e2
        return output

    def before(step: int, model: nn.Module) -> None:
        if step == 0:  # the output layer x100 once: a spike at any warm-up floor (the hidden layer's x1e4 is
            model[4].register_forward_hook(once)  # squashed by its tanh: a norm 3x a noisy start's, not flagged)
        fired["armed"] = step == 9

    bundles = train_to_bundles(tmp_path / "bundles", {}, before=before)
    result = replay_in_process(bundles[0], factory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "does not reproduce" in result.stdout and "verdict: transient:" in result.stdout
    assert "fix:" not in result.stdout


def test_weights_to_blame_name_the_layer_and_rescale_it_alone(tmp_path) -> None:
    """Issue 18.3: no sample stands out and the step comes back: the weights are to blame; the layer is named
    and its change keeps the trained weights (no re-initialisation), and the doctor gets the user's batch."""
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)

    def before(step: int, model: nn.Module) -> None:
        if step == 9:
            with torch.no_grad():
                model[2].weight.mul_(40.0)

    bundles = train_to_bundles(tmp_path / "bundles", {}, before=before)
    result = replay_in_process(bundles[0], factory)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "verdict: weights: the weights or the learning rate" in result.stdout
    assert re.search(r'fix: model.get_submodule\("2"\).weight.data.mul_\(0.0[234]\d*\)  # to the other layers', result.stdout)
    assert "the weights of '2' are x" in result.stdout
    assert "auto_" not in result.stdout and "lsuv_" not in result.stdout


def test_the_doctor_gets_the_batch_in_the_users_form(data_bundle, monkeypatch) -> None:
    """Issue 18.3: cli.py handed the doctor gradguard's internal Batch; a fix check then failed with
    ``'Batch' object has no attribute 'shape'``."""
    import gradguard.forensics.replay as replay_module

    bundle, _ = data_bundle
    seen = []

    def spy(model, batch, loss_fn, **kwargs):
        seen.append(batch)
        return real(model, batch, loss_fn, **kwargs)

    real = replay_module.doctor
    monkeypatch.setattr(replay_module, "doctor", spy)
    data = load_bundle(bundle)
    data["forensics"]["samples"] = []  # as if no sample stood out: the doctor runs
    namespace: dict = {}
    exec(FACTORY, namespace)
    model = namespace["build"]()[0]
    diagnosis = diagnose_step(data, model, F.mse_loss)
    assert diagnosis.blame in ("weights", "none") and seen
    assert isinstance(seen[0], tuple) and len(seen[0]) == 3 and seen[0][2].tolist()[:2] == [160, 161]
