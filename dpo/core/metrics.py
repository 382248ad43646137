"""Every metric the project reports, in one table: how it is computed, where it is stored, how reports label it.

HellaSwag accuracies (`dpo eval`): a scoring (`--metrics completion,mc`) writes per-item numbers into each
prediction record (completion: the four endings' summed log-likelihoods and their lengths in characters; mc: the
log-probs of " 0".." 3"); each accuracy is the argmax rule `predict` applied to a record, stored as `field` in
predictions.jsonl and as `name` (with `name`_stderr) in results.json. Validation metrics (`dpo train`): read from a
sweep cell's result. Adding a metric is one entry here (a name, the scoring it reads, the field of its predicted
index, a label, the argmax rule); `dpo eval`, the statistics and the reports read the table.

Training's own metrics (metrics.jsonl, summary.json, TensorBoard) have TRL's names (`rewards/accuracies`, declared
in dpo/train/stepstats.py), validation ones under `eval` (TensorBoard: `eval/rewards/accuracies`, as TRL's). Runs of
earlier versions logged a few under other names (`RENAMED`); whatever reads a run reads it through `current` and
`validation`, so the committed studies keep their reports.
"""

import json
import math
from dataclasses import dataclass
from typing import Callable


def argmax(values) -> int:
    """Index of the first maximum (numpy's rule, so ties break like the harness)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def per_char(record) -> list:
    """Log-likelihood per character of the ending (x / 0 = -inf, as the harness)."""
    return [x / n if n else -math.inf for x, n in zip(record["completion_logliks"], record["ending_chars"])]


@dataclass(frozen=True)
class Metric:
    name: str  # results.json key, report column
    scoring: str  # the `dpo eval --metrics` scoring whose numbers it reads; "val" for training's validation
    field: str  # the predictions.jsonl field of the predicted index ("" for validation metrics)
    label: str  # how reports name it
    predict: Callable = None  # record -> predicted index (HellaSwag accuracies)
    needs: str = ""  # the record field the scoring writes and predict reads
    summary_key: str = ""  # validation metrics: its name among a training summary's `validation` metrics
    percent: bool = True  # shown in % (accuracies) or as is (margins)
    higher_is_better: bool = True


METRICS = {m.name: m for m in (
    Metric("mc_acc", "mc", "pred_mc", "mc_acc", predict=lambda r: argmax(r["mc_logprobs"]), needs="mc_logprobs"),
    Metric("acc", "completion", "pred_acc", "acc", predict=lambda r: argmax(r["completion_logliks"]),
           needs="completion_logliks"),
    Metric("acc_norm", "completion", "pred_acc_norm", "acc_norm", predict=lambda r: argmax(per_char(r)),
           needs="completion_logliks"),
    Metric("val_reward_accuracy", "val", "", "val reward acc", summary_key="rewards/accuracies"),
    Metric("val_margin", "val", "", "val margin", summary_key="rewards/margins", percent=False),
)}

ACCURACIES = tuple(m.name for m in METRICS.values() if m.scoring != "val")  # HellaSwag accuracies, report order
TRAINED_ONLY = tuple(m.name for m in METRICS.values() if m.scoring == "val")  # no value for a base model
SCORINGS = tuple(dict.fromkeys(METRICS[m].scoring for m in ACCURACIES))  # `dpo eval --metrics` choices


def predictions(record: dict) -> dict:
    """The predicted index of every accuracy whose scoring filled the record: {field: index}."""
    return {m.field: m.predict(record) for m in METRICS.values() if m.predict and m.needs in record}


# ------------------------------------------------------------------------------------------ training's metrics

EVAL = "eval"  # the split of validation lines in metrics.jsonl, and summary.json's key of the last validation
RENAMED = {"rewards/accuracy": "rewards/accuracies", "rewards/margin": "rewards/margins",  # earlier name -> now
           "val": EVAL}  # (the split, and summary.json's key)


def current(row: dict) -> dict:
    """A metrics.jsonl line (or a dict of metric values) under the names this version logs: the metric names
    and the split of an earlier version's line renamed (`RENAMED`), everything else as it is."""
    out = {RENAMED.get(k, k): v for k, v in row.items()}
    if "split" in out:
        out["split"] = RENAMED.get(out["split"], out["split"])
    return out


def parse_line(line: str):
    """A metrics.jsonl line as `current` gives it, or None for a damaged one: not JSON (cut by a kill), nested too
    deeply, not an object, a step that is not an integer >= 0, a split that is not a string, a value that is not a
    number (every reader, --resume, the report and the TensorBoard rebuild, drops the same lines)."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not (isinstance(row, dict) and type(row.get("step")) is int and row["step"] >= 0
            and isinstance(row.get("split"), str)):
        return None
    values = [v for k, v in row.items() if k not in ("step", "split")]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return current(row)


def validation(summary) -> dict:
    """The last validation's metrics of a training summary (summary.json, a result's train_summary), under the
    names this version logs, whichever version wrote it; {} when it has none."""
    summary = summary or {}
    return current(summary.get(EVAL) or summary.get("val") or {})
