"""Spike forensics: for every bad step, which layer, which samples, whether it reproduces, and a replay.

``gg.Forensics(...)`` (``analysis.py``) is given to the Guard (``Guard(..., forensics=...)``), which hands
it each batch (``guard.step(loss, batch=batch)``) and, on a bad step, asks it to explain the step. The
parts, one per module: ``reproduce.py`` (recompute the step), ``layer.py`` (the origin layer),
``samples.py`` (the samples responsible), ``bundle.py`` (replay bundles and ``gradguard replay``),
``exclude.py`` (leave the named samples out of a resumed run), ``rng.py`` (random-number states),
``replay.py`` (``gradguard replay``: what to blame for a bundled step), ``watch.py`` (``DataWatch``: every
step, the samples whose loss stands out, from the per-sample losses the loop computes). The
batch/loss convention is ``gradguard.batch``'s, shared with the doctor.
"""

from gradguard.forensics.analysis import ANALYSED_KINDS, BadSample, Forensics, ForensicsRecord
from gradguard.forensics.bundle import load_bundle, replay_step
from gradguard.forensics.exclude import ExcludingSampler, exclude
from gradguard.forensics.watch import DataWatch, SuspectSample

__all__ = [
    "ANALYSED_KINDS",
    "BadSample",
    "DataWatch",
    "ExcludingSampler",
    "Forensics",
    "ForensicsRecord",
    "SuspectSample",
    "exclude",
    "load_bundle",
    "replay_step",
]
