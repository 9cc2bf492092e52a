"""The lab: reproduces exploding gradients, their impacts and every remedy on real tasks (``gradguard lab``).

Read it in this order:

* ``tasks.py``: the data (adding and temporal-order problems, digits, a character-level text);
* ``models.py``: tanh RNN, LSTM, deep MLP, small causal transformer;
* ``remedies.py`` and ``training.py``: what happens between ``backward()`` and the update, and the loop;
* ``scenarios/``: one module per claim, each a grid of remedy x seed and the ``run`` of one config;
* ``metrics.py`` and ``record.py``: what one run measured;
* ``runner.py``: the grid's cache, keyed by config hash; ``executors.py``: where the runs execute (local
  processes, Ray tasks); ``run.py``: the whole command;
* ``summary.py``, ``findings.py``, ``console.py``, ``export.py``: tables, "what it shows", the terminal
  summary, ``results.csv`` / ``results.json``; the HTML page is ``gradguard.lab.report``;
* ``sweep.py`` (``gradguard sweep``): the user's own model over learning rates x remedies, its factory
  contract in ``sweep_factory.py``, one run in ``sweep_run.py``, its table and page in ``sweep_report.py``.
"""

from gradguard.lab.run import LabResult, run_lab
from gradguard.lab.sweep import SweepResult, run_sweep
from gradguard.lab.sweep_factory import SweepRun

__all__ = ["LabResult", "SweepResult", "SweepRun", "run_lab", "run_sweep"]
