"""Forensics inside the Guard: guard.step(loss, batch=...), event["forensics"], guard.bad_samples, costs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradguard as gg
from gradguard.forensics import load_bundle, replay_step
from gradguard.syncs import count_host_syncs


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


def batches(steps: int, corrupt: dict[int, dict[int, float]] | None = None, size: int = 16):
    """Regression batches from a linear teacher; ``corrupt[step] = {position: scale}`` (NaN: a NaN input)."""
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 1, generator=g)
    out = []
    for step in range(steps):
        x = torch.randn(size, 8, generator=g)
        y = x @ teacher + 0.1 * torch.randn(size, 1, generator=g)
        for i, scale in (corrupt or {}).get(step, {}).items():
            x[i] = x[i] * scale
        out.append((x, y))
    return out


def train(model: nn.Module, data: list, forensics: gg.Forensics, fused: bool = False, before=None,
          **options) -> gg.Guard:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    guard = gg.Guard(model, opt, forensics=forensics, log_every=5,
                     detector=gg.detect.Detector(warmup_steps=8), **options)
    for step, batch in enumerate(data):
        if before is not None:
            before(step, model, batch)
        loss = F.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        guard.step(loss, batch=batch)
        opt.zero_grad(set_to_none=True)
    guard.close()
    return guard


def analysed(guard: gg.Guard) -> dict[int, dict]:
    """{step: forensics} of the events that carry forensics (one per step)."""
    return {e["step"]: e["forensics"] for r in guard.history for e in r["events"] if "forensics" in e}


CORRUPT = {12: {3: 1e3}, 15: {0: 1e3, 9: 1e3}, 19: {15: math.nan}, 23: {5: 1e3, 6: 1e3, 7: 1e3},
           27: {12: 1e3}, 31: {2: math.nan, 10: math.nan}}


@pytest.mark.parametrize("fused", [False, True])
def test_corrupted_samples_precision_and_recall_over_a_run(fused):
    torch.manual_seed(0)
    guard = train(mlp(), batches(34, CORRUPT), gg.Forensics(loss_fn=F.mse_loss), fused=fused)
    found = analysed(guard)
    assert set(CORRUPT) <= set(found)
    named = {(step, i) for step, f in found.items() for i in f["samples"]}
    truth = {(step, i) for step, where in CORRUPT.items() for i in where}
    precision, recall = len(named & truth) / len(named), len(named & truth) / len(truth)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    for step in CORRUPT:
        assert found[step]["reproducible"] is True
    assert {(s["step"], s["id"]) for s in guard.bad_samples} == named
    events = [e for r in guard.history for e in r["events"] if e["step"] == 19]
    assert all(e["forensics"]["origin"]["module"] == "(inputs)" for e in events if e["kind"].startswith("nonfinite"))
    assert all(torch.isfinite(p).all() for p in guard.model.parameters())


def test_spike_in_one_layer_is_named():
    torch.manual_seed(0)
    model = mlp()
    state = {"on": False}
    model[2].weight.register_hook(lambda g: g * 1e3 if state["on"] else g)
    guard = train(model, batches(20), gg.Forensics(loss_fn=F.mse_loss),
                  before=lambda step, m, b: state.update(on=step == 14))
    found = analysed(guard)
    assert found[14]["layer"] == "2"
    assert found[14]["samples"] == []


def test_transient_fault_not_reproducible_bad_sample_reproducible():
    torch.manual_seed(0)
    model = mlp()
    armed = {"now": False}

    def once(module, args, output):  # a NaN on the first execution only: the recomputation is clean
        if armed["now"]:
            armed["now"] = False
            return output * math.nan
        return output

    model[2].register_forward_hook(once)
    guard = train(model, batches(22, {18: {4: 1e3}}), gg.Forensics(loss_fn=F.mse_loss),
                  before=lambda step, m, b: armed.update(now=step == 14))
    found = analysed(guard)
    assert found[14]["reproducible"] is False
    assert found[18]["reproducible"] is True and found[18]["samples"] == [4]


def test_bundle_replays_to_the_live_origin(tmp_path):
    torch.manual_seed(0)

    class Sqrt(nn.Module):
        def forward(self, x):
            return torch.sqrt(x + 50.0)  # NaN where x < -50

    model = nn.Sequential(nn.Linear(8, 16), Sqrt(), nn.Linear(16, 1))
    live = {}

    def locate(step, m, batch):
        if step == 12:
            live["origin"] = gg.locate_nonfinite(m, batch, F.mse_loss)

    data = batches(14, {12: {7: 1e4}})
    guard = train(model, data, gg.Forensics(loss_fn=F.mse_loss, bundle_dir=tmp_path), before=locate)
    found = analysed(guard)[12]
    assert live["origin"].module == "1" and found["origin"]["module"] == "1"
    bundle = load_bundle(found["bundle"])
    assert bundle["guard"]["accumulation_steps"] == 1
    result = replay_step(bundle, nn.Sequential(nn.Linear(8, 16), Sqrt(), nn.Linear(16, 1)), F.mse_loss)
    assert (result.origin.module, result.origin.phase) == (live["origin"].module, live["origin"].phase)


def test_accumulation_window_and_ids():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, opt, accumulation_steps=2, forensics=gg.Forensics(loss_fn=F.mse_loss),
                     detector=gg.detect.Detector(warmup_steps=5), log_every=1)
    data = batches(24, {21: {6: 1e3}}, size=8)
    for i, (x, y) in enumerate(data):
        loss = F.mse_loss(model(x), y) / 2
        loss.backward()
        guard.step(loss, batch=(x, y, torch.arange(100 * i, 100 * i + 8)))
        if guard.sync_gradients:
            opt.zero_grad(set_to_none=True)
    found = analysed(guard)
    assert found[10]["samples"] == [2106] and found[10]["reproducible"] is True


def test_healthy_steps_read_nothing_more():
    """A healthy step reads as much with forensics as without on the plain path (the Guard reads the
    event flags anyway), and one value more on the fused path (which otherwise reads none)."""
    for fused, extra in ((False, 0), (True, 1)):
        counts = []
        for forensics in (None, gg.Forensics(loss_fn=F.mse_loss)):
            torch.manual_seed(0)
            model = mlp()
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
            guard = gg.Guard(model, opt, forensics=forensics, log_every=1000)
            for x, y in batches(12):
                F.mse_loss(model(x), y).backward()
                with count_host_syncs() as counter:
                    guard.step(F.mse_loss(model(x), y).detach(), batch=(x, y))
                opt.zero_grad(set_to_none=True)
            counts.append(counter.count)
        assert counts[1] - counts[0] == extra, (fused, counts)


def test_forensics_arguments_checked_before_anything_changes():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="forensics must be a gradguard.Forensics"):
        gg.Guard(model, opt, forensics=True)
    with pytest.raises(ValueError, match="keep=2\\) is less than accumulation_steps=4"):
        gg.Guard(model, opt, accumulation_steps=4, forensics=gg.Forensics(loss_fn=F.mse_loss, keep=2))
    guard = gg.Guard(model, opt, forensics=gg.Forensics(loss_fn=F.mse_loss))
    F.mse_loss(model(torch.ones(2, 8)), torch.ones(2, 1)).backward()
    with pytest.raises(ValueError, match="guard.step: batch"):
        guard.step(torch.tensor(1.0), batch=torch.ones(2, 8))
    assert guard.step_count == 0
    assert gg.Guard(model, opt).bad_samples == []


def test_lightning_callback_passes_the_batch():
    L = pytest.importorskip("lightning")
    from gradguard.integrations.lightning import GradGuardCallback

    class Regressor(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    L.seed_everything(0, verbose=False)
    callback = GradGuardCallback(forensics=gg.Forensics(loss_fn=F.mse_loss, keep=2), log_every=5,
                                 detector=gg.detect.Detector(warmup_steps=5))
    trainer = L.Trainer(callbacks=[callback], max_epochs=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accumulate_grad_batches=2)
    data = batches(24, {17: {3: math.nan}}, size=8)  # micro-batch 17: the second of optimizer step 8
    trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=None))
    assert callback.guard.bad_samples == [{"id": 11, "step": 8, "score": math.inf}]  # 8 + position 3
    with pytest.raises(ValueError, match="keep=2\\) is less than accumulate_grad_batches=4"):
        trainer = L.Trainer(callbacks=[GradGuardCallback(forensics=gg.Forensics(loss_fn=F.mse_loss, keep=2))],
                            max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=4)
        trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=None))


def test_transformers_callback_passes_the_batch(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gradguard.integrations.transformers import GradGuardCallback

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    fired = {"forwards": 0}

    def poison_once(module, args, output):  # a transient fault: NaN embeddings on training forward 6 only
        if module.training:
            fired["forwards"] += 1
            if fired["forwards"] == 7:
                return output * math.nan
        return output

    model.transformer.wte.register_forward_hook(poison_once)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 64, (64,), generator=gen)
    rows = [{"input_ids": ids, "labels": ids} for ids in (starts[:, None] + torch.arange(16)) % 64]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-3, max_grad_norm=0,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    callback = GradGuardCallback(forensics=gg.Forensics(), log_every=4)
    transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()
    found = analysed(callback.guard)
    assert found[6]["reproducible"] is False and found[6]["samples"] == []
