"""MLflow: the plain-PyTorch run (a NaN batch skipped, a scaled one clipped) logged to an MLflow run.

    python examples/mlflow_example.py [--steps 200] [--out gradguard-out/mlflow]
    mlflow ui --backend-store-uri sqlite:///gradguard-out/mlflow/mlflow.db

A local SQLite tracking store under ``--out`` by default (``--tracking-uri`` for a server). The one line that
adds MLflow to a Guard is ``gg.sinks.MLflow()`` (the active run, or a new one); the run then holds every
step's ``gradguard/*`` metrics at the Guard's step, the events as ``gradguard_events/<kind>/<layer>`` and
``gradguard/events.json``, the per-layer norms summarised (``gradguard/layer_norm_p50`` ...), and at the end
``gradguard/run.jsonl`` and ``gradguard/report.html``.
"""

from __future__ import annotations

import argparse
import os

import plain_pytorch

import gradguard as gg


def main(steps: int = 200, out: str = "gradguard-out/mlflow", nan_at: int = 40, scaled_at: int = 80,
         tracking_uri: str | None = None) -> tuple[gg.Guard, gg.sinks.MLflow]:
    os.makedirs(out, exist_ok=True)
    uri = tracking_uri or f"sqlite:///{os.path.abspath(os.path.join(out, 'mlflow.db'))}"
    # --8<-- [start:tracker]
    tracker = gg.sinks.MLflow(tracking_uri=uri, experiment="gradguard-example",
                              artifact_location=os.path.abspath(os.path.join(out, "artifacts")))
    # --8<-- [end:tracker]
    guard = plain_pytorch.main(steps, out, nan_at, scaled_at, sinks=[tracker])
    print(f"MLflow run {tracker.run_id}: {tracker.totals}; mlflow ui --backend-store-uri {uri}")
    return guard, tracker


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="gradguard-out/mlflow")
    parser.add_argument("--tracking-uri", default=None, help="an MLflow tracking server or store")
    args = parser.parse_args()
    main(args.steps, args.out, tracking_uri=args.tracking_uri)
