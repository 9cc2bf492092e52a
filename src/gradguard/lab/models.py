"""The lab's models: a vanilla tanh RNN, an LSTM, a character-level recurrent language model, a deep MLP and
a small causal transformer.

They are plain ``nn.Module`` s built from standard layers (``nn.RNN``, ``nn.LSTM``, ``nn.Linear``), so
that the doctor and ``gg.init`` recognise them.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard.qk_norm import QKLayerNorm

ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


class TanhRNN(nn.Module):
    """A vanilla (Elman) RNN, ``h_t = tanh(W_ih x_t + W_hh h_{t-1} + b)``, read out from the last state.

    ``spectral_radius`` sets the recurrent matrix to ``rho * Q`` with ``Q`` a random orthogonal matrix,
    so every singular value of ``W_hh`` equals ``rho``. With ``rho > 1`` (above ``1 / gamma`` for tanh,
    gamma = 1) the necessary condition of Pascanu, Mikolov & Bengio 2013 for exploding gradients holds.
    ``None`` keeps torch's default init.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, spectral_radius: float | None = None):
        super().__init__()
        self.rnn = nn.RNN(input_size, hidden_size, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(hidden_size, output_size)
        if spectral_radius is not None:
            if not spectral_radius > 0:
                raise ValueError(f"TanhRNN: spectral_radius must be > 0, got {spectral_radius}")
            with torch.no_grad():
                weight_hh = self.rnn.weight_hh_l0
                assert isinstance(weight_hh, Tensor)
                nn.init.orthogonal_(weight_hh)
                weight_hh.mul_(spectral_radius)

    def forward(self, x: Tensor) -> Tensor:
        states, _ = self.rnn(x)
        return self.head(states[:, -1])


class LSTMModel(nn.Module):
    """An LSTM (Hochreiter & Schmidhuber 1997) read out from its last hidden state; torch's default init."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        states, _ = self.lstm(x)
        return self.head(states[:, -1])


class RecurrentLM(nn.Module):
    """A character-level language model: embedding -> one ``nn.LSTM`` or ``nn.GRU`` layer -> linear
    read-out of the next character at every position (logits ``(batch, time, vocab)``); torch's default
    init, as a user's first recurrent language model would have."""

    CELLS: dict[str, type[nn.LSTM] | type[nn.GRU]] = {"lstm": nn.LSTM, "gru": nn.GRU}

    def __init__(self, vocab_size: int, hidden_size: int, cell: str = "lstm", embedding_size: int = 32):
        super().__init__()
        if cell not in self.CELLS:
            raise ValueError(f"RecurrentLM: cell must be one of {sorted(self.CELLS)}, got {cell!r}")
        self.embed = nn.Embedding(vocab_size, embedding_size)
        self.rnn = self.CELLS[cell](embedding_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, ids: Tensor) -> Tensor:
        states, _ = self.rnn(self.embed(ids))
        return self.head(states)


class DeepMLP(nn.Module):
    """``depth`` hidden blocks ``Linear(width) -> activation``, then a linear output layer.

    Layers are named ``blocks.{i}.linear`` / ``blocks.{i}.act`` and ``out``, so per-layer gradient norms
    read in depth order. Weights keep torch's default init; the scenarios re-initialise them.
    """

    def __init__(self, in_features: int, out_features: int, depth: int, width: int, activation: str):
        super().__init__()
        if depth < 1:
            raise ValueError(f"DeepMLP: depth must be >= 1, got {depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"DeepMLP: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.blocks = nn.ModuleList()
        for i in range(depth):
            block = nn.Sequential()
            block.add_module("linear", nn.Linear(in_features if i == 0 else width, width))
            block.add_module("act", ACTIVATIONS[activation]())
            self.blocks.append(block)
        self.out = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out(x)

    def linear_layers(self) -> list[nn.Linear]:
        """The Linear layers in depth order, output layer last."""
        return [cast(nn.Linear, block.linear) for block in self.blocks] + [self.out]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with ``F.scaled_dot_product_attention``; ``qk_norm`` adds
    qk-layernorm (``gg.qk_norm.QKLayerNorm``, Dehghani et al. 2023) on the queries and keys."""

    def __init__(self, d_model: int, n_head: int, qk_norm: bool = False):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"CausalSelfAttention: d_model ({d_model}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.qk_norm = QKLayerNorm(d_model // n_head) if qk_norm else None
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, time, channels = x.shape
        q, k, v = self.qkv(x).split(channels, dim=2)
        q, k, v = (t.view(batch, time, self.n_head, channels // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(batch, time, channels))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (as GPT-2 / nanoGPT)."""

    def __init__(self, d_model: int, n_head: int, qk_norm: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, qk_norm)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc_out(self.act(self.fc(self.ln2(x))))


class CausalTransformer(nn.Module):
    """A small GPT (Radford et al. 2019; the layout of Karpathy's nanoGPT): token + position embeddings,
    ``n_layer`` pre-LN blocks, a final LayerNorm and a linear head. Returns logits (batch, time, vocab).
    ``qk_norm`` puts qk-layernorm in every attention (the transformers scenario)."""

    def __init__(self, vocab_size: int, context: int, d_model: int = 64, n_layer: int = 2, n_head: int = 4,
                 qk_norm: bool = False):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList([Block(d_model, n_head, qk_norm) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        for module in self.modules():  # GPT-2 init: N(0, 0.02), residual projections scaled by depth
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            assert isinstance(block, Block)
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * n_layer))
            nn.init.normal_(block.fc_out.weight, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.context:
            raise ValueError(f"CausalTransformer: sequence of {ids.shape[1]} tokens, context is {self.context}")
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
