"""`dpo sweep FILE --launcher slurm`: a sweep's unfinished cells as one Slurm job array.

Each array task runs exactly what the local runner runs for one cell (data -> train -> eval -> result.json written
last), in this repository folder with this Python, so local and Slurm runs write the same files and can be mixed.
The cluster needs a filesystem shared by its nodes holding the repository, its .venv and runs_dir (and the data and
cache folders).

Per submission, <runs_dir>/<sweep>/slurm/ gets cells-<stamp>.json (a JSON list of cell names), sweep-<stamp>.sbatch,
and the task logs <job>_<task>.log; submitted.json maps each job id to its cells. Task K runs
`python -m dpo sweep FILE --cells-file cells-<stamp>.json --only-index K`, the cell at index K of the list: a cell
name never becomes a line of shell or of a text file. A rerun submits only the cells that are neither finished nor
queued or running in an earlier job (asked of `squeue`); a task that ended without a result.json and without writing
error.log itself (killed: time limit, out of memory) gets an error.log with the end of its log, like a failed local
cell. Two minutes before a task's time limit Slurm sends it SIGTERM: training finishes its step, saves a checkpoint
and stops, and the next submission resumes the cell from there.

Options, from a [slurm] table of the sweep file and `--slurm KEY=VALUE` flags (flags win): partition, time
("4:00:00"), gpus_per_task, cpus_per_task, mem ("32G"), account, and extra (a list of further `#SBATCH` options,
each one `--option` or `--option=value`, e.g. ["--constraint=h100"]).

Nothing from the sweep file reaches the script unchecked: values are single words without control characters,
whitespace, quotes or backslashes (checked here and by the sweep reader), and every word of the script is quoted
with shlex.quote (sbatch itself reads `#SBATCH` lines with the same quoting rules, no shell).
"""

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dpo.core.files import InputError, atomic_write_json, atomic_write_text, brief, control_character, read_json

OPTIONS = {"partition": str, "time": str, "gpus_per_task": int, "cpus_per_task": int, "mem": str, "account": str,
           "extra": list}
FLAGS = {"partition": "--partition", "time": "--time", "gpus_per_task": "--gpus-per-task",
         "cpus_per_task": "--cpus-per-task", "mem": "--mem", "account": "--account"}


EXTRA = re.compile(r"--[A-Za-z0-9][A-Za-z0-9_-]*(=[^\s'\"\\]+)?")  # one --option or --option=value, a single word


def word_problem(value: str) -> str:
    """'' when value is one word sbatch and bash read back unchanged once quoted, else what is wrong with it."""
    bad = control_character(value)
    if bad:
        return f"the control character {bad} is not allowed"
    if not value.strip() or any(c.isspace() or c in "'\"\\" for c in value):
        return "expected one word, without whitespace, quotes or backslashes"
    return ""


def check_options(where: str, table: dict) -> dict:
    """A [slurm] table (or parsed flags) checked: known keys, right types, single words (no control characters,
    whitespace or quotes), extra items each one --option[=value]. Errors name where and the key."""
    out = {}
    for key, value in table.items():
        if key not in OPTIONS:
            raise InputError(f"{where}: unknown slurm option {key!r}; expected one of: {', '.join(OPTIONS)}")
        kind = OPTIONS[key]
        ok = (isinstance(value, list) and all(isinstance(v, str) for v in value) if kind is list else
              isinstance(value, int) and not isinstance(value, bool) and value >= 0 if kind is int else
              isinstance(value, str))
        if not ok:
            expected = {list: "a list of strings", int: "a whole number >= 0", str: "a non-empty string"}[kind]
            raise InputError(f"{where}: slurm option {key} = {brief(value)}: expected {expected}")
        for item in value if kind is list else [value] if kind is str else []:
            problem = word_problem(item)
            if not problem and kind is list and not EXTRA.fullmatch(item):
                problem = "expected one --option or --option=value"
            if problem:
                raise InputError(f"{where}: slurm option {key} = {value!r}: {problem}")
        out[key] = value
    return out


def parse_flags(flags) -> dict:
    """['partition=gpu', 'gpus_per_task=1', 'extra=--constraint=h100'] -> options (extra may repeat)."""
    table = {}
    for flag in flags:
        key, eq, value = flag.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise InputError(f"--slurm {flag!r}: expected KEY=VALUE, KEY one of {', '.join(OPTIONS)}")
        if OPTIONS.get(key) is list:
            table.setdefault(key, []).append(value)
        elif OPTIONS.get(key) is int:
            table[key] = int(value) if value.strip().isdigit() else value
        else:
            table[key] = value
    return check_options("--slurm", table)


def sbatch_line(option: str) -> str:
    """`#SBATCH <option>`, quoted. Refused: a control character (it could end the line and start another) and a
    backslash (sbatch reads it as an escape even inside quotes), e.g. in the path of runs_dir."""
    if control_character(option) or "\\" in option:
        raise InputError(f"slurm option {option!r}: control characters and backslashes cannot be passed to sbatch")
    return f"#SBATCH {shlex.quote(option)}"


def script(sweep, cells_file: Path, n_tasks: int, options: dict, log_dir: Path) -> str:
    """The sbatch script of a job array whose task K runs the cell at index K of the JSON list in cells_file."""
    lines = [sbatch_line(option) for option in (
        f"--job-name=dpo-{sweep.name}", f"--array=0-{n_tasks - 1}", f"--output={log_dir}/%A_%a.log",
        "--signal=B:TERM@120",  # 2 minutes before the time limit: train checkpoints and stops
        *(f"{FLAGS[k]}={options[k]}" for k in FLAGS if k in options), *options.get("extra", []))]
    worker = shlex.join([sys.executable, "-m", "dpo", "sweep", str(sweep.path), "--cells-file", str(cells_file),
                         "--only-index"])
    lines = ["#!/bin/bash", *lines,
             "# one cell per task: exactly what `dpo sweep FILE --only CELL` runs locally, for the cell at index",
             "# SLURM_ARRAY_TASK_ID of the JSON list in the cells file",
             "set -euo pipefail",
             f"cd {shlex.quote(str(Path.cwd()))}",
             'echo "task ${SLURM_ARRAY_TASK_ID} of job ${SLURM_ARRAY_JOB_ID} on $(hostname)"',
             f'exec {worker} "$SLURM_ARRAY_TASK_ID"']
    return "\n".join(lines) + "\n"


def task_cell(cells_file: str, index) -> str:
    """The cell name at index of the JSON list in cells_file (a Slurm task's cell)."""
    if not cells_file or index is None:
        raise InputError("--cells-file and --only-index go together (a Slurm task's cell: an index into a list)")
    names = read_json(cells_file, "a JSON list of cell names (written by --launcher slurm)")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{cells_file}: expected a JSON list of cell names")
    if not 0 <= index < len(names):
        raise InputError(f"--only-index {index}: {cells_file} lists {len(names)} cells (indices 0-{len(names) - 1})")
    return names[index]


def _run(cmd: list) -> str:
    if shutil.which(cmd[0]) is None:
        raise InputError(f"`{cmd[0]}` is not on PATH: --launcher slurm needs a Slurm cluster's client commands "
                         "(on a test machine: experiments/slurm/local_cluster.sh start)")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise InputError(f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return done.stdout


def submitted_jobs(folder: Path, names) -> dict:
    """submitted.json: job id -> the cell names of its tasks, checked (job ids are numbers; a name that is not one of
    the sweep's, `names`, stands for no cell, so nothing is ever written outside the sweep's folders)."""
    path = folder / "submitted.json"
    if not path.is_file():
        return {}
    submitted = read_json(path, "a JSON object: Slurm job id -> list of cell names (written by --launcher slurm)")
    if not (isinstance(submitted, dict) and all(re.fullmatch(r"\d+", job) and isinstance(cells, list)
                                                for job, cells in submitted.items())):
        raise InputError(f"{path}: expected a JSON object of Slurm job ids and lists of cell names")
    known = set(names)
    return {job: [c if isinstance(c, str) and c in known else None for c in cells] for job, cells in submitted.items()}


def queued(folder: Path, names) -> dict:
    """cell name -> job id of the earlier submissions' tasks still pending or running (per squeue)."""
    out = {}
    for job, cells in submitted_jobs(folder, names).items():
        lines = _run(["squeue", "-h", "-r", "-j", job, "-o", "%K"]).split() if shutil.which("squeue") else []
        for task in lines:
            if task.isdigit() and int(task) < len(cells) and cells[int(task)] is not None:
                out[cells[int(task)]] = job
    return out


def note_dead_tasks(sweep, folder: Path, busy: dict, status, names) -> None:
    """Cells of earlier jobs that are no longer queued, not done, and left no error.log: one from their log."""
    for job, cells in submitted_jobs(folder, names).items():
        for task, name in enumerate(cells):
            if name is None or name in busy or status(sweep, name) != "partial":
                continue
            log = folder / f"{job}_{task}.log"
            tail = log.read_text(errors="replace").splitlines()[-30:] if log.is_file() else []
            tail.append(f"slurm task {job}_{task} ended without result.json (log: {log})")
            atomic_write_text(sweep.runs / name / "error.log", "\n".join(tail) + "\n")


def submit(sweep, pending: list, options: dict, dry_run: bool, status) -> int:
    """Submit the pending cells (names) that are not queued already; print the job id and how to follow it."""
    folder = sweep.runs / "slurm"
    names = ["base"] + [c.name for c in sweep.cells]
    busy = queued(folder, names) if not dry_run else {}
    note_dead_tasks(sweep, folder, busy, status, names)
    todo = [n for n in pending if n not in busy]
    if busy:
        print(f"{len(busy)} cells are queued or running in earlier jobs ({', '.join(sorted(set(busy.values())))})")
    if not todo:
        print(f"sweep {sweep.name}: nothing to submit ({'all cells finished' if not pending else 'all queued'})")
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cells_file, script_file = folder / f"cells-{stamp}.json", folder / f"sweep-{stamp}.sbatch"
    text = script(sweep, cells_file, len(todo), options, folder)
    if dry_run:
        print(f"# {script_file} (not submitted), tasks: {', '.join(todo)}\n{text}", end="")
        return 0
    atomic_write_json(cells_file, todo, indent=1)
    atomic_write_text(script_file, text)
    out = _run(["sbatch", "--parsable", str(script_file)]).strip()
    job = re.split(r"[;\s]", out)[0]
    if not re.fullmatch(r"\d+", job):
        raise InputError(f"sbatch answered {out!r}, expected a job id")
    path = folder / "submitted.json"
    submitted = read_json(path, "a JSON object of job ids and cell names") if path.is_file() else {}
    submitted[job] = todo
    atomic_write_json(path, submitted, indent=1)
    print(f"submitted job {job}: {len(todo)} tasks ({script_file})\n"
          f"  follow: squeue -j {job}; logs: {folder}/{job}_<task>.log; rerun this command to submit what is "
          f"unfinished; tables and plots: make report SWEEP={sweep.path}")
    return 0
