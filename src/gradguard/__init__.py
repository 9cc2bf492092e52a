"""gradguard: see, stop, explain and prevent exploding gradients in PyTorch training."""

from gradguard import clip, detect, sinks
from gradguard.clip import ClipResult
from gradguard.guard import Guard
from gradguard.recover import TrainingDiverged
from gradguard.stats import GradStats, grad_stats
from gradguard.syncs import count_host_syncs

__all__ = [
    "ClipResult",
    "GradStats",
    "Guard",
    "TrainingDiverged",
    "clip",
    "count_host_syncs",
    "detect",
    "grad_stats",
    "sinks",
]
__version__ = "0.1.0"
