"""Explain: where and why gradients explode or vanish, and what to change (``gg.doctor``).

``gg.doctor(model, batch, loss_fn)`` (``diagnose.py``) runs one traced forward/backward pass and reports, in
one :class:`DoctorReport`, the gradient flow across depth (``flow.py``) and time (``time_flow.py``),
activation statistics (``activation_stats.py``), an init audit (``init_audit.py``), Jacobian spectral norms
(``jacobian.py``), relative update sizes (``learning_rate.py``) and ranked findings with fixes
(``findings.py``), each flow fix checked on a copy of the model (``remedies.py``). The pass is recorded by
``gradguard.trace``; ``nn.RNN/GRU/LSTM`` are stepped by hand (``recurrent.py``); ``report.py`` and ``html.py``
render the report, ``factory.py`` loads the CLI's ``module:factory`` target. ``gg.locate_nonfinite``
(``nonfinite.py``) names the module where a NaN or Inf starts; ``gg.suggest_clip_threshold``
(``clip_threshold.py``) gives Pascanu et al. 2013's clipping threshold.

The package is called ``explain`` (the verb it serves) so that ``gg.doctor`` can be the plain function.
"""

from gradguard.explain.clip_threshold import suggest_clip_threshold
from gradguard.explain.diagnose import doctor
from gradguard.explain.findings import Finding
from gradguard.explain.nonfinite import NonfiniteOrigin, TensorStats, locate_nonfinite
from gradguard.explain.report import DoctorReport

__all__ = [
    "DoctorReport",
    "Finding",
    "NonfiniteOrigin",
    "TensorStats",
    "doctor",
    "locate_nonfinite",
    "suggest_clip_threshold",
]
