"""Thin adapters that put a :class:`gradguard.Guard` in other training loops.

* :mod:`gradguard.integrations.lightning`: ``GradGuardCallback`` for a Lightning ``Trainer``;
* :mod:`gradguard.integrations.transformers`: ``GradGuardCallback`` for a Hugging Face ``Trainer``.

Each callback builds its Guard when training starts and exposes it as ``callback.guard``. The Guard takes
over the optimizer step (it steps or skips), so each adapter routes the framework's call to
``optimizer.step()`` through it.
"""

from __future__ import annotations

import inspect
from typing import Any

from gradguard.guard import Guard


def check_guard_options(options: dict[str, Any], owner: str, reserved: tuple[str, ...]) -> None:
    """Fail at construction, naming the option, rather than when training starts."""
    accepted = set(inspect.signature(Guard).parameters) - {"model", "optimizer", *reserved}
    for name in options:
        if name not in accepted:
            raise ValueError(
                f"{owner}: unknown Guard option {name!r}; accepted: {', '.join(sorted(accepted))}"
            )
