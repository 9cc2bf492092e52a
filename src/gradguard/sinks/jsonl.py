"""The JSON Lines sink: the run's source of truth on disk (``gradguard report`` reads it)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import IO

from gradguard.sinks import Record


class JSONL:
    """Writes one JSON object per line (JSON Lines). NaN and infinities are written as ``NaN`` and
    ``Infinity``, as Python's ``json`` does (``json.loads`` reads them back).

    Args:
        path: the file; its folder is created. It is opened here, so that a path that cannot be written
            fails now (``ValueError`` naming it), not at the first flush.
        append: add to an existing file (a resumed run) instead of starting a new one.
    """

    def __init__(self, path: str | os.PathLike[str], append: bool = False):
        self.path = os.fspath(path)
        self.append = append
        try:
            folder = os.path.dirname(self.path)
            if folder:
                os.makedirs(folder, exist_ok=True)
            self._file: IO[str] | None = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
        except OSError as error:
            raise ValueError(f"JSONL: cannot write path {self.path!r}: {error.strerror or error}") from error

    def write(self, records: Sequence[Record]) -> None:
        if self._file is not None and self._replaced():  # deleted or rotated (logrotate): a new file at path
            self._file.close()
            self._file = None
        if self._file is None:  # written to after close(): append, never truncate what was written
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        for record in records:
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash loses at most the rows not yet flushed by the Guard

    def _replaced(self) -> bool:
        """Whether ``path`` no longer names the open file (deleted, or renamed away by a log rotation): two
        ``stat`` calls per flush, so that no record goes silently into a file nobody can open."""
        assert self._file is not None
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return True
        held = os.fstat(self._file.fileno())
        return (at_path.st_ino, at_path.st_dev) != (held.st_ino, held.st_dev)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"JSONL({self.path!r})"
