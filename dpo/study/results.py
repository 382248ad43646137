"""A sweep's finished results as the reports read them: which cells are done, failed or missing, their metrics,
predictions and training curves. Reads only runs_dir/<sweep>/*/ (result.json, metrics.jsonl, predictions.jsonl):
no torch, no model."""

from pathlib import Path

from dpo.core.files import InputError, read_text
from dpo.core.metrics import ACCURACIES, METRICS, TRAINED_ONLY, parse_line, validation  # noqa: F401 (read by the report modules from here)
from dpo.study import records
from dpo.study import sweep as sweeps

COLUMNS = {name: m.label for name, m in METRICS.items()}  # report column labels, in table order
MAX_FACETS = 8


def metric(result: dict, key: str):
    """A cell's (or the base model's) value of a metric of the table, None when it has none."""
    if METRICS[key].scoring == "val":  # val margin: mean beta * h on the clean validation pairs
        return validation(result.get("train_summary")).get(METRICS[key].summary_key)
    return result.get("eval", {}).get(key)


def table_head(head: list) -> list:
    """The first two lines of a markdown table with these column names."""
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]


def pct(mean, half=None) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.1f}" + (f" ± {100 * half:.1f}" if half is not None else "")


def shown_value(key: str, mean, half=None) -> str:
    if METRICS[key].percent or mean is None:
        return pct(mean, half)
    return f"{mean:.3f}" + (f" ± {half:.3f}" if half is not None else "")


# ------------------------------------------------------------------------------------------------- collecting

def collect_audits(sweep) -> list:
    """(cell, result) of the finished audit cells."""
    out = []
    for cell in sweep.audits:
        result, problem = sweeps.read_result(sweep, cell.name)
        if problem:
            records.warn(problem)
        if result is not None:
            out.append((cell, result))
    return out


def collect(sweep) -> dict:
    """Finished results of the sweep's cells, the base model's, and what is missing, failed, damaged (a result.json
    that does not read: one warning, the cell counts as unfinished) or under way."""
    found = {"results": [], "base": None, "missing": [], "failed": [], "partial": [], "damaged": [],
             "audits": collect_audits(sweep)}
    for name in [sweeps.BASE] + [c.name for c in sweep.cells]:
        state = sweeps.status(sweep, name)
        folder = sweeps.job_dir(sweep, name)
        if state == "damaged":
            problem = sweeps.read_result(sweep, name)[1]
            records.warn(problem)
            found["damaged"].append((name, problem))
        elif state == "done":
            result = sweeps.read_result(sweep, name)[0]
            whole_run_pairs(folder, result.get("train_summary"))
            if name == sweeps.BASE:
                found["base"] = result
            else:
                found["results"].append((next(c for c in sweep.cells if c.name == name), result))
        elif state == "failed":
            lines = [ln for ln in (folder / "error.log").read_text().splitlines() if ln.strip()]
            found["failed"].append((name, lines[-1] if lines else "?"))
        else:
            found[state].append(name)
    return found


def whole_run_pairs(folder: Path, summary) -> None:
    """Runs before pairs_this_session existed counted pairs_trained from their last resume: the whole run's count
    is its pairs (config.json, after any label fix) times its epochs, where no max_steps cut it short."""
    config = folder / "config.json"
    if not summary or "pairs_this_session" in summary or not config.is_file():
        return
    recorded = records.read_record(config, {"pairs": int, "train": {"max_steps": int, "epochs": int}})
    if recorded and recorded.get("pairs") and not recorded.get("train", {}).get("max_steps"):
        summary["pairs_trained"] = recorded["pairs"] * recorded.get("train", {}).get("epochs", 1)


def point_of(cell) -> tuple:
    return tuple(cell.settings.items())


def group_points(results, sweep=None) -> dict:
    """grid point (the cell's settings without the seed) -> its finished (cell, result)s; in sweep order, or
    with `sweep` sorted for a table: text values in grid order, numbers by value (extra cells among the rest)."""
    points = {}
    for cell, result in results:
        points.setdefault(point_of(cell), []).append((cell, result))
    if sweep is None:
        return points

    def order(point):
        out = []
        for k, v in point:
            listed = sweep.grid.get(k, [])
            out.append((0, float(v)) if isinstance(v, (int, float)) else (0, listed.index(v)) if v in listed
                       else (1, str(v)))
        return out

    return dict(sorted(points.items(), key=lambda item: order(item[0])))


def keys_of(points) -> list:
    keys = []
    for point in points:
        keys += [k for k, _ in point if k not in keys]
    return keys


def read_predictions(folder: Path):
    """A job's eval predictions (dpo/study/records.py), or None when it has none or they are damaged (with a
    warning)."""
    path = folder / "eval" / "predictions.jsonl"
    if not path.is_file():
        return None
    found, problem = records.read_predictions(path)
    if problem:
        records.warn(problem)
    return found


def read_metrics(path: Path) -> list:
    """The lines of a metrics.jsonl, under the names this version logs (`metrics.parse_line`); a damaged line (cut
    by a kill, edited, of another shape) is left out."""
    if not path.is_file():
        return []
    try:
        text = read_text(path, "a run's metrics.jsonl")
    except InputError as e:
        records.warn(str(e))
        return []
    return [row for row in map(parse_line, text.splitlines()) if row is not None]
