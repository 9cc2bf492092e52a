"""The doctor: where and why gradients explode or vanish, and what to change.

``gg.doctor(model, batch, loss_fn)`` runs one traced forward/backward pass and reports, in one
:class:`DoctorReport`, the gradient flow across depth (``flow.py``) and time (``time_flow.py``), activation
statistics (``activation_stats.py``), an init audit (``init_audit.py``), Jacobian spectral norms
(``jacobian.py``), relative update sizes (``learning_rate.py``) and ranked findings with fixes
(``findings.py``), each flow fix checked on a copy of the model (``remedies.py``). The pass is recorded by
``trace.py``; ``nn.RNN/GRU/LSTM`` are stepped by hand (``recurrent.py``); ``report.py`` and ``html.py``
render the report, ``factory.py`` loads the CLI's ``module:factory`` target. ``gg.locate_nonfinite`` (``nonfinite.py``) names the module where a NaN or Inf starts;
``gg.suggest_clip_threshold`` (``clip_threshold.py``) gives Pascanu et al. 2013's clipping threshold.
"""

import sys
import types
from typing import Any

from gradguard.doctor.clip_threshold import suggest_clip_threshold
from gradguard.doctor.diagnose import doctor
from gradguard.doctor.findings import Finding
from gradguard.doctor.nonfinite import NonfiniteOrigin, TensorStats, locate_nonfinite
from gradguard.doctor.report import DoctorReport

__all__ = [
    "DoctorReport",
    "Finding",
    "NonfiniteOrigin",
    "TensorStats",
    "doctor",
    "locate_nonfinite",
    "suggest_clip_threshold",
]


class _CallableModule(types.ModuleType):
    """``gg.doctor(...)`` is the function and ``gradguard.doctor`` the package, at once.

    Binding the function to the package's own name on ``gradguard`` would hide the package, and
    ``import gradguard.doctor.report`` would then fail; a callable package keeps both working.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> DoctorReport:
        return doctor(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
