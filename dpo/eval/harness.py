"""lm-evaluation-harness tasks on a sweep cell's trained policy: `[eval] lm_eval_tasks = ["arc_easy", ...]` in a
sweep file (dpo/study/sweep.py).

After a cell's `final/` is written and scored (`dpo eval`'s HellaSwag metrics), and before the sweep deletes its
weights, `evaluate` runs the harness's `simple_evaluate` with model "hf" and pretrained = that `final/` folder on
the listed tasks, with the [eval] section's device, batch size and limit (0: every item), and stores the harness's
own results dictionary beside the cell's result.json as `lm_eval.json` (without per-item samples), so a finished
study can be scored on more than HellaSwag without training again. The harness is an optional dependency
(`pip install -e .[harness]`): a sweep that lists tasks without it installed stops before any work (`require`).
"""

import difflib
import json
import time
from pathlib import Path

from dpo.core.files import InputError, atomic_write_text, brief, control_character, json_text

RESULTS_FILE = "lm_eval.json"  # beside a cell's result.json
INSTALL = "pip install -e .[harness]"


def check_tasks(value, name: str) -> list:
    """The task names of `lm_eval_tasks` (name: how an error names the setting, e.g. "FILE: [eval] lm_eval_tasks"):
    a list of different non-empty strings without control characters ([] runs none), else one InputError."""
    expected = f"{name} = {brief(value)}: expected a list of lm-evaluation-harness task names, such as [\"arc_easy\"]"
    if not isinstance(value, list) or not all(isinstance(t, str) and t.strip() for t in value):
        raise InputError(f"{expected} (non-empty strings)")
    for task in value:
        bad = control_character(task)
        if bad:
            raise InputError(f"{name} = {value!r}: the control character {bad} is not allowed in a task name")
    if len(set(value)) != len(value):
        raise InputError(f"{name} = {value!r}: a task is listed twice")
    return list(value)


def require(name: str, tasks=()):
    """The harness's module, or one InputError saying how to install it (name: the setting that needs it); tasks
    the installed harness does not know are one InputError too, before any cell trains."""
    try:
        import lm_eval
    except ImportError:
        raise InputError(f"{name} runs lm-evaluation-harness, which is not installed here: {INSTALL}") from None
    known = known_tasks()
    unknown = [t for t in tasks if known is not None and t not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        raise InputError(f"{name}: the installed lm-evaluation-harness has no task {unknown[0]!r}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    return lm_eval


def known_tasks():
    """The task names the installed harness knows (its TaskManager), or None where it cannot list them."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        return None
    return set(TaskManager().all_tasks)


def jsonable(value):
    """What json cannot write itself, as the harness's own writer turns it: numpy numbers as numbers, sets as
    lists, anything else as its text."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def evaluate(final: Path, tasks: list, eval_cfg, out_path: Path) -> float:
    """Run the harness's tasks on the HF model folder `final` (eval_cfg: the sweep's [eval], an EvalConfig: its
    device, batch_size and limit); its results dictionary into out_path. The seconds it took."""
    from dpo.core import models

    lm_eval = require("[eval] lm_eval_tasks")
    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(final)}, tasks=list(tasks),
                                      device=str(models.pick_device(eval_cfg.device)),
                                      batch_size=eval_cfg.batch_size, limit=eval_cfg.limit or None,
                                      log_samples=False)
    if not isinstance(results, dict):
        raise RuntimeError(f"lm-evaluation-harness returned no results for {final} (tasks {', '.join(tasks)})")
    results = {k: v for k, v in results.items() if k != "samples"}
    plain = json.loads(json.dumps(results, default=jsonable))  # numpy numbers as floats, NaN kept: `json_text` nulls it
    atomic_write_text(out_path, json_text(plain, indent=2) + "\n")
    return time.perf_counter() - t0
