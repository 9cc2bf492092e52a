"""User names: the prefixes that torch.compile, DDP/DataParallel and FSDP add are removed everywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import gradguard as gg
from gradguard.names import user_name


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("blocks.0.fc.weight", "blocks.0.fc.weight"),
        ("_orig_mod.blocks.0.fc.weight", "blocks.0.fc.weight"),  # torch.compile
        ("module.blocks.0.fc.weight", "blocks.0.fc.weight"),  # DDP / DataParallel
        ("module._orig_mod.fc", "fc"),  # DDP(compile(model))
        ("_orig_mod.module.fc", "fc"),  # compile(DDP(model))
        ("_fsdp_wrapped_module.layers.0._fsdp_wrapped_module.attn.q.weight", "layers.0.attn.q.weight"),
        ("layers.1._checkpoint_wrapped_module.mlp.weight", "layers.1.mlp.weight"),
        ("_dmp_wrapped_module.emb.weight", "emb.weight"),
        ("_orig_mod", ""),  # the wrapped root module itself
        ("module", ""),
        ("", ""),
        ("encoder.module.fc", "encoder.module.fc"),  # a user's submodule called "module" is kept
        ("original_mod.fc", "original_mod.fc"),
    ],
)
def test_user_name_strips_wrapper_segments(raw: str, expected: str) -> None:
    assert user_name(raw) == expected


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def wrapped_models() -> list[tuple[str, nn.Module]]:
    compiled = Net()
    wrapped = Net()
    wrapped.blocks[0] = checkpoint_wrapper(wrapped.blocks[0])
    return [
        ("compile", torch.compile(compiled, backend="eager")),
        ("DataParallel", nn.DataParallel(Net())),
        ("checkpoint_wrapper", wrapped),
    ]


@pytest.mark.parametrize(("kind", "model"), wrapped_models(), ids=[k for k, _ in wrapped_models()])
def test_grad_stats_and_guard_report_the_users_layer_names(kind: str, model: nn.Module) -> None:
    assert any(w in name for name, _ in model.named_parameters() for w in ("_orig_mod", "module"))
    model(torch.randn(3, 4)).sum().backward()
    stats = gg.grad_stats(model)
    assert stats.names == ["blocks.0", "blocks.2", "head"]
    by_param = gg.grad_stats(model, groups="param")
    assert by_param.param_names == [user_name(n) for n, _ in model.named_parameters()]
    assert by_param.names[0] == "blocks.0.weight"

    # a Guard names the poisoned layer by the user's name in its event
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, log_every=1)
    raw = dict(model.named_parameters())
    head_weight = next(p for n, p in raw.items() if user_name(n) == "head.weight")
    head_weight.grad[0, 0] = float("nan")
    guard.step(torch.tensor(1.0))
    guard.flush()
    events = guard.history[-1]["events"]
    assert events, guard.history
    assert {e["layer"] for e in events} == {"head"}, events
