"""The doctor on Hugging Face models (issue 9, points 7 and 8): dict batches with the loss in the output,
per-block Jacobians over the repeated blocks, and an init audit that knows the transformer convention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradguard as gg

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 64


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=VOCAB, max_position_embeddings=16)
    return transformers.BertForSequenceClassification(config)


def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(1))


def test_gpt2_dict_batch_loss_from_output_and_jacobians_per_transformer_layer(gpt2) -> None:
    ids = token_ids()
    batch = {"input_ids": ids, "labels": ids}
    report = gg.doctor(gpt2, batch, jacobian_iterations=3)  # no loss_fn: output.loss
    assert report.verdict == "stable" and report.healthy
    assert report.loss == pytest.approx(float(gpt2(**batch).loss), rel=1e-5)
    assert set(report.jacobian["blocks"]) == {f"transformer.h.{i}" for i in range(4)}
    assert all(value is not None for value in report.jacobian["blocks"].values())
    assert report.jacobian["blocks_covered"] == "the 4 repeated GPT2Block of 'transformer.h'"
    assert gg.locate_nonfinite(gpt2, batch) is None
    # return_dict=False: the output is a tuple whose first item is the loss
    as_tuple = gg.doctor(gpt2, {**batch, "return_dict": False}, jacobians=False)
    assert as_tuple.loss == pytest.approx(report.loss, rel=1e-5)
    threshold = gg.suggest_clip_threshold(gpt2, batch, steps=2)
    assert threshold == pytest.approx(report.total_grad_norm, rel=1e-4)


def test_model_returning_a_dict_with_its_loss() -> None:
    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.fc(x)
            return {"loss": nn.functional.mse_loss(out, y), "out": out}

    batch = {"x": torch.randn(8, 4), "y": torch.randn(8, 1)}
    report = gg.doctor(WithLoss(), batch, jacobians=False)
    assert report.nonfinite is None and [layer.name for layer in report.depth.layers] == ["fc"]
    with pytest.raises(ValueError, match="output must carry a loss"):
        gg.doctor(nn.Linear(4, 1), {"input": torch.randn(8, 4)}, jacobians=False)


def test_resnet_style_stages_are_the_blocks() -> None:
    class Residual(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(width, width, 3, padding=1)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(self.act(x))

    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 4, 3, padding=1))
    model.add_module("layer1", nn.Sequential(Residual(4), Residual(4)))
    model.add_module("layer2", nn.Sequential(Residual(4), Residual(4)))
    model.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model.add_module("head", nn.Linear(4, 3))
    batch = (torch.randn(2, 3, 6, 6), torch.tensor([0, 2]))
    report = gg.doctor(model, batch, nn.functional.cross_entropy, jacobian_iterations=3, check_fixes=False)
    assert set(report.jacobian["blocks"]) == {"layer1", "layer2"}
    assert report.jacobian["blocks_covered"] == "the 2 repeated Sequential of the model"


def test_transformer_init_is_not_off_scale_and_a_tied_head_is_the_embedding(gpt2, bert) -> None:
    """Issue 9.8: BERT's N(0, 0.02) (config.initializer_range) is its convention, not an init error; GPT-2's
    lm_head is transformer.wte itself. Plain (inputs, targets) batches, as earlier versions took them."""
    ids = token_ids()
    labels = torch.tensor([0, 1, 0, 1])
    report = gg.doctor(bert, (ids, labels), lambda out, y: nn.functional.cross_entropy(out.logits, y),
                       jacobians=False)
    assert not any(c.flagged for c in report.init_checks)
    assert not [f for f in report.findings if f.cause == "init_scale"]
    query = next(c for c in report.init_checks if c.layer == "bert.encoder.layer.0.attention.self.query")
    assert query.scheme == "fixed" and query.prescribed == 0.02 and 0.5 < query.ratio < 2
    report = gg.doctor(gpt2, (ids, ids), lambda out, y: nn.functional.cross_entropy(out.logits.flatten(0, 1),
                                                                                     y.flatten()), jacobians=False)
    assert "lm_head" not in [c.layer for c in report.init_checks]
    assert not report.findings
    assert any("'lm_head' shares its weight with the embedding 'transformer.wte'" in note for note in report.notes)
