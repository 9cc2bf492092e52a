"""Lightning: GradGuardCallback in a Trainer run; batch 50 holds a NaN and is skipped.

python examples/lightning_example.py [--steps 300]
"""

from __future__ import annotations

import argparse
import math

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

import gradguard as gg
from gradguard.integrations.lightning import GradGuardCallback


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 1e-2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def batches(steps: int, nan_at: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=gen)
    data = []
    for step in range(steps):
        x = torch.randn(16, 8, generator=gen)
        y = torch.sin(x @ w)
        if step == nan_at:
            x[3, 2] = math.nan
        data.append((x, y))
    return data


def main(steps: int = 300, nan_at: int = 50, **trainer_options) -> tuple[Regressor, GradGuardCallback]:
    L.seed_everything(0, verbose=False)
    module = Regressor()
    # --8<-- [start:callback]
    callback = GradGuardCallback(clip=gg.clip.ZClip(max_grad_norm=None), log_every=50)
    options = {"max_epochs": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, **trainer_options}  # fmt: skip
    trainer = L.Trainer(callbacks=[callback], **options)  # no gradient_clip_val: the Guard clips
    trainer.fit(module, DataLoader(batches(steps, nan_at), batch_size=None))
    print(f"Lightning run: {callback.guard.summary()}")
    # --8<-- [end:callback]
    return module, callback


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
