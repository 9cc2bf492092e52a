"""The lab's tasks. All data is generated or ships with Python / scikit-learn: nothing is downloaded.

* :func:`adding_problem` and :func:`temporal_order_problem`: the long-time-lag problems of Hochreiter &
  Schmidhuber, "Long Short-Term Memory", Neural Computation 1997 (experiments 4 and 6a), with the sequence
  length as a parameter, the benchmarks Pascanu, Mikolov & Bengio 2013 used for exploding gradients.
* :func:`digits_split`: scikit-learn's 8x8 handwritten digits (1797 images), one fixed train/test split.
* :func:`char_corpus`: a character-level language-modelling text: the help topics of the Python
  documentation that ship with every Python (``pydoc_data.topics``), English prose, a few tens of KB.
* :func:`python_source_corpus`: a character-level language-modelling text of code: the source of modules of
  Python's standard library (``inspect``, ``os``, ...), read with ``inspect.getsource``.

Every generator takes a ``torch.Generator``, so a seed fixes the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Temporal order problem: the 8 input symbols and the 4 classes (Hochreiter & Schmidhuber 1997, 6a).
TEMPORAL_ORDER_SYMBOLS = ("a", "b", "c", "d", "B", "E", "X", "Y")
TEMPORAL_ORDER_CLASSES = ("XX", "XY", "YX", "YY")  # the paper calls them Q, R, S, U


def _check_seq_len(seq_len: int, minimum: int, task: str) -> None:
    if not isinstance(seq_len, int) or seq_len < minimum:
        raise ValueError(f"{task}: seq_len must be an int >= {minimum}, got {seq_len!r}")


def adding_problem(n: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The adding problem (Hochreiter & Schmidhuber 1997, experiment 4).

    Each time step is a pair (value, marker). Values are uniform in [-1, 1]. Exactly two pairs are
    marked with 1.0: one chosen among the first 10 pairs (its value is X1), one among the first
    ``seq_len // 2 - 1`` pairs that are still unmarked (X2). The first and last pairs carry the marker
    -1.0 unless marked; all other markers are 0. When the first pair is marked, its value is set to 0
    (the paper's "rare case"; here either marker can land there).

    The paper's target is ``0.5 + (X1 + X2) / 4`` for a sigmoid output unit; here the output is linear
    and the target is the sum ``X1 + X2`` (as in Pascanu et al. 2013). The paper draws lengths in
    [T, T + T/10]; here every sequence has length ``seq_len`` so that a batch is one tensor.

    Returns:
        inputs of shape (n, seq_len, 2) and targets of shape (n, 1), float32.
    """
    _check_seq_len(seq_len, 22, "adding_problem")  # the second marker needs seq_len // 2 - 1 > 10 slots
    values = torch.rand(n, seq_len, generator=generator) * 2.0 - 1.0
    markers = torch.zeros(n, seq_len)
    markers[:, 0] = -1.0
    markers[:, -1] = -1.0
    rows = torch.arange(n)
    first = torch.randint(0, 10, (n,), generator=generator)
    # second: uniform among the first seq_len//2 - 1 positions other than `first`
    offset = torch.randint(0, seq_len // 2 - 2, (n,), generator=generator)
    second = offset + (offset >= first).long()
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    values[rows[(first == 0) | (second == 0)], 0] = 0.0
    inputs = torch.stack([values, markers], dim=-1)
    targets = (values[rows, first] + values[rows, second]).unsqueeze(1)
    return inputs, targets


def temporal_order_problem(n: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The temporal order problem (Hochreiter & Schmidhuber 1997, experiment 6a).

    A sequence starts with ``B`` and ends with ``E``; every other symbol is drawn from {a, b, c, d}
    except at two times ``t1`` and ``t2`` which hold ``X`` or ``Y``. The class is the order of the two:
    XX, XY, YX or YY. The paper uses lengths 100-110 with ``t1`` in [10, 20] and ``t2`` in [50, 60];
    here they scale with the length: ``t1`` in [T/10, 2T/10] and ``t2`` in [5T/10, 6T/10] (inclusive).

    Returns:
        one-hot inputs of shape (n, seq_len, 8) (symbols in :data:`TEMPORAL_ORDER_SYMBOLS` order) and
        class indices of shape (n,), int64, in :data:`TEMPORAL_ORDER_CLASSES` order.
    """
    _check_seq_len(seq_len, 10, "temporal_order_problem")
    symbols = torch.randint(0, 4, (n, seq_len), generator=generator)  # a, b, c, d
    symbols[:, 0] = TEMPORAL_ORDER_SYMBOLS.index("B")
    symbols[:, -1] = TEMPORAL_ORDER_SYMBOLS.index("E")
    rows = torch.arange(n)
    t1 = torch.randint(seq_len // 10, 2 * seq_len // 10 + 1, (n,), generator=generator)
    t2 = torch.randint(5 * seq_len // 10, 6 * seq_len // 10 + 1, (n,), generator=generator)
    first_is_y = torch.randint(0, 2, (n,), generator=generator)
    second_is_y = torch.randint(0, 2, (n,), generator=generator)
    x_index = TEMPORAL_ORDER_SYMBOLS.index("X")
    symbols[rows, t1] = x_index + first_is_y
    symbols[rows, t2] = x_index + second_is_y
    inputs = torch.nn.functional.one_hot(symbols, len(TEMPORAL_ORDER_SYMBOLS)).float()
    targets = 2 * first_is_y + second_is_y
    return inputs, targets


@dataclass
class Split:
    """A train/test split of a classification data set, float32 inputs and int64 labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]


def digits_split(n_train: int | None = None) -> Split:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1], one fixed stratified split (75% / 25%,
    ``random_state=0``). ``n_train`` keeps only the first ``n_train`` training images (a small training
    set, for the regularization scenario); the test set is always the same 450 images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    if n_train is not None:
        if not 1 <= n_train <= len(x_train):
            raise ValueError(f"digits_split: n_train must be in [1, {len(x_train)}], got {n_train}")
        x_train, y_train = x_train[:n_train], y_train[:n_train]
    return Split(x_train, y_train, x_test, y_test)


@dataclass
class CharCorpus:
    """A text encoded as character ids, split 90% / 10% into train and validation."""

    text: str
    vocab: list[str]
    train_ids: Tensor
    val_ids: Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def char_corpus(n_chars: int = 60_000) -> CharCorpus:
    """The first ``n_chars`` characters of the Python documentation's help topics (``pydoc_data.topics``,
    shipped with Python), topics in alphabetical order. Deterministic for a given Python version.
    """
    from pydoc_data.topics import topics

    if n_chars < 1000:
        raise ValueError(f"char_corpus: n_chars must be >= 1000, got {n_chars}")
    text = "\n\n".join(topics[key] for key in sorted(topics))[:n_chars]
    return _encode(text)


#: the standard-library modules whose source :func:`python_source_corpus` reads, in this order
PYTHON_SOURCE_MODULES = ("inspect", "os", "argparse", "dataclasses", "functools", "pathlib", "typing")


def python_source_corpus(n_chars: int = 200_000) -> CharCorpus:
    """The first ``n_chars`` characters of the source of :data:`PYTHON_SOURCE_MODULES`, concatenated
    (Python code, as a user's character-level language model of code would read). Deterministic for a
    given Python version; the last 10% (the end of the last modules read) is the validation text.
    """
    import importlib
    import inspect

    if n_chars < 1000:
        raise ValueError(f"python_source_corpus: n_chars must be >= 1000, got {n_chars}")
    text = "".join(inspect.getsource(importlib.import_module(name)) for name in PYTHON_SOURCE_MODULES)[:n_chars]
    return _encode(text)


def _encode(text: str) -> CharCorpus:
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.int64)
    split = int(0.9 * len(ids))
    return CharCorpus(text, vocab, ids[:split], ids[split:])


def char_batch(ids: Tensor, batch_size: int, context: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows of ``context`` characters and the same windows shifted by one (next-char targets),
    as nanoGPT's ``get_batch``."""
    starts = torch.randint(0, len(ids) - context - 1, (batch_size,), generator=generator)
    x = torch.stack([ids[s : s + context] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + 1 + context] for s in starts.tolist()])
    return x, y
