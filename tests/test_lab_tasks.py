"""The lab's data against the recipes of Hochreiter & Schmidhuber 1997 and the fixed digits split."""

from __future__ import annotations

import pytest
import torch

from gradguard.lab.tasks import (
    TEMPORAL_ORDER_CLASSES,
    TEMPORAL_ORDER_SYMBOLS,
    adding_problem,
    char_batch,
    char_corpus,
    digits_split,
    temporal_order_problem,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("seq_len", [22, 50, 101])
def test_adding_problem_follows_the_recipe(seq_len: int) -> None:
    inputs, targets = adding_problem(2000, seq_len, _gen())
    assert inputs.shape == (2000, seq_len, 2) and targets.shape == (2000, 1)
    values, markers = inputs[..., 0], inputs[..., 1]
    assert values.min() >= -1.0 and values.max() <= 1.0
    marked = markers == 1.0
    assert (marked.sum(dim=1) == 2).all(), "exactly two marked pairs per sequence"
    positions = marked.float().argsort(dim=1, descending=True, stable=True)[:, :2].sort(dim=1).values
    first, second = positions[:, 0], positions[:, 1]
    assert (first < 10).all(), "one marker among the first ten pairs"
    assert (second < seq_len // 2 - 1).all(), "the other among the first T/2 - 1 pairs"
    expected = values.gather(1, positions).sum(dim=1, keepdim=True)
    torch.testing.assert_close(targets, expected, rtol=0, atol=0)
    # all other markers are 0, except the first and last pairs which carry -1 when unmarked
    middle = markers[:, 1:-1]
    assert ((middle == 0) | (middle == 1)).all()
    assert ((markers[:, 0] == -1) | (markers[:, 0] == 1)).all() and (markers[:, -1] == -1).all()
    # the recipe's rare case: when the first pair is marked, X1 is 0
    assert (values[markers[:, 0] == 1, 0] == 0).all()
    assert (markers[:, 0] == 1).any(), "2000 sequences include the rare case"


def test_adding_problem_is_deterministic_and_checks_its_length() -> None:
    a = adding_problem(8, 30, _gen(3))
    b = adding_problem(8, 30, _gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="seq_len"):
        adding_problem(8, 10, _gen())


@pytest.mark.parametrize("seq_len", [20, 100])
def test_temporal_order_problem_follows_the_recipe(seq_len: int) -> None:
    inputs, labels = temporal_order_problem(1000, seq_len, _gen(1))
    assert inputs.shape == (1000, seq_len, 8) and labels.shape == (1000,)
    assert (inputs.sum(dim=-1) == 1).all(), "one-hot symbols"
    symbols = inputs.argmax(dim=-1)
    index = {s: i for i, s in enumerate(TEMPORAL_ORDER_SYMBOLS)}
    assert (symbols[:, 0] == index["B"]).all() and (symbols[:, -1] == index["E"]).all()
    relevant = (symbols == index["X"]) | (symbols == index["Y"])
    assert (relevant.sum(dim=1) == 2).all(), "exactly two X/Y symbols"
    others = symbols[:, 1:-1][~relevant[:, 1:-1]]
    assert (others < 4).all(), "every other symbol is one of a, b, c, d"
    for row in range(1000):
        t1, t2 = relevant[row].nonzero().flatten().tolist()
        assert seq_len // 10 <= t1 <= 2 * seq_len // 10
        assert 5 * seq_len // 10 <= t2 <= 6 * seq_len // 10
        order = TEMPORAL_ORDER_SYMBOLS[symbols[row, t1]] + TEMPORAL_ORDER_SYMBOLS[symbols[row, t2]]
        assert TEMPORAL_ORDER_CLASSES[labels[row]] == order
    assert set(labels.tolist()) == {0, 1, 2, 3}


def test_digits_split_is_fixed() -> None:
    split = digits_split()
    assert len(split.x_train) == 1347 and len(split.x_test) == 450 and split.num_features == 64
    assert split.x_train.max() <= 1.0 and split.x_train.min() >= 0.0
    again = digits_split(n_train=100)
    assert torch.equal(again.x_train, split.x_train[:100]) and torch.equal(again.x_test, split.x_test)
    with pytest.raises(ValueError, match="n_train"):
        digits_split(n_train=0)


def test_char_corpus_and_batches() -> None:
    corpus = char_corpus(5000)
    assert len(corpus.text) == 5000
    assert "".join(corpus.vocab[i] for i in corpus.train_ids[:200].tolist()) == corpus.text[:200]
    x, y = char_batch(corpus.train_ids, 4, 16, _gen())
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the inputs shifted by one character"
    assert char_corpus(5000).text == corpus.text
