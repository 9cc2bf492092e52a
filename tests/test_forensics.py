"""Spike forensics, driven directly (no Guard): samples, layer, reproducibility, bundles, exclude."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import RandomSampler, SequentialSampler, TensorDataset
from typer.testing import CliRunner

import gradguard as gg
from gradguard.batch import as_batch
from gradguard.cli import app
from gradguard.detect import STEP_KINDS, Detector
from gradguard.forensics import ANALYSED_KINDS, load_bundle, replay_step
from gradguard.forensics.layer import origin_layer
from gradguard.forensics.reproduce import Recomputed, reproduces
from gradguard.forensics.samples import per_sample, responsible, robust_z
from gradguard.stats import grad_stats


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


def regression_batches(steps: int, size: int = 16, corrupt: dict[int, list[int]] | None = None,
                       scale: float = 1e3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A linear teacher; ``corrupt[step]`` lists the positions whose inputs are multiplied by ``scale``
    (NaN when ``scale`` is NaN)."""
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 1, generator=g)
    batches = []
    for step in range(steps):
        x = torch.randn(size, 8, generator=g)
        y = x @ teacher + 0.1 * torch.randn(size, 1, generator=g)
        for i in (corrupt or {}).get(step, []):
            x[i] = x[i] * scale
        batches.append((x, y))
    return batches


def run(model: nn.Module, batches: list, fx: gg.Forensics, lr: float = 0.05,
        hooks: dict[int, object] | None = None) -> dict[int, dict]:
    """A guarded loop in miniature: detect, analyse bad steps, skip them. Returns {step: record}."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    detector = Detector(warmup_steps=5)
    fx.start(None)
    records = {}
    for step, batch in enumerate(batches):
        fx.remember(batch)
        if hooks and step in hooks:
            hooks[step](True)
        loss = F.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        stats = grad_stats(model)
        verdict = detector.update(stats, loss)
        kinds = [k for k, f in zip(STEP_KINDS, verdict.flags.tolist()) if f and k in ANALYSED_KINDS]
        if kinds:
            records[step] = fx.analyse(model, stats, kinds, step, loss) | {"kinds": kinds}
        else:
            opt.step()
        fx.end_step(None if kinds else stats.norms)
        if hooks and step in hooks:
            hooks[step](False)
        opt.zero_grad(set_to_none=True)
        fx.end_call()
    return records


def test_corrupted_samples_named_with_precision_and_recall():
    corrupt = {8: [3], 11: [0, 9], 14: [15], 17: [5, 6, 7], 20: [12]}
    torch.manual_seed(0)
    records = run(mlp(), regression_batches(24, corrupt=corrupt), gg.Forensics(loss_fn=F.mse_loss))
    assert set(corrupt) <= set(records), records.keys()  # other (natural) events count in the precision
    named = {(s, i) for s, r in records.items() for i in r["samples"]}
    truth = {(s, i) for s, ids in corrupt.items() for i in ids}
    precision = len(named & truth) / len(named)
    recall = len(named & truth) / len(truth)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall, named)
    for step in corrupt:
        assert records[step]["reproducible"] is True
        assert records[step]["method"] == "vmap"
        assert records[step]["samples"][0] in corrupt[step]


def test_nonfinite_sample_is_named_and_located():
    torch.manual_seed(0)
    records = run(mlp(), regression_batches(12, corrupt={9: [4]}, scale=math.nan), gg.Forensics(loss_fn=F.mse_loss))
    record = records[9]
    assert "nonfinite_loss" in record["kinds"]
    assert record["samples"] == [4] and record["scores"] == [math.inf]
    assert record["reproducible"] is True
    assert record["origin"] == {"module": "(inputs)", "phase": "forward", "kind": "nan"}


def test_gradient_spike_in_one_layer_is_named():
    torch.manual_seed(0)
    model = mlp()
    state = {"on": False}
    model[2].weight.register_hook(lambda g: g * 1e3 if state["on"] else g)
    records = run(model, regression_batches(14), gg.Forensics(loss_fn=F.mse_loss),
                  hooks={10: lambda on: state.update(on=on)})
    assert records[10]["layer"] == "2"
    assert records[10]["samples"] == []  # no sample stands out: the data is not to blame


def test_transient_fault_is_not_reproducible():
    torch.manual_seed(0)
    model = mlp()
    fired = {"armed": False}

    def once(module, args, output):
        if fired["armed"]:
            fired["armed"] = False
            return output * math.nan
        return output

    model[2].register_forward_hook(once)
    records = run(model, regression_batches(12), gg.Forensics(loss_fn=F.mse_loss),
                  hooks={9: lambda on: fired.update(armed=True) if on else None})
    record = records[9]
    assert "nonfinite_loss" in record["kinds"]
    assert record["reproducible"] is False
    assert record["samples"] == []


def test_bundle_replays_to_live_origin(tmp_path):
    torch.manual_seed(0)

    class LogModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.log = Log()
            self.out = nn.Linear(8, 1)

        def forward(self, x):
            return self.out(self.log(self.fc(x)))

    class Log(nn.Module):
        def forward(self, x):
            return torch.log(x.abs() + 1) * torch.sqrt(1 + x / 1e3)  # NaN when x < -1e3

    model = LogModel()
    batches = regression_batches(10, corrupt={8: [2]}, scale=1e6)
    live, weights = {}, {}
    fx = gg.Forensics(loss_fn=F.mse_loss, bundle_dir=tmp_path)
    original = fx.analyse

    def analyse(model_, stats, kinds, step, loss, *a, **k):
        live[step] = gg.locate_nonfinite(model_, batches[step], F.mse_loss)
        weights[step] = {k: v.clone() for k, v in model_.state_dict().items()}
        return original(model_, stats, kinds, step, loss, *a, **k)

    fx.analyse = analyse
    records = run(model, batches, fx)
    record = records[8]
    assert record["origin"]["module"] == "log" and live[8].module == "log"
    bundle = load_bundle(record["bundle"])
    assert bundle["step"] == 8 and bundle["live"]["kinds"] == record["kinds"]
    fresh = LogModel()
    result = replay_step(bundle, fresh, F.mse_loss)
    assert (result.origin.module, result.origin.phase) == (live[8].module, live[8].phase)
    for name, value in weights[8].items():
        assert torch.equal(fresh.state_dict()[name], value)


def test_max_bundles(tmp_path):
    torch.manual_seed(0)
    corrupt = {6: [1], 8: [2], 10: [3]}
    fx = gg.Forensics(loss_fn=F.mse_loss, bundle_dir=tmp_path, max_bundles=2)
    records = run(mlp(), regression_batches(12, corrupt=corrupt), fx)
    assert [r["bundle"] is not None for r in records.values()] == [True, True, False]
    assert len(list(tmp_path.iterdir())) == 2


def test_analysis_leaves_grads_buffers_and_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
    x, y = regression_batches(1, corrupt={0: [1]})[0]
    fx = gg.Forensics(loss_fn=F.mse_loss)
    fx.start(None)
    fx.remember((x, y))
    F.mse_loss(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    rng_before = torch.get_rng_state()
    record = fx.analyse(model, grad_stats(model), ["grad_spike"], 0, None)
    assert "error" not in record
    assert record["method"] == "loop-eval"  # batch norm: neither vmap nor one sample in training mode
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers))
    assert record["samples"][0] == 1


def test_dict_batch_with_ids_and_accumulation_window():
    class HFLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 1)

        def forward(self, features, labels):
            logits = self.fc(features)
            return {"loss": F.mse_loss(logits, labels), "logits": logits}

    torch.manual_seed(0)
    model = HFLike()
    fx = gg.Forensics(keep=2)
    fx.start(None)
    micro = []
    for k in range(2):
        x, y = regression_batches(1, size=6, corrupt={0: [4] if k else []})[0]
        micro.append({"features": x, "labels": y, "ids": torch.arange(100 * k, 100 * k + 6)})
    for batch in micro:
        fx.remember(batch, before_forward=True)
        (model(**{k: v for k, v in batch.items() if k != "ids"})["loss"] / 2).backward()
    record = fx.analyse(model, grad_stats(model), ["loss_spike"], 0, torch.tensor(1.0))
    assert record["samples"] == [104]
    assert fx.bad_samples == [{"id": 104, "step": 0, "score": record["scores"][0]}]


def test_reproduces_tolerance_and_summed_accumulation():
    rec = Recomputed(loss=2.0, total_norm=10.0, layer_norms=torch.ones(1), order=[0])
    assert reproduces(["grad_spike"], 2.0, 11.0, rec)
    assert not reproduces(["grad_spike"], 2.0, 1e4, rec)
    assert not reproduces(["nonfinite_grad"], math.nan, math.nan, rec)
    assert reproduces(["loss_spike", "grad_spike"], 4.0, 20.0, rec, micro_batches=2)  # a loop that sums


def test_origin_layer_backward_order_and_history():
    names = ["a", "b", "c"]
    history = torch.tensor([[1.0, 1.0, 1.0], [1.1, 0.9, 1.0]])
    norms = torch.tensor([50.0, 1.0, 40.0])
    assert origin_layer(names, norms, history, [2, 1, 0], 4.0, True)[0] == "c"
    assert origin_layer(names, norms, history, [0, 1, 2], 4.0, True)[0] == "a"
    nonfinite = torch.tensor([math.inf, math.nan, 1.0])
    assert origin_layer(names, nonfinite, history, [2, 1, 0], 4.0, True)[0] == "b"
    assert origin_layer(names, torch.ones(3), history, None, 4.0, False) == (None, None)


def test_robust_z_ignores_the_outliers_it_looks_for():
    z = robust_z(torch.tensor([1.0, 1.2, 0.9, 1.1, 1e3, math.nan]))
    assert z[4] > 20 and z[5] == math.inf and z[:4].abs().max() < 2


def test_responsible_names_only_nonfinite_samples_when_there_are_some():
    scores = torch.tensor([0.5, 9.0, math.inf, -1.0, 5.0])
    assert responsible(scores, list("abcde"), 4.0, 8) == (["c"], [math.inf])
    assert responsible(torch.tensor([0.5, 9.0, 5.0, 4.5]), list("abcd"), 4.0, 2) == (["b", "c"], [9.0, 5.0])


def test_per_sample_matches_autograd_one_by_one():
    torch.manual_seed(0)
    model = mlp()
    x, y = regression_batches(1, size=5)[0]
    stats = per_sample(model, as_batch((x, y)), F.mse_loss)
    for i in range(5):
        loss = F.mse_loss(model(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        torch.testing.assert_close(stats.losses[i], loss.detach())
        torch.testing.assert_close(stats.grad_norms[i], norm, rtol=1e-5, atol=1e-6)


def test_exclude_dataset_and_sampler():
    data = TensorDataset(torch.arange(10.0))
    bad = [{"id": 3, "step": 1, "score": 9.0}, 7]
    subset = gg.forensics.exclude(data, bad)
    assert [int(subset[i][0]) for i in range(len(subset))] == [0, 1, 2, 4, 5, 6, 8, 9]
    sampler = gg.forensics.exclude(SequentialSampler(data), bad)
    assert list(sampler) == [0, 1, 2, 4, 5, 6, 8, 9] and len(sampler) == 8
    assert sorted(gg.forensics.exclude(RandomSampler(data), bad)) == [0, 1, 2, 4, 5, 6, 8, 9]
    with pytest.raises(ValueError, match="indices of the dataset"):
        gg.forensics.exclude(data, ["x"])


def test_bad_arguments_and_batches():
    with pytest.raises(ValueError, match="keep must be an int >= 1"):
        gg.Forensics(keep=0)
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        gg.Forensics(loss_fn="mse")
    fx = gg.Forensics()
    with pytest.raises(ValueError, match="needs Forensics\\(loss_fn=...\\)"):
        fx.remember((torch.ones(2, 3), torch.ones(2)))
    with pytest.raises(ValueError, match="guard.step: batch"):
        gg.Forensics(loss_fn=F.mse_loss).remember(torch.ones(3))
    with pytest.raises(ValueError, match="not a gradguard replay bundle"):
        load_bundle(__file__)


LOG_MODEL = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Log(nn.Module):
        def forward(self, x):
            return torch.log(x.abs() + 1) * torch.sqrt(1 + x / 1e3)  # NaN where x < -1e3


    class LogModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.log = Log()
            self.out = nn.Linear(8, 1)

        def forward(self, x):
            return self.out(self.log(self.fc(x)))


    def build():
        torch.manual_seed(5)
        return LogModel(), (torch.randn(4, 8), torch.randn(4, 1)), F.mse_loss
""")


def test_cli_replay(tmp_path):
    factory = tmp_path / "factory.py"
    factory.write_text(LOG_MODEL)
    namespace: dict = {}
    exec(LOG_MODEL, namespace)
    torch.manual_seed(0)
    records = run(namespace["LogModel"](), regression_batches(10, corrupt={8: [2]}, scale=1e6),
                  gg.Forensics(loss_fn=F.mse_loss, bundle_dir=tmp_path / "bundles"))
    runner = CliRunner()
    result = runner.invoke(app, ["replay", records[8]["bundle"], "--model", f"{factory}:build"])
    assert result.exit_code == 1, result.output
    assert "first NAN: output of 'log' in the forward pass" in result.output
    assert "verdict: data: the data: sample(s) 2 (inf) stand out" in result.output
    assert "gg.forensics.exclude(dataset, [2])" in result.output
    result = runner.invoke(app, ["replay", str(factory), "--model", f"{factory}:build"])
    assert result.exit_code == 2 and "not a gradguard replay bundle" in result.output


def test_run_report_shows_forensics():
    from gradguard.report.run import event_rows, render_run_report

    forensics = {"layer": "blocks.2.fc", "samples": [17, 4], "scores": [math.inf, 9.5], "reproducible": False,
                 "origin": None, "bundle": "bad/step00000012.pt"}
    records = [{"step": 12, "loss": 1.0, "total_norm": 3.0, "coef": 1.0, "clip_threshold": None, "skipped": True,
                "clipped": False, "lr": 0.1, "events": [{"step": 12, "kind": "grad_spike", "layer": "blocks.2.fc",
                                                       "action": "skip", "forensics": forensics}]}]
    row = event_rows(records)[0]
    assert row["forensics"] == ("starts in blocks.2.fc; samples 17 (inf), 4 (9.5); did not reproduce (transient); "
                                "bundle bad/step00000012.pt")
    assert "forensics" not in row["details"]
    assert "did not reproduce (transient)" in render_run_report(records)
