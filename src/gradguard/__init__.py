"""gradguard: see, stop, explain and prevent exploding gradients in PyTorch training."""

from gradguard import clip
from gradguard.clip import ClipResult
from gradguard.stats import GradStats, grad_stats
from gradguard.syncs import count_host_syncs

__all__ = ["ClipResult", "GradStats", "clip", "count_host_syncs", "grad_stats"]
__version__ = "0.1.0"
