"""The real-stack matrix (issue 9): on the stacks people train with, a bad step is caught and named.

Stacks: eager; ``torch.compile`` (inductor, ``aot_eager`` where no C++ compiler is found); the Hugging Face
Trainer on GPT-2 and BERT built from small configs (bf16, gradient accumulation 2); Lightning
(``bf16-mixed``, accumulation 2); DDP and FSDP2 (``fully_shard``) on 2 gloo ranks, one forked pair of
processes for both. On each, two faults at two known training steps:

* **NaN gradient**: one known layer's gradient turns NaN in the backward pass (a tensor hook on its
  weight; on FSDP2, where the sharded parameter is not the tensor autograd sees, a post-accumulate hook,
  called after the reduce-scatter);
* **forward NaN**: one known module's output turns NaN (a forward hook multiplying it by a 0-d tensor, so
  that switching the fault on does not recompile a compiled model).

and the checks, one test each (see ``CHECKS``): the step is skipped, the weights stay finite and
unchanged by it, the Guard's event names the poisoned layer, and ``gg.locate_nonfinite`` names the layer
(backward) and the module (forward) -- all by the user's names, without ``_orig_mod.``/``module.``.
Each stack is run once (module-scoped fixtures); the checks read its results.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._inductor.config
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradguard as gg

STEPS = 4
GRAD_STEP, FORWARD_STEP = 1, 2  # 0-based optimizer steps that get the NaN gradient / the forward NaN
WORLD = 2


# --- the faults ------------------------------------------------------------------------------------


class Faults:
    """Switchable faults: a NaN gradient in ``grad_param`` and a NaN output of ``forward_module``."""

    def __init__(self, grad_param: torch.Tensor, forward_module: nn.Module, nan_grad_here: bool = True):
        self.grad_scale = torch.ones(())
        self.output_scale = torch.ones(())
        self.nan_grad_here = nan_grad_here  # False: this rank's gradient stays finite (another rank's not)
        if type(grad_param).__name__ == "DTensor":  # FSDP2: after the reduce-scatter, on the local shard
            grad_param.register_post_accumulate_grad_hook(lambda p: p.grad.mul_(self.grad_scale))
        else:
            grad_param.register_hook(lambda g: g * self.grad_scale.to(g.dtype))
        forward_module.register_forward_hook(lambda m, args, out: out * self.output_scale.to(out.dtype))

    def set(self, fault: str | None) -> None:
        self.grad_scale.fill_(math.nan if fault == "grad" and self.nan_grad_here else 1.0)
        self.output_scale.fill_(math.nan if fault == "forward" else 1.0)

    @contextlib.contextmanager
    def on(self, fault: str) -> Iterator[None]:
        self.set(fault)
        try:
            yield
        finally:
            self.set(None)


FAULTS_AT = {GRAD_STEP: "grad", FORWARD_STEP: "forward"}  # the faults of the matrix's runs, by step


def fault_at(step: int) -> str | None:
    return FAULTS_AT.get(step)


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in model.parameters()]


def outcome(record: dict, before: list[torch.Tensor], after: list[torch.Tensor]) -> dict:
    """What a check needs of one faulty step."""
    return {
        "skipped": bool(record["skipped"]),
        "unchanged": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
        "finite": all(bool(torch.isfinite(a).all()) for a in after),
        "kinds": [e["kind"] for e in record["events"]],
        "grad_layers": [e["layer"] for e in record["events"] if e["kind"] == "nonfinite_grad"],
    }


def locate(model: nn.Module, batch: tuple, loss_fn: Callable, faults: Faults, fault: str) -> Any:
    """``(module, phase)`` named by ``gg.locate_nonfinite`` with ``fault`` on, or the error it raised."""
    with faults.on(fault):
        try:
            origin = gg.locate_nonfinite(model, batch, loss_fn)
        except Exception as exc:  # a crash is a result of its own (the doctor's bug 1)
            return f"{type(exc).__name__}: {exc}"
    return None if origin is None else (origin.module, origin.phase)


# --- one small model for eager, compile, Lightning, DDP, FSDP2 --------------------------------------


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


class Net(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(3))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


NET_GRAD_LAYER, NET_FORWARD_MODULE = "blocks.1.fc", "blocks.2.act"


def net_faults(net: Net, nan_grad_here: bool = True) -> Faults:
    return Faults(net.blocks[1].fc.weight, net.blocks[2].act, nan_grad_here)


def net_batch(step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 8, generator=gen)
    return x, x[:, :1].sin()


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


def guarded_steps(model: nn.Module, faults: Faults, rank: int = 0, steps: int = STEPS,
                  faults_at: dict[int, str] = FAULTS_AT, fused: bool = False,
                  **guard_options: Any) -> tuple[gg.Guard, dict[str, dict]]:
    """A plain loop, as nanoGPT's: forward, backward, guard.step, zero_grad(set_to_none=True); then
    close() (which flushes what is left: ``steps`` need not be a multiple of log_every). Returns the Guard
    and the :func:`outcome` of each faulty step, by fault (``faults_at``: step -> ``"grad"``/``"forward"``)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    guard = gg.Guard(model, optimizer, **{"clip": gg.clip.GlobalNorm(1.0), "log_every": 3, **guard_options})
    befores, afters = {}, {}
    for step in range(steps):
        x, y = net_batch(step, rank)
        befores[step] = snapshot(model)
        faults.set(faults_at.get(step))
        loss = mse(model(x), y)
        loss.backward()
        faults.set(None)
        guard.step(loss)
        optimizer.zero_grad(set_to_none=True)
        afters[step] = snapshot(model)
    guard.close()
    return guard, {fault: outcome(guard.history[step], befores[step], afters[step]) for step, fault in faults_at.items()}


def train_net(model: nn.Module, faults: Faults, rank: int = 0) -> dict:
    """:func:`guarded_steps` with the matrix's faults, then ``gg.locate_nonfinite`` on the same model."""
    guard, outcomes = guarded_steps(model, faults, rank)
    return {
        **outcomes,
        "steps": len(guard.history),
        "locate_grad": locate(model, net_batch(0, rank), mse, faults, "grad"),
        "locate_forward": locate(model, net_batch(0, rank), mse, faults, "forward"),
    }


# --- single-process stacks ------------------------------------------------------------------------


def run_eager() -> dict:
    torch.manual_seed(0)
    net = Net()
    return {**train_net(net, net_faults(net)), "grad_layer": NET_GRAD_LAYER, "forward_module": NET_FORWARD_MODULE}


def compile_backend() -> str:
    return "inductor" if shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") else "aot_eager"


def run_compile() -> dict:
    torch.manual_seed(0)
    net = Net()
    faults = net_faults(net)  # hooks before compiling: traced into the graph, switched by tensor values
    compiled = torch.compile(net, backend=compile_backend())
    assert any(name.startswith("_orig_mod.") for name, _ in compiled.named_parameters())
    # one compile thread: on a small CPU machine inductor's pool of compile workers costs more than it saves
    # (measured on the 2-core machine: 53 s vs 83 s wall for a cold compile under load)
    with torch._inductor.config.patch(compile_threads=1):
        result = train_net(compiled, faults)
    return {**result, "grad_layer": NET_GRAD_LAYER, "forward_module": NET_FORWARD_MODULE}


def lightning_steps(steps: int = STEPS, faults_at: dict[int, str] = FAULTS_AT,
                    **guard_options: Any) -> tuple[gg.Guard, dict[str, dict], nn.Module, Faults]:
    """Lightning (``bf16-mixed``, accumulation 2) with the callback; returns its Guard, the :func:`outcome` of
    each faulty step (by fault), the LightningModule and its faults."""
    L = pytest.importorskip("lightning")
    from gradguard.integrations.lightning import GradGuardCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
            return mse(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    class Inject(L.Callback):
        def __init__(self, faults: Faults):
            self.faults = faults
            self.before: dict[int, list[torch.Tensor]] = {}
            self.after: dict[int, list[torch.Tensor]] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            step, micro = divmod(batch_idx, 2)
            if micro == 0:
                self.before[step] = snapshot(pl_module)
            self.faults.set(faults_at.get(step))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.faults.set(None)
            step, micro = divmod(batch_idx, 2)
            if micro == 1:
                self.after[step] = snapshot(pl_module)

    L.seed_everything(0, verbose=False)
    module = Module()
    faults = net_faults(module.net)
    guarded = GradGuardCallback(**{"clip": gg.clip.GlobalNorm(1.0), "log_every": 3, **guard_options})
    inject = Inject(faults)
    trainer = L.Trainer(
        callbacks=[guarded, inject], max_steps=steps, accumulate_grad_batches=2, precision="bf16-mixed",
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    data = [net_batch(i) for i in range(2 * steps)]
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    assert guarded.guard is not None
    outcomes = {fault: outcome(guarded.guard.history[step], inject.before[step], inject.after[step])
                for step, fault in faults_at.items()}
    return guarded.guard, outcomes, module, faults


def run_lightning() -> dict:
    guard, outcomes, module, faults = lightning_steps()
    return {
        **outcomes,
        "steps": len(guard.history),
        "locate_grad": locate(module, net_batch(0), mse, faults, "grad"),
        "locate_forward": locate(module, net_batch(0), mse, faults, "forward"),
        "grad_layer": "net." + NET_GRAD_LAYER,
        "forward_module": "net." + NET_FORWARD_MODULE,
    }


def token_batch(n: int, vocab: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (n, 1), generator=gen) + torch.arange(length)) % vocab


def hf_steps(kind: str, steps: int = STEPS, faults_at: dict[int, str] = FAULTS_AT, **guard_options: Any) -> dict:
    """The Hugging Face Trainer (bf16, accumulation 2) on ``kind`` ("gpt2" or "bert") with the callback: its Guard,
    the :func:`outcome` of each faulty step (``"outcomes"``, by fault), the trainer, model, faults, a batch, a
    loss function and the layer and module the faults poison."""
    transformers = pytest.importorskip("transformers")
    from gradguard.integrations.transformers import GradGuardCallback

    torch.manual_seed(0)
    vocab, length = 32, 8
    ids = token_batch(8 * 2 * steps, vocab, length, seed=0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=length, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
        grad_layer, forward_module = "transformer.h.1.mlp.c_proj", "transformer.h.0.mlp.c_fc"
        data = [{"input_ids": row, "labels": row} for row in ids]
        batch = (ids[:4], ids[:4])

        def loss_fn(output: Any, labels: torch.Tensor) -> torch.Tensor:
            logits = output.logits[:, :-1].flatten(0, 1).float()
            return nn.functional.cross_entropy(logits, labels[:, 1:].flatten())
    else:
        config = transformers.BertConfig(
            vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=length, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_labels=2,
        )  # fmt: skip
        model = transformers.BertForSequenceClassification(config)
        grad_layer, forward_module = "bert.encoder.layer.1.output.dense", "bert.encoder.layer.0.intermediate.dense"
        labels = (ids[:, 0] % 2).long()
        data = [{"input_ids": row, "labels": label} for row, label in zip(ids, labels)]
        batch = (ids[:4], labels[:4])

        def loss_fn(output: Any, labels: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(output.logits.float(), labels)

    faults = Faults(model.get_submodule(grad_layer).weight, model.get_submodule(forward_module))

    class Inject(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.before: dict[int, list[torch.Tensor]] = {}
            self.after: dict[int, list[torch.Tensor]] = {}

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.before[state.global_step] = snapshot(model)
            faults.set(faults_at.get(state.global_step))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            faults.set(None)
            self.after[state.global_step - 1] = snapshot(model)

    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
            bf16=True, use_cpu=True, max_grad_norm=0, learning_rate=1e-3, lr_scheduler_type="constant",
            report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
            dataloader_num_workers=0,
        )  # fmt: skip
        guarded = GradGuardCallback(**{"clip": gg.clip.GlobalNorm(1.0), "log_every": 3, **guard_options})
        inject = Inject()
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[guarded, inject])
        trainer.train()
    assert guarded.guard is not None
    outcomes = {fault: outcome(guarded.guard.history[step], inject.before[step], inject.after[step])
                for step, fault in faults_at.items()}
    model.eval()
    return {"guard": guarded.guard, "outcomes": outcomes, "trainer": trainer, "model": model, "faults": faults,
            "batch": batch, "loss_fn": loss_fn, "grad_layer": grad_layer, "forward_module": forward_module}


def run_hf(kind: str) -> dict:
    run = hf_steps(kind)
    log_history, model, faults = run["trainer"].state.log_history, run["model"], run["faults"]
    return {
        **run["outcomes"],
        "steps": len(run["guard"].history),
        "locate_grad": locate(model, run["batch"], run["loss_fn"], faults, "grad"),
        "locate_forward": locate(model, run["batch"], run["loss_fn"], faults, "forward"),
        "grad_layer": run["grad_layer"],
        "forward_module": run["forward_module"],
        "logged_steps": [row["step"] for row in log_history if "gradguard/total_norm" in row],
        "skipped_steps": [row["step"] for row in log_history if row.get("gradguard/skipped") == 1.0],
        "trainer_grad_norms": [row["grad_norm"] for row in log_history if "grad_norm" in row],
    }


# --- DDP and FSDP2: one forked pair of gloo processes ---------------------------------------------


def run_ddp(rank: int) -> dict:
    torch.manual_seed(0)
    net = Net()
    # the NaN gradient on rank 1 only: the gradient all-reduce spreads it, and the Guard names it on both
    faults = net_faults(net, nan_grad_here=rank == 1)
    model = nn.parallel.DistributedDataParallel(net)
    return {**train_net(model, faults, rank), "grad_layer": NET_GRAD_LAYER, "forward_module": NET_FORWARD_MODULE}


def fsdp2_net() -> Net:
    """The :class:`Net` of seed 0 under FSDP2: each block sharded (``fully_shard``), then the whole."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = Net()
    for block in net.blocks:
        fully_shard(block)
    fully_shard(net)
    return net


def run_fsdp2(rank: int) -> dict:
    net = fsdp2_net()
    # the NaN gradient in rank 1's shard only: the sharded norms combine it, and every rank skips
    faults = net_faults(net, nan_grad_here=rank == 1)
    return {**train_net(net, faults, rank), "grad_layer": NET_GRAD_LAYER, "forward_module": NET_FORWARD_MODULE}


def fsdp2_grad_stats(rank: int) -> dict:
    """gg.grad_stats on an FSDP2 model's DTensor gradients: the norms of the full gradients, on every rank."""
    net = fsdp2_net()
    x, y = net_batch(0)  # the same batch on both ranks
    mse(net(x), y).backward()
    full = {name: p.grad.full_tensor() for name, p in net.named_parameters()}  # a collective too
    result = {}
    for p in (2.0, math.inf):
        stats = gg.grad_stats(net, norm_type=p)
        expected = [
            torch.linalg.vector_norm(torch.cat([g.flatten() for n, g in full.items() if n.rpartition(".")[0] == layer]), p)
            for layer in stats.names
        ]  # fmt: skip
        result[p] = (stats.names, stats.norms.tolist(), [float(e) for e in expected], float(stats.total_norm))
        result[f"{p}-expected-total"] = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in full.values()]), p))
    if rank == 1:  # a NaN in rank 1's shard of one layer: every rank sees that layer, and only it, non-finite
        net.blocks[1].fc.weight.grad.to_local()[0, 0] = math.nan
    stats = gg.grad_stats(net)
    result["nan_layers"] = [n for n, ok in zip(stats.names, torch.isfinite(stats.norms).tolist()) if not ok]
    return result


DISTRIBUTED_RUNS: tuple[tuple[str, Callable[[int], dict]], ...] = (
    ("ddp", run_ddp), ("fsdp2", run_fsdp2), ("fsdp2_grad_stats", fsdp2_grad_stats),
)


def _distributed_worker(rank: int, port: int, out_dir: str, runs: tuple[tuple[str, Callable[[int], dict]], ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, run in runs:
            try:
                results[name] = run(rank)
            except Exception as exc:  # reported by the checks, with the other stack's results kept
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(runs: tuple[tuple[str, Callable[[int], dict]], ...], out_dir: str) -> list[dict]:
    """Each ``(name, run)`` of ``runs`` on ``WORLD`` forked gloo ranks, in turn; per rank, ``{name: run(rank)}``
    (or ``{name: {"error": ...}}``)."""
    if not dist.is_available() or "fork" not in mp.get_all_start_methods():
        pytest.skip("needs torch.distributed with gloo and fork")
    # fork: the children share this process's imports (a spawned child would import torch again)
    mp.start_processes(_distributed_worker, args=(_free_port(), out_dir, runs), nprocs=WORLD, start_method="fork")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> list[dict]:
    return run_distributed(DISTRIBUTED_RUNS, str(tmp_path_factory.mktemp("stacks")))


# --- the matrix -----------------------------------------------------------------------------------

STACKS = ["eager", "compile", "hf-gpt2", "hf-bert", "lightning", "ddp", "fsdp2"]
SINGLE = {
    "eager": run_eager,
    "compile": run_compile,
    "hf-gpt2": lambda: run_hf("gpt2"),
    "hf-bert": lambda: run_hf("bert"),
    "lightning": run_lightning,
}
_cache: dict[str, dict] = {}


@pytest.fixture
def stack_results(request) -> list[dict]:
    """One result per rank (one for single-process stacks); each stack runs once per session."""
    stack = request.param
    if stack in ("ddp", "fsdp2"):
        return [rank[stack] for rank in request.getfixturevalue("distributed_results")]
    if stack not in _cache:
        _cache[stack] = SINGLE[stack]()
    return [_cache[stack]]


def check_skipped(r: dict) -> None:
    assert r["grad"]["skipped"], r["grad"]
    assert r["forward"]["skipped"], r["forward"]
    assert r["steps"] == STEPS  # close() flushed every step


def check_weights(r: dict) -> None:
    for fault in ("grad", "forward"):
        assert r[fault]["finite"] and r[fault]["unchanged"], (fault, r[fault])


def check_guard_event(r: dict) -> None:
    assert "nonfinite_grad" in r["grad"]["kinds"], r["grad"]
    assert r["grad"]["grad_layers"] == [r["grad_layer"]], r["grad"]
    assert "nonfinite_loss" in r["forward"]["kinds"], r["forward"]


def check_locate_grad(r: dict) -> None:
    assert r["locate_grad"] == (r["grad_layer"], "backward"), r["locate_grad"]


def check_locate_forward(r: dict) -> None:
    assert r["locate_forward"] == (r["forward_module"], "forward"), r["locate_forward"]


CHECKS = {
    "skipped": check_skipped,
    "weights": check_weights,
    "guard_event": check_guard_event,
    "locate_grad": check_locate_grad,
    "locate_forward": check_locate_forward,
}

MATRIX = [pytest.param(stack, check, id=f"{stack}-{check}") for stack in STACKS for check in CHECKS]


@pytest.mark.parametrize(("stack_results", "check"), MATRIX, indirect=["stack_results"])
def test_matrix(stack_results: list[dict], check: str) -> None:
    for rank, r in enumerate(stack_results):
        assert "error" not in r, f"rank {rank}: {r['error']}"
        CHECKS[check](r)


@pytest.mark.parametrize("stack", ["hf-gpt2", "hf-bert"])
def test_hf_trainer_logs_at_its_own_step_numbers_and_pays_no_extra_norm_pass(stack: str) -> None:
    if stack not in _cache:
        _cache[stack] = SINGLE[stack]()
    r = _cache[stack]
    assert r["logged_steps"] == list(range(1, STEPS + 1))  # global_step after each optimizer step
    assert r["skipped_steps"] == [GRAD_STEP + 1, FORWARD_STEP + 1]
    # the Trainer's own norm call is the Guard's step now: no second pass, no NaN-spread norm logged
    assert r["trainer_grad_norms"] == []


def test_grad_stats_of_fsdp2_gradients_are_those_of_the_full_gradients(distributed_results) -> None:
    for rank in distributed_results:
        r = rank["fsdp2_grad_stats"]
        assert "error" not in r, r
        for p in (2.0, math.inf):
            names, norms, expected, total = r[p]
            assert names == ["inp", "blocks.0.fc", "blocks.1.fc", "blocks.2.fc", "head"]
            assert norms == pytest.approx(expected, rel=1e-5)
            assert total == pytest.approx(r[f"{p}-expected-total"], rel=1e-5)
        assert r["nan_layers"] == ["blocks.1.fc"]
