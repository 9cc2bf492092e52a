"""gradguard: see, stop, explain and prevent exploding gradients in PyTorch training."""

from gradguard import (
    activations,
    clip,
    detect,
    explain,
    forensics,
    init,
    precursor,
    qk_norm,
    regularize,
    sinks,
    update_size,
)
from gradguard.clip import ClipResult
from gradguard.explain import DoctorReport, doctor, locate_nonfinite, suggest_clip_threshold
from gradguard.forensics import Forensics
from gradguard.guard import Guard
from gradguard.recover import RecoveryPolicy, TrainingDiverged
from gradguard.stats import GradStats, grad_stats
from gradguard.syncs import count_host_syncs

__all__ = [
    "ClipResult",
    "DoctorReport",
    "Forensics",
    "GradStats",
    "Guard",
    "RecoveryPolicy",
    "TrainingDiverged",
    "activations",
    "clip",
    "count_host_syncs",
    "detect",
    "doctor",
    "explain",
    "forensics",
    "grad_stats",
    "init",
    "locate_nonfinite",
    "precursor",
    "qk_norm",
    "regularize",
    "sinks",
    "suggest_clip_threshold",
    "update_size",
]
__version__ = "0.1.0"
