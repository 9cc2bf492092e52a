"""A factory for ``gradguard sweep``: the lab's small GPT on character text, trained with AdamW.

    gradguard sweep examples/sweep_factory.py:build               # 8 lrs x 4 remedies x 2 seeds
    gradguard sweep examples/sweep_factory.py:build --ray         # the same runs as Ray tasks

A training script becomes a factory by moving what it builds before its loop into ``build(lr)`` and
returning it; the sweep runs the loop (with each remedy) itself. The keyword arguments are optional:
``seed`` seeds the batches, ``qk_norm`` and ``z_loss`` let the sweep try the two remedies that need the
model's code (a factory without them gets them listed as "not applicable").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gradguard.lab import SweepRun
from gradguard.lab.models import CausalTransformer
from gradguard.lab.tasks import char_batch, char_corpus
from gradguard.regularize import z_loss as z_loss_of

CONTEXT, BATCH_SIZE = 32, 16


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# --8<-- [start:build]
def build(lr: float, seed: int = 0, qk_norm: bool = False, z_loss: float = 0.0) -> SweepRun:
    corpus = char_corpus()
    model = CausalTransformer(corpus.vocab_size, CONTEXT, d_model=48, n_layer=2, n_head=4, qk_norm=qk_norm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)

    def data(step: int) -> tuple[Tensor, Tensor]:
        return char_batch(corpus.train_ids, BATCH_SIZE, CONTEXT, generator)

    def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
        loss = cross_entropy(logits, targets)
        return loss + z_loss_of(logits, z_loss) if z_loss else loss

    eval_batch = char_batch(corpus.val_ids, 256, CONTEXT, torch.Generator().manual_seed(1))
    return SweepRun(model, optimizer, data, loss_fn, eval_batch=eval_batch, eval_loss_fn=cross_entropy)
# --8<-- [end:build]


if __name__ == "__main__":
    from gradguard.lab.sweep import run_sweep

    result = run_sweep(f"{__file__}:build", points=4, seeds=1, steps=100, out="gradguard-sweep-example")
    print(result.table.read_text())
