"""Trackers against the real libraries: W&B in offline mode (its run file read back), MLflow on a local
SQLite store (read back through MlflowClient), and the framework loggers (HF Trainer with
report_to=["mlflow"], Lightning with MLFlowLogger), the two tracker examples, and DDP (rank 0 logs).

One guarded run (the module's ``run`` fixture) writes to W&B, MLflow and JSON Lines at once; its faults,
each at a known step and layer: step 12 one sample scaled by 1e3 (a spike; forensics names sample 3),
step 19 a NaN gradient in layer "2" (skipped), NaN written into "4.bias" after step 28 (found at the
flush after step 29: a rollback to the snapshot of step 24, whose streak the skipped NaN batch did not
break), step 36 a 30x gradient in layer "4" (clipped).
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradguard as gg
from gradguard.report.run import read_jsonl
from gradguard.sinks.tracker import EVENT_COLUMNS, TrackerWarning

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS, SPIKE_AT, NAN_AT, POISON_AFTER, CLIP_AT = 40, 12, 19, 28, 36


# --- the tracker stores, one per module ------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """W&B offline under a temporary folder; one MLflow SQLite store (creating one takes seconds) with
    an experiment whose artifacts are kept there too."""
    root = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
            patch.setenv(name, str(root / name.lower()))
            os.makedirs(root / name.lower())
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        uri = f"sqlite:///{root / 'mlflow.db'}"
        MlflowClient(uri).create_experiment("gradguard-tests", artifact_location=str(root / "mlartifacts"))
        yield {"root": root, "mlflow_uri": uri, "experiment": "gradguard-tests"}


# --- reading a W&B offline run back ----------------------------------------------------------------

# W&B writes an offline run as one .wandb file: a LevelDB-style log (7-byte header ":W&B", magic 0xBEE1,
# version; then 32 KiB blocks of records, each with a 7-byte header: crc32, length, type 1 full / 2 first /
# 3 middle / 4 last) of its protobuf Records (wandb.proto.wandb_internal_pb2.Record), what `wandb sync`
# uploads. wandb 0.31 no longer ships a Python reader, so this reads the format.
_FILE_HEADER, _RECORD_HEADER, _BLOCK = struct.Struct("<4sHB"), struct.Struct("<IHB"), 32768


def wandb_file_records(path: str) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, _ = _FILE_HEADER.unpack_from(data)
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B run file"
    offset, pending = _FILE_HEADER.size, b""
    while offset + _RECORD_HEADER.size <= len(data):
        left = _BLOCK - offset % _BLOCK
        _, length, kind = _RECORD_HEADER.unpack_from(data, offset)
        if left < _RECORD_HEADER.size or (kind == 0 and length == 0):  # the block's zero padding
            offset += left
            continue
        start = offset + _RECORD_HEADER.size
        pending += data[start : start + length]
        offset = start + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(run_dir: str) -> dict[str, Any]:
    """The history rows, summary, artifacts (name -> manifest entries) of a finished offline run."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    # run.finish() can return before W&B's writer process has written the last records: wait for the run's
    # exit record and a file that stopped growing
    deadline, size = time.monotonic() + 30, -1
    while True:
        records = list(wandb_file_records(path))
        finished = any(r.WhichOneof("record_type") == "exit" for r in records)
        if finished and size == os.path.getsize(path) or time.monotonic() > deadline:
            break
        size = os.path.getsize(path)
        time.sleep(0.2)
    history, summary, artifacts = [], {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
        elif kind == "artifact":
            artifacts[record.artifact.name] = {entry.path: entry for entry in record.artifact.manifest.contents}
    return {"history": history, "summary": summary, "artifacts": artifacts}


# --- one guarded run with every tracker --------------------------------------------------------------


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 1, generator=g)
    out = []
    for step in range(steps):
        x = torch.randn(16, 8, generator=g)
        y = x @ teacher + 0.1 * torch.randn(16, 1, generator=g)
        if step == SPIKE_AT:
            x[3] = x[3] * 1e3
        out.append((x, y))
    return out


def train(sinks: list, syncs: list[int] | None = None) -> gg.Guard:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    fault = {"step": -1}
    model[2].weight.register_hook(lambda g: g * math.nan if fault["step"] == NAN_AT else g)
    model[4].weight.register_hook(lambda g: g * 30.0 if fault["step"] == CLIP_AT else g)
    guard = gg.Guard(model, optimizer, forensics=gg.Forensics(loss_fn=F.mse_loss), log_every=5, layer_every=1,
                     detector=gg.detect.Detector(warmup_steps=8), sinks=sinks)
    for step, batch in enumerate(batches(STEPS)):
        fault["step"] = step
        loss = F.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        with gg.count_host_syncs() as counted:
            guard.step(loss, batch=batch)
        if syncs is not None:
            syncs.append(counted.count)
        optimizer.zero_grad(set_to_none=True)
        if step == POISON_AFTER:
            with torch.no_grad():
                model[4].bias.fill_(math.nan)
    guard.close()
    return guard


@pytest.fixture(scope="module")
def run(store: dict[str, Any]) -> dict[str, Any]:
    root = store["root"]
    wandb_sink = gg.sinks.WandB(project="gradguard-tests", dir=str(root / "wandb_dir"))
    mlflow_sink = gg.sinks.MLflow(tracking_uri=store["mlflow_uri"], experiment=store["experiment"], run_name="run")
    syncs: list[int] = []
    guard = train([gg.sinks.JSONL(root / "run.jsonl"), wandb_sink, mlflow_sink], syncs)
    return {"guard": guard, "wandb": wandb_sink, "mlflow": mlflow_sink, "syncs": syncs,
            "records": read_jsonl(root / "run.jsonl")}


def test_the_run_has_the_four_faults(run: dict[str, Any]) -> None:
    by_step = {r["step"]: r for r in run["records"]}
    summary = run["guard"].summary()
    assert {k: summary[k] for k in ("steps", "skipped", "clipped", "rollbacks", "lr_backoffs")} == {
        "steps": 40, "skipped": 3, "clipped": 1, "rollbacks": 1, "lr_backoffs": 0}
    assert [(e["kind"], e["layer"]) for e in by_step[NAN_AT]["events"]] == [("nonfinite_grad", "2")]
    assert by_step[CLIP_AT]["clipped"] and [e["layer"] for e in by_step[CLIP_AT]["events"]] == ["4"]
    assert [e["to_step"] for e in by_step[POISON_AFTER + 1]["events"] if e["kind"] == "rollback"] == [24]
    assert by_step[SPIKE_AT]["events"][0]["forensics"]["samples"] == [3]
    assert run["wandb"].failures == 0 and run["mlflow"].failures == 0


# --- W&B -------------------------------------------------------------------------------------------


def test_wandb_offline_run_holds_every_step_its_events_and_the_report(run: dict[str, Any]) -> None:
    sink, records = run["wandb"], run["records"]
    assert sink.owns_run and wandb.run is None  # the sink started the run and finished it at close()
    logged = wandb_run(os.path.dirname(sink.run.dir))
    rows = {row["gradguard/step"]: row for row in logged["history"]}
    assert sorted(rows) == list(range(STEPS))  # one row per step, on the Guard's step axis
    assert [s for s, row in rows.items() if row["gradguard/skipped"] == 1] == [SPIKE_AT, NAN_AT, POISON_AFTER + 1]
    nan_row = rows[NAN_AT]
    assert nan_row["gradguard_events/nonfinite_grad/2"] == 1 and math.isnan(nan_row["gradguard/total_norm"])
    assert math.isnan(nan_row["gradguard_layers/2"]) and nan_row["gradguard/layers_nonfinite"] == 1
    clip_row = rows[CLIP_AT]
    assert clip_row["gradguard/clipped"] == 1 and clip_row["gradguard_events/grad_spike/4"] == 1
    assert clip_row["gradguard/coef"] == pytest.approx(records[CLIP_AT]["coef"]) and clip_row["gradguard/coef"] < 1
    assert rows[POISON_AFTER + 1]["gradguard/rollback"] == 1
    assert rows[POISON_AFTER + 1]["gradguard_events/nonfinite_param/4.bias"] == 1
    assert sum(row["gradguard/rollback"] for row in rows.values()) == 1
    histogram = rows[CLIP_AT]["gradguard/layer_norms_log10/values"]
    assert sum(histogram) == 3 and len(histogram) == 64  # three finite layers, 64 bins
    assert rows[0]["gradguard/loss"] == pytest.approx(records[0]["loss"])

    # the events table: W&B's incremental table files, one per flush that added events
    tables = sorted(glob.glob(os.path.join(sink.run.dir, "media", "table", "gradguard", "events_*.table.json")))
    table_rows = [row for path in tables for row in json.loads(Path(path).read_text())["data"]]
    assert json.loads(Path(tables[0]).read_text())["columns"] == list(EVENT_COLUMNS)
    events = [(r[0], r[1], r[2], r[3]) for r in table_rows]
    assert events == [(e["step"], e["kind"], e["layer"] or "", e["action"]) for r in records for e in r["events"]]
    spike = next(r for r in table_rows if r[0] == SPIKE_AT and r[1] == "grad_spike")
    assert spike[EVENT_COLUMNS.index("samples")] == "3" and spike[EVENT_COLUMNS.index("reproducible")] == "yes"

    # at close: the records and the report as an artifact, the counts in the summary
    artifact = logged["artifacts"][f"gradguard-{sink.run.id}"]
    assert set(artifact) == {"run.jsonl", "report.html"}
    report = Path(artifact["report.html"].local_path).read_text(encoding="utf-8")
    assert "gradguard run report" in report and "nonfinite_grad" in report
    assert len(read_jsonl(artifact["run.jsonl"].local_path)) == STEPS
    assert {k: logged["summary"][f"gradguard_summary/{k}"] for k in ("steps", "skipped", "clipped", "rollbacks")} \
        == {"steps": 40, "skipped": 3, "clipped": 1, "rollbacks": 1}


def test_wandb_logs_to_the_users_run_and_leaves_it_open(store: dict[str, Any], tmp_path: Path) -> None:
    user_run = wandb.init(project="gradguard-tests", dir=str(tmp_path))
    try:
        sink = gg.sinks.WandB(layers=gg.sinks.Layers(names=["4"]), report=False)
        assert sink.run is user_run and not sink.owns_run
        train([sink])
        assert sink.failures == 0
        assert wandb.run is user_run  # not finished by the sink
        user_run.log({"user/metric": 1.0})  # the user's run still takes the user's own logs
    finally:
        user_run.finish()
    logged = wandb_run(os.path.dirname(user_run.dir))
    layer_tags = {k for row in logged["history"] for k in row if k.startswith("gradguard_layers/")}
    assert layer_tags == {"gradguard_layers/4"}  # only the named layer
    assert [row["gradguard/step"] for row in logged["history"] if "gradguard/step" in row] == list(range(STEPS))
    assert any("user/metric" in row for row in logged["history"])


def test_a_finished_wandb_run_warns_once_and_training_goes_on(store: dict[str, Any], tmp_path: Path) -> None:
    user_run = wandb.init(project="gradguard-tests", dir=str(tmp_path))
    sink = gg.sinks.WandB(run=user_run)
    user_run.finish()  # while the Guard still writes to it
    with pytest.warns(TrackerWarning, match=r"WandB: logging a flush failed \(UsageError") as caught:
        guard = train([gg.sinks.JSONL(tmp_path / "run.jsonl"), sink])
    assert sum(issubclass(w.category, TrackerWarning) for w in caught) == 1  # once, then counted
    assert sink.failures == 10  # 8 flushes, and the upload and the summary at close
    assert guard.summary()["steps"] == STEPS and len(read_jsonl(tmp_path / "run.jsonl")) == STEPS


def test_wandb_refuses_bad_arguments_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="bins must be an int from 1 to 512"):
        gg.sinks.WandB(bins=513)
    with pytest.raises(ValueError, match="either run or wandb.init arguments"):
        gg.sinks.WandB(run=object(), project="x")
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        gg.sinks.Layers(top_k=-1)


# --- MLflow ----------------------------------------------------------------------------------------


def test_mlflow_run_holds_every_step_its_events_and_the_report(run: dict[str, Any], store: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    sink, records = run["mlflow"], run["records"]
    client = MlflowClient(store["mlflow_uri"])
    mlrun = client.get_run(sink.run_id)
    assert sink.owns_run and mlrun.info.status == "FINISHED"

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(sink.run_id, key)}

    skipped = history("gradguard/skipped")
    assert sorted(skipped) == list(range(STEPS))  # every step, on the Guard's step axis
    assert [s for s, v in skipped.items() if v == 1] == [SPIKE_AT, NAN_AT, POISON_AFTER + 1]
    assert history("gradguard_events/nonfinite_grad/2") == {NAN_AT: 1.0}
    assert math.isnan(history("gradguard/total_norm")[NAN_AT]) and math.isnan(history("gradguard_layers/2")[NAN_AT])
    assert history("gradguard/layers_nonfinite")[NAN_AT] == 1
    assert [s for s, v in history("gradguard/clipped").items() if v == 1] == [CLIP_AT]
    assert history("gradguard/coef")[CLIP_AT] == pytest.approx(records[CLIP_AT]["coef"])
    assert [s for s, v in history("gradguard/rollback").items() if v == 1] == [POISON_AFTER + 1]
    assert history("gradguard_events/nonfinite_param/4.bias") == {POISON_AFTER + 1: 1.0}
    assert history("gradguard/layer_norm_max")[CLIP_AT] == pytest.approx(max(records[CLIP_AT]["layer_norms"].values()))

    files = {f.path for f in client.list_artifacts(sink.run_id, "gradguard")}
    assert files == {"gradguard/events.json", "gradguard/report.html", "gradguard/run.jsonl"}
    table = json.loads(Path(client.download_artifacts(sink.run_id, "gradguard/events.json", str(tmp_path))).read_text())
    assert table["columns"] == list(EVENT_COLUMNS)
    assert [(r[0], r[1], r[2]) for r in table["data"]] == [
        (e["step"], e["kind"], e["layer"] or "") for r in records for e in r["events"]]
    spike = next(r for r in table["data"] if r[0] == SPIKE_AT)
    assert spike[EVENT_COLUMNS.index("samples")] == "3"
    report = Path(client.download_artifacts(sink.run_id, "gradguard/report.html", str(tmp_path))).read_text()
    assert "gradguard run report" in report
    assert {k: mlrun.data.tags[f"gradguard.{k}"] for k in ("skipped", "clipped", "rollbacks")} == {
        "skipped": "3", "clipped": "1", "rollbacks": "1"}


def test_mlflow_sends_at_most_1000_metrics_a_request(store: dict[str, Any]) -> None:
    """60 steps x (11 step scalars + 4 summaries + 40 layers) = 3300 metrics in one flush: MLflow refuses a
    request of more than 1000, so this passes only in batches."""
    layers = {f"block.{i}": float(i + 1) for i in range(40)}
    records = [{"step": s, "loss": 1.0, "total_norm": 2.0, "action": "step", "coef": 1.0, "clip_threshold": None,
                "skipped": False, "clipped": False, "lr": 0.1, "events": [], "layer_norms": layers}
               for s in range(60)]
    records[7]["total_norm"] = math.inf  # an fp16 overflow's norm: MLflow keeps it
    sink = gg.sinks.MLflow(tracking_uri=store["mlflow_uri"], experiment=store["experiment"],
                           layers=gg.sinks.Layers(top_k=40), report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackerWarning)
        sink.write(records)
        sink.close()
    client = MlflowClient(store["mlflow_uri"])
    assert len(client.get_metric_history(sink.run_id, "gradguard_layers/block.39")) == 60
    assert client.get_metric_history(sink.run_id, "gradguard/layer_norm_p50")[0].value == pytest.approx(20.5)
    norms = {m.step: m.value for m in client.get_metric_history(sink.run_id, "gradguard/total_norm")}
    assert norms[7] > 1e308 and norms[6] == 2.0


def test_an_unreachable_mlflow_store_warns_and_training_goes_on(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.warns(TrackerWarning, match="MLflow: could not start or join a run"):
        sink = gg.sinks.MLflow(tracking_uri=f"sqlite:///{blocker}/mlflow.db")
    guard = train([gg.sinks.JSONL(tmp_path / "run.jsonl"), sink])
    assert not sink.active and guard.summary()["steps"] == STEPS
    assert len(read_jsonl(tmp_path / "run.jsonl")) == STEPS


# --- cost --------------------------------------------------------------------------------------------


def test_trackers_add_no_host_read_to_any_step(run: dict[str, Any]) -> None:
    """The same run without the sinks reads the host exactly as often at every step (the flush steps
    included: what the sinks log is already on the host)."""
    bare: list[int] = []
    train([], bare)
    assert run["syncs"] == bare


# --- the frameworks' own loggers --------------------------------------------------------------------


def test_hf_trainer_reports_the_guard_to_mlflow(store: dict[str, Any], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    from gradguard.integrations.transformers import GradGuardCallback

    sys.path.insert(0, str(EXAMPLES))
    import transformers_example

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["mlflow_uri"])
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", store["experiment"])
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=1)
    )
    layer, nan_at = "transformer.h.1.mlp.c_fc", 6  # the Trainer's global_step after it: 7
    fault = {"on": False}
    model.get_submodule(layer).weight.register_hook(lambda g: g * math.nan if fault["on"] else g)

    class Inject(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            fault["on"] = state.global_step == nan_at

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4, max_grad_norm=0, use_cpu=True,
        report_to=["mlflow"], logging_steps=1, save_strategy="no", disable_tqdm=True, run_name="hf",
    )  # fmt: skip
    callback = GradGuardCallback(log_every=5)
    trainer = transformers.Trainer(model=model, args=args, callbacks=[callback, Inject()],
                                   train_dataset=transformers_example.token_dataset(40, length=8, vocab=16))
    trainer.train()
    assert callback.guard.summary()["skipped"] == 1
    client = MlflowClient(store["mlflow_uri"])
    (mlrun,) = client.search_runs([client.get_experiment_by_name(store["experiment"]).experiment_id],
                                  filter_string="attributes.run_name = 'hf'")

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, key)}

    skipped = history("gradguard/skipped")
    assert sorted(skipped) == list(range(1, 11))  # the Trainer's steps, one log row each
    assert [s for s, v in skipped.items() if v == 1] == [nan_at + 1]
    assert history(f"gradguard_events/nonfinite_grad/{layer}") == {nan_at + 1: 1.0}
    grad_norm = history("grad_norm")  # the Trainer's grad_norm again, from the Guard's norm
    assert sorted(grad_norm) == list(range(1, 11)) and math.isnan(grad_norm[nan_at + 1])
    assert grad_norm[1] == pytest.approx(callback.guard.history[0]["total_norm"])
    assert "loss" in mlrun.data.metrics  # the Trainer's own logs are there as before


def test_lightning_forwards_events_and_layer_norms_to_mlflow(store: dict[str, Any]) -> None:
    L = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import MLFlowLogger

    from gradguard.integrations.lightning import GradGuardCallback

    sys.path.insert(0, str(EXAMPLES))
    import lightning_example

    L.seed_everything(0, verbose=False)
    module = lightning_example.Regressor()
    layer, nan_at = "net.2", 9
    fault = {"on": False}
    module.net[2].weight.register_hook(lambda g: g * math.nan if fault["on"] else g)

    class Inject(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            fault["on"] = batch_idx == nan_at

    logger = MLFlowLogger(experiment_name=store["experiment"], tracking_uri=store["mlflow_uri"], run_name="lightning")
    callback = GradGuardCallback(log_every=5, layer_every=1)
    trainer = L.Trainer(callbacks=[callback, Inject()], logger=logger, max_epochs=1, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    trainer.fit(module, torch.utils.data.DataLoader(lightning_example.batches(20, nan_at=-1), batch_size=None))
    assert callback.guard.summary()["skipped"] == 1
    client = MlflowClient(store["mlflow_uri"])

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(logger.run_id, key)}

    assert [s for s, v in history("gradguard/skipped").items() if v == 1] == [nan_at]
    assert history(f"gradguard_events/nonfinite_grad/{layer}") == {nan_at: 1.0}
    layer_norms = history(f"gradguard_layers/{layer}")
    assert sorted(layer_norms) == list(range(20)) and math.isnan(layer_norms[nan_at])
    assert all(math.isfinite(v) for s, v in history("gradguard_layers/net.0").items() if s != nan_at)


# --- the examples ----------------------------------------------------------------------------------


def test_wandb_example_holds_the_skipped_and_the_clipped_step(store: dict[str, Any], tmp_path: Path) -> None:
    sys.path.insert(0, str(EXAMPLES))
    import wandb_example

    guard, tracker = wandb_example.main(steps=60, out=str(tmp_path), nan_at=20, scaled_at=40)
    rows = {r["gradguard/step"]: r for r in wandb_run(os.path.dirname(tracker.run.dir))["history"]}
    assert sorted(rows) == list(range(60))
    assert [s for s, r in rows.items() if r["gradguard/skipped"]] == [20]
    assert rows[20]["gradguard_events/nonfinite_grad/0"] == 1
    assert [s for s, r in rows.items() if r["gradguard/clipped"]] == [40] == [r["step"] for r in guard.history
                                                                              if r["clipped"]]


def test_mlflow_example_holds_the_skipped_and_the_clipped_step(store: dict[str, Any], tmp_path: Path) -> None:
    sys.path.insert(0, str(EXAMPLES))
    import mlflow_example

    guard, tracker = mlflow_example.main(steps=60, out=str(tmp_path), nan_at=20, scaled_at=40,
                                         tracking_uri=store["mlflow_uri"])
    client = MlflowClient(store["mlflow_uri"])
    skipped = {m.step: m.value for m in client.get_metric_history(tracker.run_id, "gradguard/skipped")}
    clipped = {m.step: m.value for m in client.get_metric_history(tracker.run_id, "gradguard/clipped")}
    assert sorted(skipped) == list(range(60)) and [s for s, v in skipped.items() if v] == [20]
    assert [s for s, v in clipped.items() if v] == [40] == [r["step"] for r in guard.history if r["clipped"]]
    assert {f.path for f in client.list_artifacts(tracker.run_id, "gradguard")} == {
        "gradguard/events.json", "gradguard/report.html", "gradguard/run.jsonl"}


# --- DDP: rank 0 logs ------------------------------------------------------------------------------


def ddp_to_mlflow(rank: int) -> dict[str, Any]:
    """2 gloo ranks under DDP, each with an MLflow sink; a NaN gradient in layer "2" on rank 1 only at step 5."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    fault = {"on": False}
    net[2].weight.register_hook(lambda g: g * math.nan if fault["on"] and rank == 1 else g)
    model = nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sink = gg.sinks.MLflow(tracking_uri=os.environ["GRADGUARD_TEST_MLFLOW"], experiment="ddp", run_name="ddp")
    guard = gg.Guard(model, optimizer, log_every=4, layer_every=1, sinks=[sink])
    g = torch.Generator().manual_seed(rank)
    for step in range(10):
        fault["on"] = step == 5
        x = torch.randn(8, 8, generator=g)
        model(x).pow(2).mean().backward()
        guard.step()
        optimizer.zero_grad(set_to_none=True)
    guard.close()
    return {"active": sink.active, "run_id": sink.run_id, "failures": sink.failures}


def test_under_ddp_only_rank_0_logs_and_the_nan_of_rank_1_is_there(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from test_stacks_matrix import run_distributed

    # forked ranks: a file store (no SQLite connection crosses the fork), allowed for this test
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("GRADGUARD_TEST_MLFLOW", str(tmp_path / "mlruns"))
    rank0, rank1 = (r["ddp"] for r in run_distributed((("ddp", ddp_to_mlflow),), str(tmp_path)))
    assert rank0["active"] and rank0["failures"] == 0 and rank0["run_id"]
    assert not rank1["active"] and rank1["run_id"] is None
    client = MlflowClient(str(tmp_path / "mlruns"))
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    skipped = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "gradguard/skipped")}
    assert sorted(skipped) == list(range(10)) and [s for s, v in skipped.items() if v] == [5]
    events = client.get_metric_history(run.info.run_id, "gradguard_events/nonfinite_grad/2")
    assert [(m.step, m.value) for m in events] == [(5, 1.0)]
