"""The README's examples run, and what they write is what the README says (the Lightning and Hugging Face
examples run in test_integrations.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import plain_pytorch  # noqa: E402
import tensorboard_example  # noqa: E402

from gradguard.report.run import read_jsonl  # noqa: E402


def test_plain_pytorch_example_skips_the_nan_batch_and_clips_the_scaled_one(tmp_path: Path) -> None:
    guard = plain_pytorch.main(steps=120, out=str(tmp_path), nan_at=40, scaled_at=80)
    assert guard.summary()["skipped"] == 1
    records = read_jsonl(tmp_path / "run.jsonl")
    assert len(records) == 120
    by_step = {r["step"]: r for r in records}
    assert by_step[40]["skipped"] and not math.isfinite(by_step[40]["total_norm"])
    finite_norms = [r["total_norm"] for r in records if math.isfinite(r["total_norm"])]
    assert by_step[80]["total_norm"] == max(finite_norms)  # the scaled batch is the spike
    assert by_step[80]["clipped"] and by_step[80]["coef"] < 1.0
    assert all(torch.isfinite(p).all() for p in guard.model.parameters())
    assert (tmp_path / "report.html").read_text(encoding="utf-8").count("data:image/png;base64,") == 3


def test_tensorboard_example_writes_the_documented_tags(tmp_path: Path) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    tensorboard_example.main(steps=30, logdir=str(tmp_path))
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        f"gradguard/{k}" for k in ("loss", "total_norm", "coef", "skipped", "clipped", "lr", "clip_threshold")
    }
    assert expected <= tags
    layers = {t for t in tags if t.startswith("gradguard_layers/")}
    assert layers == {"gradguard_layers/0", "gradguard_layers/2", "gradguard_layers/4"}
    norms = events.Scalars("gradguard/total_norm")
    assert [e.step for e in norms] == list(range(30))
    assert len(events.Scalars("gradguard_layers/0")) == 6  # layer_every=5
