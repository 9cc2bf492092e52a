"""The doctor: where and why gradients explode or vanish, and what to change.

``gg.doctor(model, batch, loss_fn)`` runs one traced forward/backward pass and reports, in one
:class:`DoctorReport`, the gradient flow across depth (``flow.py``) and time (``time_flow.py``), activation
statistics (``activation_stats.py``), an init audit (``init_audit.py``), Jacobian spectral norms
(``jacobian.py``), relative update sizes (``learning_rate.py``) and ranked findings with fixes
(``findings.py``). ``gg.locate_nonfinite`` (``nonfinite.py``) names the module where a NaN or Inf starts;
``gg.suggest_clip_threshold`` (``clip_threshold.py``) gives Pascanu et al. 2013's clipping threshold.
"""

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
