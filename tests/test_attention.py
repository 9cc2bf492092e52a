"""Attention instabilities (Wortsman et al. 2023): the recorder's numbers, the doctor's findings, z-loss and
qk-layernorm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradguard as gg
from gradguard.explain.attention import AttentionRecorder, output_log_z
from gradguard.lab.models import CausalTransformer
from gradguard.lab.tasks import char_batch, char_corpus


def explicit_attention(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor) -> tuple[float, list[float]]:
    """Max logit over allowed positions and mean entropy per head, written out by hand."""
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    probs = logits.masked_fill(~allowed, -math.inf).softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # (batch, heads, L)
    return float(logits.masked_fill(~allowed, -math.inf).max()), entropy.mean((0, 2)).tolist()


def test_recorder_matches_explicit_sdpa_attention() -> None:
    model = CausalTransformer(20, 8, 16, n_layer=1, n_head=2)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(30)  # logits far from 0
    ids = torch.randint(0, 20, (3, 8))
    with torch.no_grad(), AttentionRecorder(model) as recorder:
        model(ids)
    [stats] = recorder.stats()
    block = model.blocks[0]
    x = block.ln1(model.tok(ids) + model.pos(torch.arange(8)))
    q, k, _ = block.attn.qkv(x).split(16, dim=2)
    q, k = (t.view(3, 8, 2, 8).transpose(1, 2) for t in (q, k))
    expected_max, expected_entropy = explicit_attention(q.detach(), k.detach(), torch.ones(8, 8).tril().bool())
    assert (stats.module, stats.kind, stats.heads) == ("blocks.0.attn", "sdpa", 2)
    assert stats.max_logit == pytest.approx(expected_max, rel=1e-5)
    assert stats.entropy == pytest.approx(expected_entropy, rel=1e-4, abs=1e-6)
    assert stats.uniform_entropy == pytest.approx(sum(math.log(i + 1) for i in range(8)) / 8, rel=1e-6)


def test_recorder_sees_multihead_attention_with_its_mask() -> None:
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16) * 3
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad(), AttentionRecorder(mha) as recorder:
        mha(x, x, x, attn_mask=causal, is_causal=True)
    [stats] = recorder.stats()
    w_q, w_k, _ = mha.in_proj_weight.chunk(3)
    b_q, b_k, _ = mha.in_proj_bias.chunk(3)
    q = F.linear(x, w_q, b_q).view(2, 5, 4, 4).transpose(1, 2)
    k = F.linear(x, w_k, b_k).view(2, 5, 4, 4).transpose(1, 2)
    expected_max, expected_entropy = explicit_attention(q.detach(), k.detach(), torch.ones(5, 5).tril().bool())
    assert (stats.module, stats.kind, stats.heads) == ("(model)", "multihead", 4)
    assert stats.max_logit == pytest.approx(expected_max, rel=1e-5)
    assert stats.entropy == pytest.approx(expected_entropy, rel=1e-4, abs=1e-6)


def test_recorder_reads_hugging_face_eager_and_sdpa_alike() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=30, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 30, (2, 6))
    measured = {}
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        config._attn_implementation = implementation
        model = transformers.GPT2LMHeadModel(config)
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight.mul_(20)
        with torch.no_grad(), AttentionRecorder(model) as recorder:
            output = model(ids)
        measured[implementation] = recorder.stats()
        assert output_log_z(output).classes == 30
    eager, sdpa = measured["eager"], measured["sdpa"]
    assert [s.module for s in eager] == [s.module for s in sdpa] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert [s.kind for s in eager] == ["softmax", "softmax"] and [s.kind for s in sdpa] == ["sdpa", "sdpa"]
    for a, b in zip(eager, sdpa):
        assert a.max_logit == pytest.approx(b.max_logit, rel=1e-4)
        assert a.entropy == pytest.approx(b.entropy, rel=1e-3, abs=1e-5)


def _train(lr: float, steps: int = 200) -> tuple[nn.Module, torch.optim.Optimizer, tuple, object]:
    corpus = char_corpus(5000)
    torch.manual_seed(0)
    model = CausalTransformer(corpus.vocab_size, 16, 32, n_layer=1, n_head=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    for _ in range(steps):
        inputs, targets = char_batch(corpus.train_ids, 8, 16, generator)
        loss = loss_fn(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer, char_batch(corpus.val_ids, 8, 16, generator), loss_fn


def test_doctor_finds_attention_logit_growth_at_a_high_lr_and_not_at_a_sane_one() -> None:
    model, optimizer, batch, loss_fn = _train(0.1)
    report = gg.doctor(model, batch, loss_fn, optimizer=optimizer, jacobians=False)
    growth = [f for f in report.findings if f.cause == "attention_logits"]
    assert len(growth) == 1 and growth[0].layer == "blocks.0.attn"
    assert report.attention.modules[0].max_logit > 50
    assert "check" in growth[0].evidence  # the fixes were tried on copies (an optimizer was given)
    assert report.to_dict()["attention"]["modules"][0]["module"] == "blocks.0.attn"

    model, optimizer, batch, loss_fn = _train(3e-3)
    report = gg.doctor(model, batch, loss_fn, optimizer=optimizer, jacobians=False)
    assert not [f for f in report.findings if f.cause in ("attention_logits", "output_logits")]
    assert report.attention.modules[0].max_logit < 50
    assert report.attention.log_z is not None and abs(report.attention.log_z.mean) < 20


def test_z_loss_value_gradient_and_errors() -> None:
    logits = torch.randn(2, 3, 7, requires_grad=True)
    value = gg.regularize.z_loss(logits, coef=0.5)
    expected = 0.5 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(value, expected)
    value.backward()
    log_z = torch.logsumexp(logits.detach(), -1, keepdim=True)
    torch.testing.assert_close(logits.grad, 2 * 0.5 * log_z * logits.detach().softmax(-1) / 6)
    assert gg.regularize.z_loss(torch.zeros(4, 5, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match="coef"):
        gg.regularize.z_loss(logits, coef=-1.0)
    with pytest.raises(ValueError, match="logits"):
        gg.regularize.z_loss(torch.ones(3, dtype=torch.int64))


def test_z_loss_pulls_log_z_to_zero() -> None:
    logits = (torch.randn(8, 10) + 30.0).requires_grad_(True)
    optimizer = torch.optim.SGD([logits], lr=1000.0)
    for _ in range(50):
        optimizer.zero_grad()
        gg.regularize.z_loss(logits, coef=1e-2).backward()
        optimizer.step()
    assert torch.logsumexp(logits.detach(), -1).abs().max() < 1.0


def test_qk_layernorm_bounds_the_attention_logits() -> None:
    torch.manual_seed(0)
    head_dim = 8
    norm = gg.qk_norm.QKLayerNorm(head_dim)
    q, k = torch.randn(2, 3, 5, head_dim) * 1e3, torch.randn(2, 3, 5, head_dim) * 1e3
    q_n, k_n = norm(q, k)
    logits = q_n @ k_n.transpose(-2, -1) / math.sqrt(head_dim)
    assert logits.abs().max() <= math.sqrt(head_dim) + 1e-4  # |LN(x)| = sqrt(d) with unit gains, no bias
    assert (q @ k.transpose(-2, -1) / math.sqrt(head_dim)).abs().max() > 1e5
    with pytest.raises(ValueError, match="head_dim=8"):
        norm(torch.randn(2, 4), torch.randn(2, 4))
    model = CausalTransformer(20, 8, 16, n_layer=1, n_head=2, qk_norm=True)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(1e3)
    with torch.no_grad(), AttentionRecorder(model) as recorder:
        model(torch.randint(0, 20, (2, 8)))
    assert recorder.stats()[0].max_logit <= math.sqrt(8) + 1e-4


def test_doctor_measures_a_hugging_face_model_on_a_dict_batch() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=30, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight.mul_(400)  # grown query and key weights
    ids = torch.randint(0, 30, (2, 8))
    report = gg.doctor(model, {"input_ids": ids, "labels": ids}, jacobians=False, check_fixes=False)
    assert [m.module for m in report.attention.modules] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert report.attention.log_z.classes == 30
    [growth] = [f for f in report.findings if f.cause == "attention_logits"]
    assert growth.layer == "transformer.h.1.attn"


def test_doctor_finds_output_logits_far_from_normalised_and_tries_the_z_loss() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        model[2].bias.add_(60.0)  # every logit shifted: the softmax is unchanged, log Z is not
    batch = (torch.randn(32, 8), torch.randint(0, 5, (32,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    report = gg.doctor(model, batch, F.cross_entropy, optimizer=optimizer, jacobians=False)
    [drift] = [f for f in report.findings if f.cause == "output_logits"]
    assert drift.evidence["mean"] > 59 and "z_loss" in drift.fix
    check = drift.evidence["check"]
    assert check["with_z_loss"] < check["without"]  # the z-loss pulls log Z towards 0 on the copy
    assert model[2].bias.min() > 59  # the model itself is left as it was
    assert not [f for f in report.findings if f.cause == "attention_logits"]
