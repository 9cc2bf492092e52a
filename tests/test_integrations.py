"""Lightning and Hugging Face Trainer callbacks, against the real packages: a NaN step is skipped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

L = pytest.importorskip("lightning")
transformers = pytest.importorskip("transformers")

import lightning_example  # noqa: E402
import transformers_example  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402

import gradguard as gg  # noqa: E402
from gradguard.integrations.lightning import GradGuardCallback as LightningCallback  # noqa: E402
from gradguard.integrations.transformers import GradGuardCallback as HFCallback  # noqa: E402


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --- Lightning ------------------------------------------------------------------------------------


class MemoryLogger(Logger):
    """A Lightning logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))


class ParamsAround(L.Callback):
    """Parameters before and after chosen batches."""

    def __init__(self, batches: tuple[int, ...]):
        self.batches = batches
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx in self.batches:
            self.before[batch_idx] = snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx in self.batches:
            self.after[batch_idx] = snapshot(pl_module)


def test_lightning_skips_the_nan_batch_and_logs_norms() -> None:
    probe, logger = ParamsAround((49, 50)), MemoryLogger()
    module, callback = run_lightning(probe, logger, steps=200, nan_at=50)
    assert same(probe.before[50], probe.after[50])  # the NaN batch changed nothing
    assert not same(probe.before[49], probe.after[49])  # a normal batch does change the weights
    summary = callback.guard.summary()
    assert summary["steps"] == 200 and summary["skipped"] == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    optimizer_steps = {int(s["step"]) for s in callback.guard.optimizer.state.values()}
    assert optimizer_steps == {199}  # AdamW's state did not advance on the skipped step
    logged = {tag for _, metrics in logger.metrics for tag in metrics}
    assert {"gradguard/total_norm", "gradguard/coef", "gradguard/skipped"} <= logged
    assert any(tag.startswith("gradguard_layers/net.") for tag in logged)
    skipped_steps = [step for step, m in logger.metrics if m.get("gradguard/skipped") == 1.0]
    assert skipped_steps == [50]


def run_lightning(probe: ParamsAround, logger: MemoryLogger, steps: int, nan_at: int, **options):
    L.seed_everything(0, verbose=False)
    module = lightning_example.Regressor()
    callback = LightningCallback(log_every=50)
    trainer = L.Trainer(
        callbacks=[callback, probe], logger=logger, max_epochs=1, accelerator="cpu", enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1000, **options,
    )  # fmt: skip
    data = torch.utils.data.DataLoader(lightning_example.batches(steps, nan_at), batch_size=None)
    trainer.fit(module, data)
    return module, callback


def test_lightning_gradient_accumulation_acts_on_boundaries() -> None:
    probe, logger = ParamsAround(()), MemoryLogger()
    _, callback = run_lightning(probe, logger, steps=40, nan_at=-1, accumulate_grad_batches=4)
    assert callback.guard.summary()["steps"] == 10


def test_lightning_refuses_what_it_does_not_support() -> None:
    with pytest.raises(ValueError, match="unknown Guard option 'clip_norm'"):
        LightningCallback(clip_norm=1.0)
    with pytest.raises(ValueError, match="gradient_clip_val=None"):
        run_lightning(ParamsAround(()), MemoryLogger(), steps=4, nan_at=-1, gradient_clip_val=1.0)


# --- Hugging Face Trainer ---------------------------------------------------------------------------


class HFParamsAround(transformers.TrainerCallback):
    def __init__(self, steps: tuple[int, ...]):
        self.steps = steps
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.before[state.global_step] = snapshot(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step - 1 in self.steps:
            self.after[state.global_step - 1] = snapshot(model)


def test_transformers_trainer_skips_the_nan_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = HFParamsAround((9, 10))
    original = transformers.Trainer.__init__

    def with_probe(self, *args, callbacks=None, **kwargs):
        original(self, *args, callbacks=[*(callbacks or []), probe], **kwargs)

    monkeypatch.setattr(transformers.Trainer, "__init__", with_probe)
    trainer, callback = transformers_example.main(steps=30, out=str(tmp_path), nan_at=10)
    assert same(probe.before[10], probe.after[10])
    assert not same(probe.before[9], probe.after[9])
    summary = callback.guard.summary()
    assert summary["steps"] == 30 and summary["skipped"] == 1
    # under the Trainer's clip (max_grad_norm 1.0, now the Guard's) the NaN is named in its own layer
    assert [(r["step"], e["layer"]) for r in callback.guard.history for e in r["events"]
            if e["kind"] == "nonfinite_grad"] == [(10, "transformer.wte")]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.lr_scheduler.last_epoch == 29  # the scheduler did not advance on the skipped step
    logged = [row for row in trainer.state.log_history if "gradguard/total_norm" in row]
    assert len(logged) == 30
    # the Trainer's step numbers: global_step after the optimizer step (the 11th, 0-based 10, is skipped)
    assert [row["step"] for row in logged] == list(range(1, 31))
    assert [row["step"] for row in logged if row["gradguard/skipped"] == 1.0] == [11]


def _tiny_gpt2_trainer(tmp_path: Path, callback: HFCallback, **args: object) -> transformers.Trainer:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=1)
    )
    training_args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-2, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, **args,
    )  # fmt: skip
    return transformers.Trainer(
        model=model, args=training_args, callbacks=[callback],
        train_dataset=transformers_example.token_dataset(48, length=8, vocab=16),
    )  # fmt: skip


def test_transformers_keeps_the_trainers_clip(tmp_path: Path) -> None:
    """The Trainer's ``max_grad_norm`` (1.0 by default) is the Guard's clip: the run equals, bit for bit, one with
    ``max_grad_norm=0`` and ``clip=GlobalNorm(1.0)``, with one guarded step per optimizer step. Regression: the
    callback refused ``max_grad_norm > 0`` and the docs said to set it to 0, so a run that followed them lost the
    Trainer's default clip (a tiny BERT masked LM ended 0.7-1.1% higher, 3 of 3 seeds)."""
    carried = HFCallback()
    trainer = _tiny_gpt2_trainer(tmp_path / "carried", carried)  # max_grad_norm: the Trainer's default, 1.0
    trainer.train()
    assert isinstance(carried.guard.clip, gg.clip.GlobalNorm) and carried.guard.clip.max_norm == 1.0
    summary = carried.guard.summary()
    assert summary["steps"] == 12 and summary["clipped"] > 0, summary  # norms above 1 were clipped
    explicit = HFCallback(clip=gg.clip.GlobalNorm(1.0))
    reference = _tiny_gpt2_trainer(tmp_path / "explicit", explicit, max_grad_norm=0)
    reference.train()
    assert explicit.guard.summary() == summary
    assert same(snapshot(trainer.model), snapshot(reference.model))


def test_transformers_refuses_two_clips(tmp_path: Path) -> None:
    trainer = _tiny_gpt2_trainer(tmp_path, HFCallback(clip=gg.clip.ZClip()), max_grad_norm=0.5)
    with pytest.raises(ValueError, match=r"two clips: set max_grad_norm=0"):
        trainer.train()
