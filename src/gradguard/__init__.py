"""gradguard: see, stop, explain and prevent exploding gradients in PyTorch training."""

from gradguard import clip
from gradguard.clip import ClipResult
from gradguard.stats import GradStats, grad_stats

__all__ = ["ClipResult", "GradStats", "clip", "grad_stats"]
__version__ = "0.1.0"
