"""The lab runner's cache (resumable, keyed by config), determinism, and the models it trains."""

from __future__ import annotations

import json

import pytest
import torch

from gradguard.lab.models import CausalTransformer, DeepMLP, TanhRNN
from gradguard.lab.runner import cache_path, config_key, run_grid, run_one
from gradguard.lab.scenarios import build_grid, get_scenario


def tiny_grid() -> list[dict]:
    return build_grid(["faults"], quick=True, seeds=1, steps=4)


def test_second_run_executes_nothing_and_a_changed_config_reruns_alone(tmp_path) -> None:
    configs = tiny_grid()
    first = run_grid(configs, tmp_path, workers=1)
    assert first.executed == len(configs) == 13  # 4 faults x 3 remedies, and the silent bad data run
    assert all("error" not in record for record in first.records)
    assert all(cache_path(tmp_path, config).exists() for config in configs)

    again = run_grid(configs, tmp_path, workers=1)
    assert again.executed == 0
    assert [r["final_loss"] for r in again.records] == [r["final_loss"] for r in first.records]

    changed = [dict(config) for config in configs]
    changed[3]["lr"] = 0.01
    seen = []
    third = run_grid(changed, tmp_path, workers=1, on_record=lambda config, record: seen.append(config))
    assert third.executed == 1
    assert len(seen) == 13, "the progress callback hears about cached runs too"
    assert third.records[3]["config"]["lr"] == 0.01


def test_a_corrupt_cache_file_is_run_again(tmp_path) -> None:
    config = tiny_grid()[0]
    run_grid([config], tmp_path, workers=1)
    cache_path(tmp_path, config).write_text("{not json")
    assert run_grid([config], tmp_path, workers=1).executed == 1
    assert json.loads(cache_path(tmp_path, config).read_text())["config"] == config


def test_config_key_depends_on_every_value() -> None:
    config = tiny_grid()[0]
    assert config_key(config) == config_key(dict(reversed(list(config.items()))))
    assert config_key(config) != config_key({**config, "seed": 1})


def test_runs_are_deterministic_per_seed() -> None:
    config = build_grid(["recurrence"], quick=True, seeds=2, steps=6)
    first, other_seed = config[0], config[1]
    a, b, c = run_one(first), run_one(first), run_one(other_seed)
    assert a["curves"] == b["curves"]
    assert a["curves"]["loss"] != c["curves"]["loss"]


def test_a_failing_run_is_recorded_and_not_cached(tmp_path) -> None:
    config = {**tiny_grid()[0], "fault": "cosmic ray"}
    result = run_grid([config], tmp_path, workers=1)
    assert "error" in result.records[0] and "cosmic ray" in result.records[0]["error"]
    assert not cache_path(tmp_path, config).exists()


def test_unknown_scenario_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid scenarios: depth, recurrence, learning_rate"):
        get_scenario("width")


def test_models() -> None:
    rnn = TanhRNN(2, 16, 1, spectral_radius=1.5)
    singular_values = torch.linalg.svdvals(rnn.rnn.weight_hh_l0.detach())
    torch.testing.assert_close(singular_values, torch.full((16,), 1.5))
    assert rnn(torch.randn(3, 7, 2)).shape == (3, 1)
    mlp = DeepMLP(64, 10, depth=5, width=32, activation="tanh")
    assert len(mlp.linear_layers()) == 6 and mlp(torch.randn(4, 64)).shape == (4, 10)
    with pytest.raises(ValueError, match="activation"):
        DeepMLP(64, 10, depth=2, width=8, activation="swish")
    gpt = CausalTransformer(vocab_size=11, context=8, d_model=16, n_layer=1, n_head=2)
    ids = torch.randint(0, 11, (2, 8))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 11
    torch.testing.assert_close(gpt(ids)[:, :-1], gpt(changed)[:, :-1]), "causal: the future does not leak"


def test_remedies_are_the_library_strategies() -> None:
    from gradguard import clip as gg_clip
    from gradguard.lab.remedies import make_remedy, remedy_label
    from gradguard.stats import grad_stats

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    remedy = make_remedy({"name": "global_norm", "max_norm": 0.1}, model, optimizer)
    assert isinstance(remedy.clipper, gg_clip.GlobalNorm)
    (model(torch.randn(8, 4)) * 100).sum().backward()
    remedy.step(torch.tensor(1.0), grad_stats(model))
    assert float(grad_stats(model).total_norm) == pytest.approx(0.1, rel=1e-4)
    assert remedy.summary() == {"clipped": 1}

    guard = make_remedy({"name": "guard", "clip": {"name": "zclip"}}, model, optimizer)
    assert isinstance(guard.guard.clip, gg_clip.ZClip) and remedy_label({"name": "guard", "clip": {"name": "zclip"}})
    with pytest.raises(ValueError, match="name must be one of"):
        make_remedy({"name": "clip_everything"}, model, optimizer)
