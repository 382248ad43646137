"""A sweep file (`dpo sweep FILE.toml`): a grid of data -> train -> eval cells, read, expanded into its cells and
checked before any of them runs (dpo/study/runner.py runs them: resumably, one after another or one per GPU, or
on Slurm).

A sweep file (TOML) has these sections; every key is checked (an unknown one is an error naming file and key):

    [sweep]    model (required: hub id, HF folder, .gguf or alias, as --model), description (printed in the
               report), name (default: the file name without .toml), keep_weights (default false: delete a
               cell's checkpoints/ and final/ once it is evaluated), eval_seed (default: the first seed; see
               "Held-out data" below), runs_dir (default "experiments/runs"),
               results_dir (default "experiments/results")
    [data]     DataConfig fields (`dpo data --help`), except seed (see seeds) and grid
    [train]    TrainConfig fields (`dpo train --help`), except model, run_name, output_dir, resume,
               train_data_path, val_data_path (the sweep sets them)
    [eval]     EvalConfig fields (`dpo eval --help`), except model, model_b, out_dir; and lm_eval_tasks = ["arc_easy",
               ...]: lm-evaluation-harness tasks run on each cell's final/ before its weights are deleted, their
               results beside its result.json in lm_eval.json (dpo/eval/harness.py; needs `pip install -e .[harness]`);
               and eval_start, eval_size: HellaSwag items scored apart from [data]'s evaluation set, which then
               gives only the validation and calibration pairs (checked to share no item with them or with the
               training pool: see scored_items)
    [grid]     axes: a DataConfig or TrainConfig field = a list of values (a single value is one value), plus
               seeds = [1, 2, 3] (default [1]). A string given for a number field ties it to another field of
               the same cell: eps = "noise" means "eps equals this cell's noise".
    [[extra]]  single extra cells: field = value, optional seeds = [...] (default: the grid's seeds). An extra
               cell starts from [data]/[train], then the grid's single-valued axes (so eps = "noise" applies),
               then its own keys.

Held-out data, one rule: everything a cell is measured on is drawn with eval_seed, the same for every cell and
the base model: the clean validation pairs (validation reward accuracy and margin) and the mc evaluation prompts.
A cell's own seed draws only what it trains on (its pairs, their flips and few-shot examples, the step order).
So every cell is compared with every other, and with the base model, on identical items and prompts. With your
own data ([data] pairs = "prefs.jsonl", the `dpo data --pairs` fields) the validation pairs are the file's
held-out rows (holdout), chosen before any flip and the same for every seed; evaluation stays on HellaSwag.

Relative paths (hellaswag_dir, runs_dir, ...) are relative to the folder you run from (the repository root).

Cell = one grid combination (or extra cell) x seed, named by its axes in file order, then any extra keys, then the
seed: `loss=rdpo,noise=0.2,eps=0.2,seed=1`. It runs in runs_dir/<sweep>/<cell>/: data (made when missing) ->
`dpo.train.train.train` (that folder is its output_dir: config.json, metrics.jsonl, summary.json, checkpoints/, final/)
-> `dpo.eval.score.run` of final/ into eval/ (-> the harness's tasks into lm_eval.json) -> weights deleted (unless
keep_weights) -> result.json, written last.
The base model is scored once per sweep into runs_dir/<sweep>/base/result.json.
"""

import difflib
import itertools
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple

from dpo.core import losses
from dpo.core.config import (
    EPS_WORDS,
    DataConfig,
    EvalConfig,
    TrainConfig,
    check_seed,
    check_type,
    field_value,
    from_mapping,
    kind_of,
    named,
    with_own_names,
)
from dpo.core.files import (
    InputError,
    brief,
    control_character,
    read_text,
)
from dpo.core.pairscores import MIN_CALIBRATION
from dpo.eval import harness
from dpo.study import records, slurm
from dpo.train import runsettings

SECTIONS = ("sweep", "data", "train", "eval", "grid", "extra", "audit", "slurm", "contrast")
SCORED_KEYS = ("eval_start", "eval_size")  # [eval]'s own: the HellaSwag items scored, when not [data]'s
SWEEP_KEYS = {"model": str, "description": str, "name": str, "keep_weights": bool, "eval_seed": int,
              "runs_dir": str, "results_dir": str, "predictions": str, "outcomes": str, "paired": list}
SET_BY_SWEEP = {  # fields the sweep sets itself, per config class, and where to put them instead
    DataConfig: {"seed": "use seeds = [...] in [grid]", "grid": "a sweep file is the grid"},
    TrainConfig: {"model": "set model in [sweep]", "run_name": "the cell name is the run name",
                  "output_dir": "cells go to runs_dir/<sweep>/<cell>", "resume": "rerunning a sweep resumes",
                  "train_data_path": "the [data] settings pick the file",
                  "val_data_path": "the [data] settings pick the file"},
    EvalConfig: {"model": "set model in [sweep]", "model_b": "the base model is scored once per sweep",
                 "out_dir": "results go to <cell>/eval"},
}
SECTION_KEYS = {"eval": ("lm_eval_tasks", *SCORED_KEYS)}  # keys of a section that are the sweep's own
BASE = "base"  # the base model's folder and job name
RUNS_DIR, RESULTS_DIR = "experiments/runs", "experiments/results"


@dataclass
class Cell:
    name: str
    settings: dict  # the values that name it (grid axes, then extra keys), resolved, without the seed
    seed: int
    extra: bool = False
    kind: str = "train"  # "train": data -> train -> eval; "audit": data -> dpo audit (forward passes only)


@dataclass
class Sweep:
    path: Path
    name: str
    description: str
    model: str
    keep_weights: bool
    eval_seed: int
    runs: Path  # runs_dir/<name>
    results: Path  # results_dir/<name>
    data: DataConfig  # [data] over the defaults
    train: TrainConfig  # [train] over the defaults, model set
    eval: EvalConfig  # [eval] over the defaults
    grid: dict  # axis -> list of values (ties as field names)
    seeds: list
    extra: list  # [[extra]] tables as given
    cells: list
    slurm: dict = field(default_factory=dict)  # [slurm] options for --launcher slurm (dpo/study/slurm.py)
    audits: list = field(default_factory=list)  # audit cells ([audit]), run before the training cells
    predictions: str = ""  # written before the study ran; the report prints them first
    outcomes: str = ""  # what happened against the predictions, written after; the report prints it next
    paired: list = field(default_factory=list)  # the keys that make a method, for paired comparisons (report)
    contrasts: list = field(default_factory=list)  # [[contrast]]: the study's family of HellaSwag comparisons
    lm_eval_tasks: list = field(default_factory=list)  # [eval] lm_eval_tasks: harness tasks run on each final/
    scored: dict = field(default_factory=dict)  # [eval] eval_start / eval_size: the items scored, when not [data]'s


# ------------------------------------------------------------------------------------------------ reading a file

def config_fields(cls) -> dict:
    """name -> field of the fields a sweep file may set for cls."""
    return {f.name: f for f in fields(cls) if f.name not in SET_BY_SWEEP[cls]}


AXES = {**config_fields(DataConfig), **config_fields(TrainConfig)}  # what [grid] and [[extra]] may vary
assert not set(config_fields(DataConfig)) & set(config_fields(TrainConfig)), "grid keys must name one field"


def is_number(key: str) -> bool:
    return kind_of(AXES[key]) in (int, float)


def is_tie(key: str, value) -> bool:
    """A string for a number field, other than one of the words it takes (eps = "auto"): the name of another
    field of the cell whose value it takes (eps = "noise")."""
    return isinstance(value, str) and is_number(key) and value not in AXES[key].metadata.get("words", ())


def unknown_key(path, section: str, key: str, known) -> InputError:
    why = {cls_key: reason for cls in SET_BY_SWEEP.values() for cls_key, reason in cls.items()}.get(key)
    hint = f" ({why})" if why else ""
    close = difflib.get_close_matches(key, list(known), n=1)
    if not why and close:
        hint = f" (did you mean {close[0]!r}?)"
    return InputError(f"{path}: unknown key {key!r} in [{section}]{hint}; expected one of: {', '.join(known)}")


def where(path, section: str) -> str:
    return f"{path}: [{section}] "


def text_checker(path, section: str):
    """The sweep's own rule for config.from_mapping: no control characters in a string (`check_text`)."""
    return lambda key, value: check_text(path, section, key, value)


def check_value(path, section: str, key: str, value, kind):
    """A value of a [sweep] or [audit] key that is no config field: converted to kind, else InputError naming
    file, section and key."""
    value = check_type(value, kind, named(key, value, where(path, section)))
    check_text(path, section, key, value)
    return value


def check_tie(path, section: str, key: str, value: str) -> str:
    """A tie (eps = "noise") names another number field (checked here, resolved per cell)."""
    if value not in AXES or not is_number(value) or value == key:
        numbers = [k for k in AXES if is_number(k) and k != key]
        raise InputError(f"{path}: [{section}] {key} = {value!r}: a string for a number ties it to another "
                         f"number field of the cell, expected one of: {', '.join(numbers)}")
    return value


def check_text(path, section: str, key: str, value) -> None:
    """No control characters (newlines, escapes, ...) in a string setting: values reach file names, cell names,
    the Slurm script and its cell list. The description, the predictions and the outcomes, prose that only reports
    print, may span lines."""
    if isinstance(value, str):
        prose = section == "sweep" and key in ("description", "predictions", "outcomes")
        bad = control_character(value, allowed="\n\t" if prose else "")
        if bad:
            raise InputError(f"{path}: [{section}] {key} = {value!r}: the control character {bad} is not allowed")


def read_section(path, raw: dict, section: str, cls, **set_by_sweep):
    """[data], [train] or [eval] over cls's defaults, read by config.from_mapping (set_by_sweep: fields the sweep
    sets itself, such as the model); the section's own keys (SECTION_KEYS) are left to the caller."""
    own = SECTION_KEYS.get(section, ())
    table = with_own_names(cls, {k: v for k, v in raw.get(section, {}).items() if k not in own}, where(path, section))
    known = [*config_fields(cls), *own]
    for key in table:
        if key not in known:
            raise unknown_key(path, section, key, known)
    return from_mapping(cls, {**table, **set_by_sweep}, where(path, section), check=text_checker(path, section))


def axis_value(path, section: str, key: str, value):
    """One value of a [grid] axis or an [[extra]] key: a tie, or the field's value (config.field_value)."""
    if is_tie(key, value):
        return check_tie(path, section, key, value)
    return field_value(AXES[key], value, where(path, section), check=text_checker(path, section),
                       also=" (or the name of a field to tie it to)" if is_number(key) else "")


def read_seeds(path, section: str, value) -> list:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in value):
        raise InputError(f"{path}: [{section}] seeds = {brief(value)}: expected a non-empty list of integers")
    if len(set(value)) != len(value):
        raise InputError(f"{path}: [{section}] seeds = {value!r}: a seed is listed twice")
    return [check_seed(s, f"{path}: [{section}] seeds = {brief(value)}: seed {s}") for s in value]


def read_axes(path, table: dict, section: str, listed: bool) -> dict:
    """[grid] (listed: key -> list of values) or one [[extra]] table (key -> value); seeds excluded."""
    out = {}
    for key, value in table.items():
        if key == "seeds":
            continue
        if key not in AXES:
            raise unknown_key(path, section, key, ["seeds", *AXES])
        values = value if listed and isinstance(value, list) else [value]
        if not values:
            raise InputError(f"{path}: [{section}] {key} = []: expected at least one value")
        checked = [axis_value(path, section, key, v) for v in values]
        if len(set(map(repr, checked))) != len(checked):
            raise InputError(f"{path}: [{section}] {key} = {value!r}: a value is listed twice")
        out[key] = checked if listed else checked[0]
    return out


MAX_KEY_PARTS = 64  # dotted parts of one TOML key or [table] name; a sweep file's have one or two


def check_key_depth(path: Path, text: str) -> None:
    """Refuse a key or table name of more than MAX_KEY_PARTS dotted parts before tomllib sees it: its time and
    memory grow with the square of their number (a key 50,000 parts deep takes gigabytes). A rough scan: the
    dots before a line's `=`, or inside its `[...]`."""
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        key = line.split("]")[0] if line.startswith("[") else line.split("=")[0] if "=" in line else ""
        if key.count(".") >= MAX_KEY_PARTS:
            raise InputError(f"{path}:{number}: a key of {key.count('.') + 1} dotted parts (nested too deeply; "
                             f"at most {MAX_KEY_PARTS}); expected a sweep file")


def load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise InputError("reading sweep files needs Python >= 3.11 (tomllib) or `pip install tomli`") from None
    if not path.exists():
        raise InputError(f"{path}: no such sweep file (expected a TOML file such as experiments/noise.toml)")
    text = read_text(path, "a sweep file (TOML)")
    check_key_depth(path, text)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:  # arrays or tables nested thousands deep
        raise InputError(f"{path}: unreadable TOML (nested too deeply); expected a sweep file") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion: ..."
        raise InputError(f"{path}: unreadable TOML ({str(e).split(':')[0]}); expected a sweep file") from None


def one_held_out_set(path: Path, axes: dict, where: str) -> None:
    """Every cell is measured on the same validation pairs: with your own pairs, the file's held-out rows."""
    for key in ("pairs", "pairs_split", "pairs_revision", "holdout"):
        if key in axes:
            raise InputError(f"{path}: {where} sets {key}, but every cell of a sweep is measured on the same held-out "
                             f"rows: set {key} once, in [data]")


def load(path) -> Sweep:
    """Read and check a sweep file; its cells, in the order they run (seed by seed, the grid in file order)."""
    path = Path(path)
    raw = load_toml(path)
    for section, value in raw.items():
        if section not in SECTIONS:
            raise InputError(f"{path}: unknown section [{section}]; expected: {', '.join(SECTIONS)}")
        if section in ("extra", "contrast") and not (isinstance(value, list) and all(isinstance(t, dict)
                                                                                       for t in value)):
            raise InputError(f"{path}: {section} entries are [[{section}]] tables")
        if section not in ("extra", "contrast") and not isinstance(value, dict):
            raise InputError(f"{path}: {section} must be a [{section}] table")
    meta = raw.get("sweep", {})
    for key, value in meta.items():
        if key not in SWEEP_KEYS:
            raise unknown_key(path, "sweep", key, SWEEP_KEYS)
        if SWEEP_KEYS[key] is not list:  # paired: checked below
            check_value(path, "sweep", key, value, SWEEP_KEYS[key])
    if "eval_seed" in meta:
        check_seed(meta["eval_seed"], f"{path}: [sweep] eval_seed = {meta['eval_seed']}")
    if not meta.get("model"):
        raise InputError(f"{path}: [sweep] needs model = \"...\" (a hub id, HF folder, .gguf file or alias)")
    data = read_section(path, raw, "data", DataConfig)
    train = read_section(path, raw, "train", TrainConfig, model=meta["model"])
    evaluation = read_section(path, raw, "eval", EvalConfig)
    grid_table = raw.get("grid", {})
    grid = read_axes(path, grid_table, "grid", listed=True)
    for key in grid:
        section = "data" if key in config_fields(DataConfig) else "train"
        if key in raw.get(section, {}):
            raise InputError(f"{path}: {key} is set in both [{section}] and [grid]; keep one")
    one_held_out_set(path, grid, "[grid]")
    seeds = read_seeds(path, "grid", grid_table.get("seeds", [1]))
    extra = []
    for i, table in enumerate(raw.get("extra", [])):
        where = f"extra #{i + 1}"
        axes = read_axes(path, table, where, listed=False)
        if not axes:
            raise InputError(f"{path}: [[extra]] #{i + 1} sets nothing; expected fields such as loss, noise, eps")
        one_held_out_set(path, axes, f"[[extra]] #{i + 1}")
        extra.append({**axes, "seeds": read_seeds(path, where, table.get("seeds", seeds))})
    name = meta.get("name") or path.stem
    if not name or any(c in name for c in "/\\") or name in (".", "..") or control_character(name):
        raise InputError(f"{path}: [sweep] name = {name!r}: expected a folder name (no /, \\ or control characters)")
    sweep = Sweep(path=path, name=name, description=meta.get("description", "").strip(), model=meta["model"],
                  keep_weights=meta.get("keep_weights", False), eval_seed=meta.get("eval_seed", seeds[0]),
                  runs=Path(meta.get("runs_dir", RUNS_DIR)) / name,
                  results=Path(meta.get("results_dir", RESULTS_DIR)) / name,
                  data=data, train=train, eval=evaluation, grid=grid, seeds=seeds, extra=extra, cells=[])
    sweep.slurm = slurm.check_options(f"{path}: [slurm]", raw.get("slurm", {}))
    sweep.cells = expand(sweep)
    sweep.audits = audit_cells(path, raw.get("audit", {}), seeds)
    sweep.predictions = meta.get("predictions", "").strip()
    sweep.outcomes = meta.get("outcomes", "").strip()
    if "lm_eval_tasks" in raw.get("eval", {}):
        sweep.lm_eval_tasks = harness.check_tasks(raw["eval"]["lm_eval_tasks"], f"{path}: [eval] lm_eval_tasks")
    sweep.scored = scored_items(path, raw.get("eval", {}), data)
    sweep.paired = meta.get("paired", [])
    if not all(isinstance(k, str) and k in AXES for k in sweep.paired):
        raise InputError(f"{path}: [sweep] paired = {brief(sweep.paired)}: expected a list of grid keys "
                         "(such as \"label_fix\", \"loss\", \"eps\")")
    for cell in sweep.cells + sweep.audits:
        check_cell(sweep, cell)
    sweep.contrasts = read_contrasts(path, raw.get("contrast", []), sweep)
    return sweep


class Contrast(NamedTuple):
    """[[contrast]] a = {...}, b = {...}: cells matching a against the cell of the same seed that is a with b's
    settings changed, every other setting as a's (the report's HellaSwag comparisons within seed, one family for
    Holm). `b` holds a's settings with b's over them."""
    a: dict
    b: dict

    def label(self) -> str:
        """'noise=0.4,label_fix=relabel vs label_fix=none': a, then what b changes of it."""
        changed = {k: v for k, v in self.b.items() if self.a.get(k) != v}
        return " vs ".join(",".join(f"{k}={fmt(v)}" for k, v in side.items()) for side in (self.a, changed))


def read_contrasts(path: Path, tables: list, sweep: Sweep) -> list:
    out = []
    for i, table in enumerate(tables):
        where = f"contrast #{i + 1}"
        if set(table) != {"a", "b"} or not all(isinstance(table[k], dict) and table[k] for k in "ab"):
            raise InputError(f"{path}: [[contrast]] #{i + 1}: expected a = {{key = value, ...}} and b = {{...}} "
                             "(the settings of the two sides), nothing else")
        a, b = (read_axes(path, table[k], where, listed=False) for k in "ab")
        if all(k in a and a[k] == v for k, v in b.items()):
            raise InputError(f"{path}: [[contrast]] #{i + 1}: b changes nothing of a (b names what the other side "
                             "changes: b = {noise = 0.0} compares a with the cell that differs only in its noise)")
        contrast = Contrast(a, {**a, **b})  # b: what changes; a's other settings stay
        pairs = contrast_pairs(sweep, contrast)
        if not pairs:
            raise InputError(f"{path}: [[contrast]] #{i + 1} ({contrast.label()}): no cell matches a with a cell "
                             "of the same seed that matches b and has a's other settings")
        seeds = [a.seed for a, _ in pairs]
        twice = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if twice:
            names = [a.name for a, _ in pairs if a.seed == twice[0]]
            raise InputError(f"{path}: [[contrast]] #{i + 1} ({contrast.label()}): a matches {len(names)} cells of "
                             f"seed {twice[0]} ({', '.join(names)}): name the setting that tells them apart")
        out.append(contrast)
    return out


def resolved(sweep: Sweep, cell: Cell) -> dict:
    """Every setting a sweep may vary, as the cell runs it (the eps of a loss that takes none: None)."""
    data, train = cell_configs(sweep, cell)
    values = {k: getattr(data if k in config_fields(DataConfig) else train, k) for k in AXES}
    if not losses.get(train.loss).takes_eps:
        values["eps"] = None
    return values


def contrast_pairs(sweep: Sweep, contrast: Contrast) -> list:
    """(cell a, cell b) of every seed where both exist."""
    values = {c.name: resolved(sweep, c) for c in sweep.cells}
    named = set(contrast.a) | set(contrast.b)

    def equal(key, x, y):  # an eps that a loss ignores (None) equals any
        return x == y or (key == "eps" and None in (x, y))

    def matches(cell, side):
        return all(equal(k, values[cell.name][k], v) for k, v in side.items())

    def same_rest(x, y):
        vx, vy = values[x.name], values[y.name]
        return all(equal(k, vx[k], vy[k]) for k in vx if k not in named)

    pairs = []
    for a in sweep.cells:
        if matches(a, contrast.a):
            b = [c for c in sweep.cells if c.seed == a.seed and c is not a and matches(c, contrast.b)
                 and same_rest(a, c)]
            pairs += [(a, b[0])] if len(b) == 1 else []
    return pairs


# ------------------------------------------------------------------------------------------------------ cells

def fmt(value) -> str:
    """A value as it appears in a cell name: 0.2, 1e-05, rdpo, true."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def base_value(sweep: Sweep, key: str):
    return getattr(sweep.data if key in config_fields(DataConfig) else sweep.train, key)


def resolve_ties(sweep: Sweep, values: dict) -> dict:
    """eps = "noise" -> eps = this cell's noise (from the cell's values, else [data]/[train])."""
    out = dict(values)
    for key, value in values.items():
        if is_tie(key, value):
            target = values[value] if value in values else base_value(sweep, value)
            if isinstance(target, str):
                raise InputError(f"{sweep.path}: {key} = {value!r} ties to {value}, which is itself tied")
            out[key] = kind_of(AXES[key])(target)
            if kind_of(AXES[key]) is int and out[key] != target:
                raise InputError(f"{sweep.path}: {key} = {value!r}: {value} = {target} is not an integer")
    return out


def expand(sweep: Sweep) -> list:
    """Every cell, seed by seed (a partial sweep has all grid points of seed 1 first); duplicates once."""
    points = [(dict(zip(sweep.grid, combo)), None) for combo in itertools.product(*sweep.grid.values())]
    single = {k: v[0] for k, v in sweep.grid.items() if len(v) == 1}
    for table in sweep.extra:
        own = {k: v for k, v in table.items() if k != "seeds"}
        points.append(({**single, **own}, table["seeds"]))
    cells, seen = [], {}
    for seed in sorted(set(sweep.seeds).union(*(t["seeds"] for t in sweep.extra)), key=_seed_order(sweep)):
        for values, seeds in points:
            if seed not in (seeds or sweep.seeds):
                continue
            resolved = resolve_ties(sweep, values)
            named = {k: resolved[k] if k in resolved else base_value(sweep, k) for k in sweep.grid}
            named.update({k: v for k, v in resolved.items() if k not in named})
            for k, v in named.items():
                if any(c in fmt(v) for c in "/\\,="):
                    raise InputError(f"{sweep.path}: {k} = {v!r} cannot vary across cells: cell names (folder "
                                     "names) hold the values, which must not contain / \\ , or =")
            name = ",".join([f"{k}={fmt(v)}" for k, v in named.items()] + [f"seed={seed}"])
            if name in seen and seen[name] != named:
                raise InputError(f"{sweep.path}: two different cells would be named {name} (values that differ "
                                 "only after 6 significant digits)")
            if name not in seen:
                seen[name] = named
                cells.append(Cell(name, named, seed, extra=seeds is not None))
    return cells


AUDIT_KEYS = ("n", "noise", "seeds")


def audit_cells(path, table: dict, default_seeds: list) -> list:
    """[audit]: n = 1000, noise = [0.1, 0.2], seeds = [...] (default: the grid's): one `dpo audit` of each
    (noise, seed) pair file, calibrated like the training cells' audits (`--label-fix`, `--eps auto`), named
    audit-n=1000,noise=0.1,seed=1. Other settings come from [data] and [train] (max_length, audit_score,
    fix_threshold, val_size: the calibration pairs are the validation file's after the first val_size); the
    reference log-probs are fp32, as dpo train's in either precision."""
    for key in table:
        if key not in AUDIT_KEYS:
            raise unknown_key(path, "audit", key, AUDIT_KEYS)
    if not table:
        return []
    data, at, check = config_fields(DataConfig), where(path, "audit"), text_checker(path, "audit")
    n = field_value(data["n"], table.get("n", DataConfig.n), at, check=check)
    noises = table.get("noise", [DataConfig.noise])
    noises = [field_value(data["noise"], v, at, check=check) for v in (noises if isinstance(noises, list) else
                                                                        [noises])]
    seeds = read_seeds(path, "audit", table.get("seeds", default_seeds))
    return [Cell(f"audit-n={n},noise={fmt(noise)},seed={seed}", {"n": n, "noise": noise}, seed, kind="audit")
            for seed in seeds for noise in noises]


def _seed_order(sweep: Sweep):
    listed = sweep.seeds + [s for t in sweep.extra for s in t["seeds"]]
    return listed.index


class CellConfigs(NamedTuple):
    data: DataConfig
    train: TrainConfig


def cell_configs(sweep: Sweep, cell: Cell) -> CellConfigs:
    """(DataConfig, TrainConfig) of a cell: [data]/[train] with the cell's values, seed and output folder; its
    validation pairs are eval_seed's (see "Held-out data")."""
    data_values = {k: v for k, v in cell.settings.items() if k in config_fields(DataConfig)}
    train_values = {k: v for k, v in cell.settings.items() if k in config_fields(TrainConfig)}
    data = replace(sweep.data, **data_values, seed=cell.seed)
    if train_values.get("lora_r", None) == 0:  # a grid's full fine-tuning cell: the adapters' settings don't apply
        train_values.update({f.name: f.default for f in fields(TrainConfig) if f.name in runsettings.LORA_FIELDS[1:]})
    if data.source.renders_chat and not data.tokenizer:  # conversations: rendered with the sweep's model's template
        data = replace(data, tokenizer=sweep.model)
    train = replace(sweep.train, **train_values, run_name=cell.name, output_dir=str(sweep.runs / cell.name),
                    val_data_path=str(validation_file(sweep, data) or ""))
    return CellConfigs(data, train)


def validation_file(sweep: Sweep, data: DataConfig):
    """The validation pairs every cell of the sweep is measured on, when the source shares them: eval_seed's. None
    for a source that does not (your pairs: their held-out rows, the same for every seed, a permutation seeded by
    the row count before any flip, are the pair file's own validation file, which `dpo train` finds)."""
    from dpo.data.pairs import val_pairs_name

    if not data.source.shared_validation:
        return None
    return Path(data.out_dir) / val_pairs_name(data.format, data.eval_size, sweep.eval_seed, data.fewshot)


def scored_items(path: Path, table: dict, data: DataConfig) -> dict:
    """[eval] eval_start / eval_size: HellaSwag items scored apart from [data]'s evaluation set, which then gives
    only the validation and calibration pairs (so that no item both measures a margin and is scored). Checked
    to share no item with that set or with the training pool (with train_from_val: the source items before
    train_start, which the pool skips)."""
    given = {k: table[k] for k in SCORED_KEYS if k in table}
    if not given:
        return {}
    for key, value in given.items():
        check_value(path, "eval", key, value, int)
    start, size = given.get("eval_start", data.eval_start), given.get("eval_size", data.eval_size)
    if start < 0 or size < 1:
        raise InputError(f"{path}: [eval] eval_start {start}, eval_size {size}: expected a start >= 0 and a size >= 1")
    held = range(data.eval_start, data.eval_start + data.eval_size)
    scored = range(start, start + size)
    if max(scored.start, held.start) < min(scored.stop, held.stop):
        raise InputError(f"{path}: [eval] scores val[{start}:{start + size}], which overlaps [data]'s evaluation set "
                         f"val[{held.start}:{held.stop}] (the validation and calibration pairs): expected disjoint "
                         "items, or no eval_start / eval_size in [eval]")
    if data.train_from_val and data.source.hellaswag_items:
        last = scored.stop - 1 - (0 if scored.stop <= held.start else len(held))  # its index in that source
        if last >= data.train_start:
            raise InputError(f"{path}: [eval] scores val[{start}:{start + size}], but with train_from_val the "
                             f"training pool is the validation items outside val[{held.start}:{held.stop}] from "
                             f"index {data.train_start} on: expected train_start >= {last + 1} in [data] (the "
                             "items scored come before the pool)")
        if data.format == "mc" and data.fewshot and not data.fewshot_file and \
                min(data.fewshot_index_list(), default=last + 1) <= last:
            raise InputError(f"{path}: [eval] scores val[{start}:{start + size}], which holds the mc prompts' "
                             f"few-shot items (fewshot_indices {data.fewshot_indices}): expected indices above {last}")
    return {"eval_start": start, "eval_size": size}


class EvalConfigs(NamedTuple):
    eval: EvalConfig
    data: DataConfig


def eval_configs(sweep: Sweep, model: str, out_dir: Path, data: DataConfig) -> EvalConfigs:
    """(EvalConfig, DataConfig) to score `model`: the mc prompts use eval_seed, for every cell and the base."""
    return EvalConfigs(replace(sweep.eval, model=model, out_dir=str(out_dir)),
                       replace(data, seed=sweep.eval_seed, **sweep.scored))


NAME_MAX = 255  # bytes in a file or folder name (ext4, XFS, APFS, NTFS): a cell's name is its folder's


def check_name(sweep: Sweep, cell: Cell) -> None:
    """A cell's name fits in a folder name: else the whole sweep would stop at that cell's folder (OSError: File
    name too long) before running any, so the file is refused as it is read."""
    size = len(cell.name.encode("utf-8"))
    if size > NAME_MAX:
        where = "an [[extra]] table" if cell.extra else "[grid]"
        raise InputError(f"{sweep.path}: cell {cell.name[:80]}...: its name, its folder's, is {size} bytes, more than "
                         f"a folder name may have ({NAME_MAX}): fewer or shorter keys and values in {where}")


def check_cell(sweep: Sweep, cell: Cell) -> None:
    """What `train` would refuse (the configs' own validate()), found before hours of work; and a name too long
    for its folder."""
    check_name(sweep, cell)
    data, train = cell_configs(sweep, cell)
    try:
        data.validate()
        train.validate()
        made, setting = data.source.validation_count(data), data.source.validation
        if made == 0:
            raise InputError(f"{setting} = 0 leaves no validation pairs to measure the cells on; expected a "
                             f"{setting} above 0 in [data] ({data.source.validation_values})")
        if made is not None:
            check_calibration(cell, train, made, setting)
    except InputError as e:
        raise InputError(f"{sweep.path}: cell {cell.name}: {e}") from None


def check_calibration(cell: Cell, train: TrainConfig, made: int, where: str) -> None:
    """An audit (an audit cell, --label-fix relabel/filter, --eps auto/posterior) calibrates on the `made`
    validation pairs after those that measure the policy: at least MIN_CALIBRATION must be left (the audit
    would refuse fewer). A training cell's val_size 0 measures on all of them; an audit cell's skips none."""
    if not (cell.kind == "audit" or train.label_fix in ("relabel", "filter") or train.eps in EPS_WORDS):
        return
    measured = train.val_size if train.val_size or cell.kind == "audit" else made
    if made - measured < MIN_CALIBRATION:
        raise InputError(f"the audit calibrates on the validation pairs after the {measured} that measure the policy "
                         f"(val_size {train.val_size}), and {where} makes {made}: expected a val_size at least "
                         f"{MIN_CALIBRATION} below that")


def job_dir(sweep: Sweep, name: str) -> Path:
    return sweep.runs / name


def find_cells(sweep: Sweep, names) -> list:
    """Cells (and BASE) by name, in the given order; an unknown name is an InputError listing the cells."""
    by_name = {c.name: c for c in sweep.audits + sweep.cells}
    bad = [n for n in names if n != BASE and n not in by_name]
    if bad:
        shown = "\n  ".join([BASE] + list(by_name))
        raise InputError(f"{sweep.path}: no cell named {bad[0]!r}; the cells are:\n  {shown}")
    return [BASE if n == BASE else by_name[n] for n in names]


def read_result(sweep: Sweep, name: str) -> tuple:
    """(the job's result, '') when its result.json is sound; (None, what is wrong, naming the file) when it is
    damaged (cut short, edited, other types: dpo/study/records.py); (None, '') when there is none."""
    path = job_dir(sweep, name) / "result.json"
    if not os.path.lexists(path):
        return None, ""
    kind = "base" if name == BASE else "audit" if any(c.name == name for c in sweep.audits) else "train"
    return records.read_result(path, kind)


def status(sweep: Sweep, name: str) -> str:
    """'done' (a sound result.json), 'damaged' (a result.json that does not read: the job counts as unfinished and
    runs again), 'failed' (error.log), 'partial' (started, not finished) or 'missing'."""
    folder = job_dir(sweep, name)
    if os.path.lexists(folder / "result.json"):
        return "damaged" if read_result(sweep, name)[1] else "done"
    if (folder / "error.log").is_file():
        return "failed"
    return "partial" if folder.is_dir() else "missing"
