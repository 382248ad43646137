"""What dpo reads back of what it wrote earlier, checked before use: a sweep cell's result.json (the base model's, a
training cell's, an audit cell's) and the eval predictions the reports compare. A file cut short by a kill, edited by
hand or holding other types is one line naming it and what is wrong (`problem`), and the reader treats it as absent:
its cell as unfinished, never a traceback halfway through a report.

A shape is a type (int: an integer, not a bool), NUMBER (an int or float, not a bool), a dict of key -> shape (a JSON
object whose listed keys, where present, have those shapes; `Required` ones must be present), `Optional(shape)`
(also null), or `Pair(shape)` (a list of two).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from dpo.core.files import InputError, parse_json, read_json, read_text
from dpo.core.metrics import ACCURACIES, METRICS

NUMBER = "a number"


@dataclass(frozen=True)
class Optional:
    shape: object


@dataclass(frozen=True)
class Required:
    shape: object


@dataclass(frozen=True)
class Pair:
    shape: object


def type_name(value) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number")


def problem(value, shape, at: str = "") -> str:
    """'' when value has the shape, else what is wrong, naming where (a path of keys: "eval"."acc")."""
    if isinstance(shape, (Optional, Required)):
        return "" if value is None and isinstance(shape, Optional) else problem(value, shape.shape, at)
    name = at or "the file"
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{name} is {type_name(value)}, expected an object"
        for key, inner in shape.items():
            if key not in value:
                if isinstance(inner, Required):
                    return f"{at or 'the object'} has no \"{key}\""
                continue
            found = problem(value[key], inner, f"{at}.\"{key}\"" if at else f"\"{key}\"")
            if found:
                return found
        return ""
    if isinstance(shape, Pair):
        if not (isinstance(value, list) and len(value) == 2):
            return f"{name} is {type_name(value)}, expected a list of two"
        return problem(value[0], shape.shape, f"{at}[0]") or problem(value[1], shape.shape, f"{at}[1]")
    ok = (isinstance(value, (int, float)) if shape == NUMBER else isinstance(value, shape)) \
        and (shape is bool or not isinstance(value, bool))
    expected = {NUMBER: "a number", int: "an integer", str: "a string", bool: "a boolean", list: "a list",
                dict: "an object"}[shape]
    return "" if ok else f"{name} is {type_name(value)}, expected {expected}"


def warn(problem: str) -> None:
    """One line for a damaged file a report leaves out (what is wrong, naming the file)."""
    print(f"warning: {problem}; left out of the report", file=sys.stderr)


def read_record(path: Path, shape):
    """A JSON file a report reads beside a result (a run's config.json, val_margins.json) when it is there and has
    the shape; else None, with a warning when it is there but damaged."""
    if not path.is_file():
        return None
    try:
        value = read_json(path, "a JSON object")
    except InputError as e:
        warn(str(e))
        return None
    found = problem(value, shape)
    if found:
        warn(f"{path}: {found}")
        return None
    return value


# ------------------------------------------------------------------------------------------------ result.json

SECONDS = {k: Optional(NUMBER) for k in ("train", "eval", "audit", "total")}
VALIDATION = Optional({k: Optional(NUMBER) for k in ("loss", "rewards/accuracies", "rewards/margins",
                                                     "rewards/accuracy", "rewards/margin")})
SUMMARY = Optional({"eval": VALIDATION, "val": VALIDATION, "steps": Optional(int), "pairs_trained": Optional(int),
                    "pairs_this_session": Optional(int)})
EVAL = {"n": Required(int), **{k: NUMBER for m in ACCURACIES for k in (m, f"{m}_stderr")}}
SCORED = {"eval": Required(EVAL), "seconds": SECONDS}  # the base model's result
TRAINED = {**SCORED, "train_summary": SUMMARY, "val_reward_accuracy": Optional(NUMBER), "val_pairs": Optional(int),
           "train": {"val_size": Optional(int)}, "settings": dict}
NULLABLE = Required(Optional(NUMBER))  # there, a number or null (result files write a non-finite number as null)
TRUTH = {"true_eps": Required(NUMBER), **{k: NULLABLE for k in ("eps_error", "auroc", "precision", "recall")}}
AUDITED = {"audit": Required({"eps_hat": NULLABLE, "eps_ci95": Required(Pair(Optional(NUMBER))),
                              "detector_accuracy": NULLABLE, "flagged": Required(NUMBER),
                              "truth": {**TRUTH, "covered": Required(bool)}}),
           "seconds": SECONDS}
RESULTS = {"base": SCORED, "train": TRAINED, "audit": AUDITED}


def read_result(path: Path, kind: str):
    """(the result, '') of a result.json of a cell of this kind ("base", "train", "audit"), or (None, what is
    wrong, naming the file) for a damaged one."""
    try:
        result = read_json(path, "a sweep cell's result.json")
    except InputError as e:
        return None, str(e)
    found = problem(result, RESULTS[kind])
    return (None, f"{path}: {found}") if found else (result, "")


# ------------------------------------------------------------------------------------------ predictions.jsonl

FIELDS = {METRICS[m].field for m in ACCURACIES}  # the predicted indices a record may hold
PREDICTION = {"id": Required(str), "gold": Required(int), **{METRICS[m].field: int for m in ACCURACIES}}


def read_predictions(path: Path):
    """(The records of an eval's predictions.jsonl (`dpo eval`), ''), or (None, what is wrong, naming the file) when a
    line is damaged or the records do not all have the same predictions."""
    expected = "one prediction record per line"
    try:
        lines = read_text(path, f"an eval's predictions.jsonl: {expected}").splitlines()
        records = [parse_json(ln, path, expected, number) for number, ln in enumerate(lines, 1) if ln.strip()]
    except InputError as e:
        return None, str(e)
    for number, record in enumerate(records, 1):
        found = problem(record, PREDICTION, f"line {number}")
        if not found and set(record) & FIELDS != set(records[0]) & FIELDS:
            found = f"line {number} has other predictions than line 1"
        if found:
            return None, f"{path}: {found}"
    return records, ""
