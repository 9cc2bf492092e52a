"""Hugging Face Trainer: GradGuardCallback on a 2-layer GPT-2 built from a config (nothing downloaded).

At training step 10 a forward hook turns the embeddings into NaN; the Guard skips that step, and the
Trainer's LR scheduler does not advance for it.

    python examples/transformers_example.py [--steps 40] [--out gradguard-out/hf]
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gradguard.integrations.transformers import GradGuardCallback


def token_dataset(n: int, length: int = 32, vocab: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Sequences that count up modulo the vocabulary from a random start: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n,), generator=gen)
    return [{"input_ids": ids, "labels": ids} for ids in ((starts[:, None] + torch.arange(length)) % vocab)]


class PoisonEmbeddings:
    """A forward hook that makes the embedding output NaN on one training forward pass."""

    def __init__(self, at_forward: int):
        self.at_forward = at_forward
        self.forwards = 0

    def __call__(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if module.training:
            self.forwards += 1
            if self.forwards - 1 == self.at_forward:
                return output * math.nan
        return output


def main(
    steps: int = 40, out: str = "gradguard-out/hf", nan_at: int = 10
) -> tuple[Trainer, GradGuardCallback]:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    model.transformer.wte.register_forward_hook(PoisonEmbeddings(nan_at))
    # --8<-- [start:callback]
    args = TrainingArguments(  # max_grad_norm (1.0 by default) is the Guard's clip: GlobalNorm(1.0)
        output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3,
        report_to=[], use_cpu=True, logging_steps=10, save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    callback = GradGuardCallback(log_every=10)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(steps * 8), callbacks=[callback])
    trainer.train()
    print(f"HF Trainer run: {callback.guard.summary()}")
    # --8<-- [end:callback]
    return trainer, callback


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="gradguard-out/hf")
    args = parser.parse_args()
    main(args.steps, args.out)
