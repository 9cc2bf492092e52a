""""What it shows": each scenario's paragraph, written from the measured numbers when the report is rendered.

Nothing here is a pre-written conclusion: every sentence is chosen by comparing numbers in the rows
(``summary.py``) and records, and states those numbers, including when they contradict the claim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from gradguard.lab.lr_sweep import early_warning, lr_sensitivity
from gradguard.lab.scenarios import Record

Row = dict[str, Any]


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for prose: 3 significant digits, scientific when very large or small; "n/a" for None."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _rows_by_variant(rows: list[Row]) -> dict[str, Row]:
    return {row["variant"]: row for row in rows}


def flow_ratio(record: Record) -> float | None:
    """Gradient norm at the first layer over that at the last, at init (> 1: grows towards the input)."""
    norms = (record.get("layer_flow") or {}).get("norms") or []
    norms = [n for n in norms if n is not None]
    if len(norms) < 2 or not norms[-1] or not all(math.isfinite(n) for n in (norms[0], norms[-1])):
        return None
    return norms[0] / norms[-1]


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman rank correlation (Pearson on ranks, ties averaged); None with < 3 points or no spread."""
    if len(x) < 3:
        return None

    def ranks(values: list[float]) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        result = np.empty(len(values))
        result[order] = np.arange(len(values))
        array = np.asarray(values)
        for value in np.unique(array):  # average the ranks of ties
            result[array == value] = result[array == value].mean()
        return result

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def depth_findings(rows: list[Row], records: list[Record]) -> list[str]:
    lines = []
    by_variant = _rows_by_variant(rows)
    for activation in ("sigmoid", "tanh", "relu"):
        group = [  # the initializations alone ("relu / He"), not the Guard's rows ("relu / He / Guard ...")
            row for row in rows
            if row["variant"].startswith(activation + " /") and row["variant"].count(" / ") == 1 and row["runs"]
        ]
        if not group:
            continue
        best = max(group, key=lambda row: row["test_accuracy"] or 0.0)
        worst = min(group, key=lambda row: row["test_accuracy"] or 0.0)
        ratios = {}
        for row in group:
            values = [v for r in records if r["config"]["variant"] == row["variant"] and (v := flow_ratio(r)) is not None]
            ratios[row["variant"]] = float(np.median(values)) if values else None
        verdicts = {}
        for row in group:
            flows = [r.get("layer_flow") or {} for r in records if r["config"]["variant"] == row["variant"]]
            found = sorted({flow["verdict"] for flow in flows if flow.get("verdict")})
            if found:
                verdicts[row["variant"].split(" / ")[1]] = "/".join(found)
        normal = by_variant.get(f"{activation} / N(0,1)")
        text = (
            f"{activation}: the best initialization is {best['variant'].split(' / ')[1]} "
            f"(test accuracy {pct(best['test_accuracy'])}), the worst {worst['variant'].split(' / ')[1]} "
            f"({pct(worst['test_accuracy'])})."
        )
        if normal is not None:
            ratio = ratios.get(normal["variant"])
            text += (
                f" With N(0,1) weights the gradient at the first layer is {fmt(ratio)}x the last layer's at "
                f"init, and {normal['diverged']}/{normal['runs']} runs diverged."
            )
        others = [v for k, v in ratios.items() if (normal is None or k != normal["variant"]) and v is not None]
        if others:
            text += f" The other initializations give first/last ratios from {fmt(min(others))} to {fmt(max(others))}."
        if verdicts:
            text += " Doctor's verdict at init: " + ", ".join(f"{k} {v}" for k, v in verdicts.items()) + "."
        lines.append(text)
    exploding = [row for row in rows if row["variant"].endswith("N(0,1)") and row["runs"]]
    if exploding:
        failed = sum(1 for row in exploding if row["diverged"] or (row["test_accuracy"] or 0) < 0.5)
        lines.append(
            f"Claim check: N(0,1) init failed (diverged or test accuracy below 50%) for {failed} of "
            f"{len(exploding)} activations."
        )
    return lines


def language_model_findings(rows: list[Row], records: list[Record]) -> list[str]:
    """The healthy recurrent language model: per model, the Guard's test loss against the same seeds' without
    a remedy (the change per seed), and how many steps its clip touched."""
    lines = []
    for row in rows:
        prefix, _, remedy = row["variant"].partition(" / ")
        if remedy != GUARD_DEFAULTS:
            continue
        pairs = []
        for record in records:
            if record["config"]["variant"] != row["variant"]:
                continue
            twin = next((r for r in records if r["config"]["variant"] == f"{prefix} / no remedy"
                         and r["config"]["seed"] == record["config"]["seed"]), None)
            if twin is not None and record.get("test_loss") and twin.get("test_loss"):
                pairs.append((twin["test_loss"], record["test_loss"], (record.get("remedy_summary") or {}).get("clipped")))
        if not pairs:
            continue
        changes = [guarded / plain - 1 for plain, guarded, _ in pairs]
        lines.append(
            f"{prefix}, a healthy run: test loss without a remedy -> with {GUARD_DEFAULTS}, per seed: "
            + ", ".join(f"{plain:.4f} -> {guarded:.4f}" for plain, guarded, _ in pairs)
            + f" (change {', '.join(f'{100 * c:+.2f}%' for c in changes)}; clipped steps "
            + ", ".join(str(clipped) for _, _, clipped in pairs)
            + f" of {records[0]['config']['steps']}). Claim check (the default clip costs a healthy recurrent model at "
            f"most 1% of test loss): {'holds' if max(changes) <= 0.01 else 'does not hold'} on these seeds."
        )
    return lines


def recurrence_findings(rows: list[Row], records: list[Record]) -> list[str]:
    rows = [row for row in rows if row["runs"]]
    if not rows:
        return []
    if records and records[0]["config"].get("task") == "language_model":
        return language_model_findings(rows, records)
    lines = []
    baseline = next((row for row in rows if row["variant"] == "no remedy"), None)
    ranked = sorted(rows, key=lambda row: (-(row.get("solved") or 0), row["steps_to_target"] or math.inf))
    best = ranked[0]
    task = records[0]["config"].get("task") if records else None
    criterion = {
        "temporal_order": "accuracy of at least 99% on 1000 held-out sequences",
        "adding": "mean squared error of at most 0.01 on 1000 held-out sequences",
    }.get(str(task), "the held-out score")
    lines.append(
        f"Solved means {criterion}. Success rate: "
        + "; ".join(f"{row['variant']} {row.get('solved', 0)}/{row['runs']}" for row in ranked)
        + "."
    )
    if baseline is not None:
        low, high = baseline["solved_interval"]
        beaten = [
            row["variant"] for row in rows if row is not baseline and row["solved_interval"][0] > high
        ]
        lines.append(
            f"Without a remedy the tanh RNN solved {baseline.get('solved', 0)}/{baseline['runs']} runs "
            f"(95% interval {pct(low)}-{pct(high)}); its largest gradient norm was {fmt(baseline['max_grad_norm'])}. "
            + (
                f"Remedies whose interval lies entirely above it: {', '.join(beaten)}."
                if beaten
                else "No remedy's interval lies entirely above it with this many seeds."
            )
        )
    if best["reached_target"]:
        lines.append(
            f"Fastest to solve: {best['variant']} (median {fmt(best['steps_to_target'])} steps to a running-mean "
            f"training loss at target, reached in {best['reached_target']}/{best['runs']} runs)."
        )
    else:
        lines.append("No variant brought its running-mean training loss down to the target.")
    by_seed = {  # the same seed gives the same initial RNN whatever the remedy: one flow per seed
        r["config"]["seed"]: (r.get("layer_flow") or {}).get("time")
        for r in records
        if r["config"].get("model") == "tanh RNN"
    }
    rnn_flows = [flow for flow in by_seed.values() if flow and flow.get("verdict")]
    if rnn_flows:
        verdicts = sorted({flow["verdict"] for flow in rnn_flows})
        growths = [flow["total_growth"] for flow in rnn_flows if flow.get("total_growth") is not None]
        lines.append(
            f"At initialization the doctor finds the tanh RNN's gradient through time {'/'.join(verdicts)} "
            f"for {len(rnn_flows)} of {len(by_seed)} seeds (||dL/dh_t|| grows by a median factor of "
            f"{fmt(float(np.median(growths)) if growths else None)} from the last step back to the first)."
        )
    threshold = next((row["clip_threshold"] for row in rows if row.get("clip_threshold")), None)
    if threshold is not None:
        lines.append(
            f"The Pascanu threshold (average gradient norm over 20 batches at init; mean over seeds) was {fmt(threshold)}."
        )
    return lines


def learning_rate_findings(rows: list[Row], records: list[Record]) -> list[str]:
    rows = [row for row in rows if row["runs"]]
    if not rows:
        return []
    lines = []
    baseline = rows[0]
    lines.append(
        f"At a sane learning rate ({baseline['variant']}) the final training loss is {fmt(baseline['final_loss'])} "
        f"with oscillation index {fmt(baseline['oscillation_index'])}."
    )
    sane_lr = baseline["variant"].split(" / ")[0]
    high = [row for row in rows if row["variant"].split(" / ")[0] != sane_lr]
    # runs that blew up to NaN stopped early on a monotone rise: their index says nothing about oscillation
    oscillating = [row for row in high if row["oscillation_index"] is not None and row["params_finite"] == row["runs"]]
    if oscillating and baseline["oscillation_index"]:
        calm = min(oscillating, key=lambda row: row["oscillation_index"])
        wild = max(oscillating, key=lambda row: row["oscillation_index"])
        lines.append(
            f"At the high learning rate, among runs that kept finite weights, the oscillation index ranges from {fmt(calm['oscillation_index'])} "
            f"({calm['variant']}) to {fmt(wild['oscillation_index'])} ({wild['variant']}), "
            f"{fmt(calm['oscillation_index'] / baseline['oscillation_index'])}x to "
            f"{fmt(wild['oscillation_index'] / baseline['oscillation_index'])}x the sane run's."
        )
    finite = [row for row in high if row["diverged"] == 0]
    diverged = [row for row in high if row["diverged"] > 0]

    def median_final(variant: str, keep) -> str:
        values = [r["final_loss"] for r in records if r["config"]["variant"] == variant and keep(r)]
        values = [v for v in values if v is not None]
        return fmt(float(np.median(values)) if values else None)

    def stuck(record: Record) -> bool:  # diverged, weights finite, loss still above F x its initial value
        return bool(record.get("diverged")) and bool(record.get("params_finite")) and not record.get("recovered")

    stuck_rows = [row for row in diverged if any(stuck(r) for r in records if r["config"]["variant"] == row["variant"])]
    if stuck_rows:
        lines.append(
            "Kept finite weights, yet ended with a loss above 10x its initial value: "
            + ", ".join(
                f"{row['variant']} ({sum(stuck(r) for r in records if r['config']['variant'] == row['variant'])} "
                f"run(s), median final loss {median_final(row['variant'], stuck)})"
                for row in stuck_rows
            )
            + "."
        )
    if diverged:
        lines.append(
            "Diverged at the high learning rate: "
            + "; ".join(
                f"{row['variant']} ({row['diverged']}/{row['runs']}"
                + (
                    f", {row['recovered']} recovered, median final loss of those "
                    f"{median_final(row['variant'], lambda r: bool(r.get('recovered')))}"
                    if row["recovered"] else ""
                )
                + ")"
                for row in diverged
            )
            + "."
        )
    if finite:
        best = min(finite, key=lambda row: row["final_loss"] if row["final_loss"] is not None else math.inf)
        lines.append(
            "Never diverged: "
            + "; ".join(
                f"{row['variant']} (final loss {fmt(row['final_loss'])}, oscillation {fmt(row['oscillation_index'])})"
                for row in finite
            )
            + f". Best: {best['variant']}, "
            + (
                "as good as or better than the sane learning rate."
                if (best["final_loss"] or math.inf) <= (baseline["final_loss"] or 0)
                else f"{fmt((best['final_loss'] or math.inf) / (baseline['final_loss'] or 1))}x the sane run's loss."
            )
        )
    return lines


def regularization_findings(rows: list[Row], records: list[Record]) -> list[str]:
    rows = [row for row in rows if row["runs"]]
    if not rows:
        return []
    lines = [
        "; ".join(
            f"{row['variant']}: gap {pct(row['generalization_gap'])} (train {pct(row['train_accuracy'])}, "
            f"test {pct(row['test_accuracy'])}), weight norm {fmt(row['final_weight_norm'])}, "
            f"median / largest gradient norm {fmt(row['median_grad_norm'])} / {fmt(row['max_grad_norm'])}"
            for row in rows
        )
        + "."
    ]
    finished = [r for r in records if "error" not in r and r.get("generalization_gap") is not None]
    pairs = [(r["max_grad_norm"], r["generalization_gap"]) for r in finished if r.get("max_grad_norm") is not None]
    rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
    median_pairs = [(r["median_grad_norm"], r["generalization_gap"]) for r in finished if r.get("median_grad_norm")]
    rho_median = spearman([p[0] for p in median_pairs], [p[1] for p in median_pairs])
    smallest_gap = min(rows, key=lambda row: row["generalization_gap"] if row["generalization_gap"] is not None else 1)
    largest_norm = max(rows, key=lambda row: row["max_grad_norm"] or 0)
    supports = rho is not None and rho > 0.5 and smallest_gap["variant"] != largest_norm["variant"]
    lines.append(
        f"Across all {len(pairs)} runs the Spearman correlation between the largest gradient norm and the "
        f"train/test gap is {fmt(rho, 2)} (with the median gradient norm: {fmt(rho_median, 2)}; the norms are "
        f"those of the penalised loss, the gradient the optimizer follows). The smallest gap is {smallest_gap['variant']}'s; the largest "
        f"gradient norms are {largest_norm['variant']}'s. "
        + (
            "These numbers are consistent with larger gradients going with more overfitting."
            if supports
            else "These numbers do not support the claim that larger gradients go with more overfitting here."
        )
    )
    return lines


def faults_findings(rows: list[Row], records: list[Record]) -> list[str]:
    rows = [row for row in rows if row["runs"]]
    by_variant = _rows_by_variant(rows)
    lines = []
    clean = by_variant.get("clean / no remedy")
    if clean is not None:
        lines.append(f"Without faults the run reaches test accuracy {pct(clean['test_accuracy'])}.")
    for fault in ("bad batch", "NaN grad", "bad samples"):
        group = [row for row in rows if row["variant"].startswith(fault + " /")]
        if not group:
            continue
        lines.append(
            f"{fault}: "
            + "; ".join(
                f"{row['variant'].split(' / ')[1]} diverged {row['diverged']}/{row['runs']}, finite weights "
                f"{row['params_finite']}/{row['runs']}, test accuracy {pct(row['test_accuracy'])}"
                + (f", {row['skipped']} steps skipped" if row.get("skipped") else "")
                for row in group
            )
            + "."
        )
    for row in rows:
        if row.get("watch_recall") is not None:
            lines.append(
                f"{row['variant']}: 1% of the rows corrupted, the detector flagged "
                f"{fmt(row.get('detector_flagged_steps'))} steps (mean over seeds; forensics runs on those only); "
                f"the data watch flagged {fmt(row.get('watch_flagged'))} rows, precision "
                f"{pct(row.get('watch_precision'))} and recall {pct(row['watch_recall'])} of the "
                f"{fmt(row.get('watch_corrupted_seen'))} corrupted rows seen after its warm-up (means over seeds)."
            )
        elif row.get("forensics_recall") is not None:
            lines.append(
                f"{row['variant']}: forensics named the corrupted samples with precision "
                f"{pct(row.get('forensics_precision'))} and recall {pct(row['forensics_recall'])} (mean over seeds)."
            )
        elif row["variant"].startswith("NaN grad /") and row.get("forensics_analysed"):
            lines.append(
                f"{row['variant']}: {fmt(row['forensics_reproducible'])} of {fmt(row['forensics_analysed'])} "
                "analysed steps reproduced when recomputed: the NaN, written after the backward pass, is told "
                "apart from the data (a transient fault)."
            )
    return lines


def _held(held: bool) -> str:
    return "held" if held else "did not hold"


def transformers_findings(rows: list[Row], records: list[Record]) -> list[str]:
    """Each claim of Wortsman et al. 2023 checked on the sweep's numbers, then the early-warning figures."""
    sweep = {row.remedy: row for row in lr_sensitivity(records, lambda r: r["config"]["variant"].split(" / lr ")[0])}
    none, qk, z = sweep.get("no remedy"), sweep.get("qk-layernorm"), sweep.get("z-loss")
    lines = []
    if none is not None:
        logits = [v if v is not None else math.nan for v in none.max_attn_logit_by_lr]
        top = int(np.nanargmax(logits)) if not all(math.isnan(v) for v in logits) else None
        if top is not None and none.max_attn_logit_by_lr[0]:
            growth = logits[top] / none.max_attn_logit_by_lr[0]
            text = (f"Attention-logit growth: without a remedy the largest attention logit is {fmt(logits[0])} at "
                    f"lr {none.lrs[0]:g} and {fmt(logits[top])} at lr {none.lrs[top]:g} ({fmt(growth)}x); the smallest "
                    f"head entropy falls from {fmt(none.min_attn_entropy_by_lr[0])} to "
                    f"{fmt(none.min_attn_entropy_by_lr[top])} nats")
            held = growth >= 10
            if qk is not None:
                qk_top = max((v for v in qk.max_attn_logit_by_lr if v is not None), default=None)
                text += f". With qk-layernorm the largest logit at any lr is {fmt(qk_top)}"
                held = held and qk_top is not None and qk_top * 10 <= logits[top]
            lines.append(text + f". The claim (logits grow with the lr, qk-layernorm prevents it) {_held(held)} "
                                "at this scale (criterion: growth >= 10x, qk-layernorm at least 10x lower).")
        drifts = [v if v is not None else math.nan for v in none.log_z_drift_by_lr]
        if not all(math.isnan(v) for v in drifts):
            at = int(np.nanargmax(drifts))
            text = (f"Output-logit divergence: without a remedy the mean log Z drifts by up to {fmt(drifts[at])} "
                    f"from its value at initialisation (lr {none.lrs[at]:g}; {fmt(drifts[0])} at lr {none.lrs[0]:g})")
            held = drifts[at] >= 10
            if z is not None and none.lrs[at] in z.lrs:
                with_z = z.log_z_drift_by_lr[z.lrs.index(none.lrs[at])]
                text += f"; with the z-loss it drifts by {fmt(with_z)} at the same lr"
                held = held and with_z is not None and with_z <= drifts[at] / 2
            lines.append(text + f". The claim (log Z drifts at high lr, the z-loss prevents it) {_held(held)} at this "
                                "scale (criterion: a drift of >= 10 nats without a remedy, halved by the z-loss).")
    ranked = sorted(sweep.values(), key=lambda row: row.sensitivity)
    if ranked:
        lines.append(
            "LR sensitivity over " + f"{len(ranked[0].lrs)} learning rates ({ranked[0].lrs[0]:g} to {ranked[0].lrs[-1]:g}): "
            + "; ".join(f"{row.remedy} {fmt(row.sensitivity)} (best lr {row.best_lr:g}, loss {fmt(row.best_loss)}, "
                        f"{row.diverged}/{row.runs} runs diverged)" for row in ranked) + "."
        )
    if none is not None and qk is not None:
        every_seed = qk.sensitivity_high < none.sensitivity_low
        verdict = "held" if every_seed else ("held on average, not for every seed" if qk.sensitivity <
                                              none.sensitivity else "did not hold")
        lines.append(
            f"qk-layernorm's LR sensitivity is {fmt(qk.sensitivity)} against {fmt(none.sensitivity)} without a remedy "
            f"({fmt(qk.sensitivity / none.sensitivity if none.sensitivity else None)}x; per seed "
            f"[{fmt(qk.sensitivity_low)}, {fmt(qk.sensitivity_high)}] against [{fmt(none.sensitivity_low)}, "
            f"{fmt(none.sensitivity_high)}], {qk.seeds} seed(s)): the claim that it lowers the LR sensitivity "
            f"{verdict} at this scale."
        )
    warning = early_warning(records)
    if warning.diverged or warning.not_diverged:
        quantiles = warning.lead_quantiles()
        lines.append(
            f"Early warning: {warning.warned_in_time} of {warning.diverged} diverged runs were warned at least "
            f"{warning.lead} steps ahead (recall {pct(warning.recall)}, target 80%; {warning.too_early} diverged before "
            f"step {warning.lead}, where no warning can be that early), {warning.warned_late} later; "
            f"{warning.false_alarms} of {warning.not_diverged} runs that did not diverge were warned (false alarms "
            f"{pct(warning.false_alarm_rate)}, target at most 5%)"
            + (f"; lead time median {fmt(quantiles['median'])} steps (min {fmt(quantiles['min'])}, "
               f"10th percentile {fmt(quantiles['p10'])}, max {fmt(quantiles['max'])})." if quantiles else ".")
        )
        rolled_back = [r for r in records if not r.get("diverged") and r.get("warning_step") is not None
                       and (r.get("remedy_summary") or {}).get("rollbacks")]
        if rolled_back:
            lines.append(
                f"{len(rolled_back)} of these {warning.false_alarms} false alarm(s) are runs the Guard rolled back: "
                "its rollbacks and learning-rate cuts kept them below the lab's divergence "
                "threshold (" + ", ".join(f"{r['config']['variant']}, seed {r['config']['seed']}"
                                          for r in rolled_back) + ")."
            )
        settings = list(next((r["warning_steps"] for r in records if r.get("warning_steps")), {}))[1:]
        others = [(name, early_warning(records, setting=name)) for name in settings]
        if others:
            lines.append(
                "Other operating points of the same detector on the same runs (recall >= "
                f"{warning.lead} steps ahead / false alarms): "
                + "; ".join(f"{name}: {pct(w.recall)} / {pct(w.false_alarm_rate)}" for name, w in others)
                + ". " + ("None of them, the defaults included, reaches both targets (80% / 5%) here."
                          if not any((w.recall or 0) >= 0.8 and (w.false_alarm_rate or 0) <= 0.05
                                     for _, w in [("default", warning), *others]) else "")
            )
    return lines


FINDINGS: dict[str, Callable[[list[Row], list[Record]], list[str]]] = {
    "depth": depth_findings,
    "recurrence": recurrence_findings,
    "learning_rate": learning_rate_findings,
    "regularization": regularization_findings,
    "faults": faults_findings,
    "transformers": transformers_findings,
}


GUARD_DEFAULTS = "Guard (defaults)"


def _spread(records: list[Record], key: str, as_percent: bool = False) -> str:
    """Median of ``key`` over the seeds, and its range: "0.052 (0.031-0.074)"."""
    values = [r[key] for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not values:
        return "n/a"
    show = pct if as_percent else fmt
    return f"{show(float(np.median(values)))} ({show(min(values))}-{show(max(values))})"


def guard_defaults_findings(rows: list[Row], records: list[Record]) -> list[str]:
    """What "Guard (defaults)" ran, and, on each healthy configuration (its no-remedy twin did not diverge),
    its final loss and accuracy next to the no-remedy runs' over the same seeds (median and range)."""
    guard_rows = [row for row in rows if GUARD_DEFAULTS in row["variant"] and row["runs"]]
    if not guard_rows:
        return []
    by_variant = _rows_by_variant(rows)
    configs = sorted({str(r["remedy_config"]) for r in records
                      if GUARD_DEFAULTS in r["config"]["variant"] and r.get("remedy_config")})
    lines = [
        f"{GUARD_DEFAULTS} is gg.Guard(model, optimizer) with no option: the detector's responses (spikes clipped "
        "to its threshold, non-finite steps and loss spikes skipped, LR back-off and rollback when skips repeat) "
        "and the clip of gg.clip.default_clip(model): AutoClip(percentile=5.0) for a vanilla RNN, ArmedAutoClip() (the same "
        "AutoClip from the first step at which the gradient norm turns rough) for LSTM/GRU models, "
        "none otherwise"
        + (f"; here {'; '.join(configs)}." if configs else ".")
    ]
    pairs = []
    for row in guard_rows:
        prefix = row["variant"][: row["variant"].index(GUARD_DEFAULTS)]
        twin = by_variant.get(prefix + "no remedy") or by_variant.get(prefix.removesuffix(" / "))
        if twin is None or twin["diverged"] or not twin["runs"] or "solved" in twin:
            continue  # no twin, or not a healthy run (the task scenarios give the solved counts)
        group = {v: [r for r in records if r["config"]["variant"] == v] for v in (row["variant"], twin["variant"])}
        text = f"{prefix.removesuffix(' / ')}: final loss {_spread(group[row['variant']], 'final_loss')} " \
               f"against {_spread(group[twin['variant']], 'final_loss')} without a remedy"
        for key in ("test_accuracy", "val_loss"):
            if row.get(key) is not None:
                as_percent = key == "test_accuracy"
                text += (f", {key.replace('_', ' ')} {_spread(group[row['variant']], key, as_percent)} against "
                         f"{_spread(group[twin['variant']], key, as_percent)}")
        pairs.append(text)
    if pairs:
        lines.append(f"Healthy runs, {GUARD_DEFAULTS} against no remedy (median over seeds, range): "
                     + "; ".join(pairs) + ".")
    return lines


def findings_for(scenario: str, rows: list[Row], records: list[Record]) -> list[str]:
    finished = [record for record in records if "error" not in record]
    lines = FINDINGS[scenario](rows, finished) if scenario in FINDINGS else []
    lines += guard_defaults_findings(rows, finished)
    failed = [row for row in rows if row["errors"]]
    for row in failed:
        lines.append(f"{row['variant']}: {row['errors']} run(s) failed: {row['error']}")
    return lines
