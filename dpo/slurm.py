"""`dpo sweep FILE --launcher slurm`: a sweep's unfinished cells as one Slurm job array.

Each array task runs exactly what the local runner runs for one cell, `python -m dpo sweep FILE --only CELL` (data
-> train -> eval -> result.json written last), in this repository folder with this Python, so local and Slurm runs
write the same files and can be mixed. The cluster needs a filesystem shared by its nodes holding the repository,
its .venv and runs_dir (and the data and cache folders).

Per submission, <runs_dir>/<sweep>/slurm/ gets cells-<stamp>.txt (task i runs line i + 1), sweep-<stamp>.sbatch,
and the task logs <job>_<task>.log; submitted.json maps each job id to its cells. A rerun submits only the cells
that are neither finished nor queued or running in an earlier job (asked of `squeue`); a task that ended without a
result.json and without writing error.log itself (killed: time limit, out of memory) gets an error.log with the
end of its log, like a failed local cell. Two minutes before a task's time limit Slurm sends it SIGTERM: training
finishes its step, saves a checkpoint and stops, and the next submission resumes the cell from there.

Options, from a [slurm] table of the sweep file and `--slurm KEY=VALUE` flags (flags win): partition, time
("4:00:00"), gpus_per_task, cpus_per_task, mem ("32G"), account, and extra (a list of further `#SBATCH` lines,
e.g. ["--constraint=h100"]).
"""

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dpo.files import InputError, atomic_write_json, atomic_write_text

OPTIONS = {"partition": str, "time": str, "gpus_per_task": int, "cpus_per_task": int, "mem": str, "account": str,
           "extra": list}
FLAGS = {"partition": "--partition", "time": "--time", "gpus_per_task": "--gpus-per-task",
         "cpus_per_task": "--cpus-per-task", "mem": "--mem", "account": "--account"}


def check_options(where: str, table: dict) -> dict:
    """A [slurm] table (or parsed flags) checked: known keys, right types. Errors name where and the key."""
    out = {}
    for key, value in table.items():
        if key not in OPTIONS:
            raise InputError(f"{where}: unknown slurm option {key!r}; expected one of: {', '.join(OPTIONS)}")
        kind = OPTIONS[key]
        ok = (isinstance(value, list) and all(isinstance(v, str) for v in value) if kind is list else
              isinstance(value, int) and not isinstance(value, bool) and value >= 0 if kind is int else
              isinstance(value, str) and value.strip() != "" and "\n" not in value)
        if not ok:
            expected = {list: "a list of strings", int: "a whole number >= 0", str: "a non-empty string"}[kind]
            raise InputError(f"{where}: slurm option {key} = {value!r}: expected {expected}")
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


def script(sweep, cells_file: Path, n_tasks: int, options: dict, log_dir: Path) -> str:
    """The sbatch script of a job array with one task per line of cells_file."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name=dpo-{sweep.name}", f"#SBATCH --array=0-{n_tasks - 1}",
             f"#SBATCH --output={log_dir}/%A_%a.log",
             "#SBATCH --signal=B:TERM@120"]  # 2 minutes before the time limit: train checkpoints and stops
    lines += [f"#SBATCH {FLAGS[k]}={options[k]}" for k in FLAGS if k in options]
    lines += [f"#SBATCH {line}" for line in options.get("extra", [])]
    worker = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-m", "dpo", "sweep", sweep.path))
    lines += ["# one cell per task: exactly what `dpo sweep FILE --only CELL` runs locally",
              "set -euo pipefail",
              f"cd {shlex.quote(str(Path.cwd()))}",
              f'cell=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(cells_file))})',
              'echo "cell $cell on $(hostname), job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
              f'exec {worker} --only "$cell"']
    return "\n".join(lines) + "\n"


def _run(cmd: list) -> str:
    if shutil.which(cmd[0]) is None:
        raise InputError(f"`{cmd[0]}` is not on PATH: --launcher slurm needs a Slurm cluster's client commands "
                         "(on a test machine: experiments/slurm/local_cluster.sh start)")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise InputError(f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return done.stdout


def queued(folder: Path) -> dict:
    """cell name -> job id of the earlier submissions' tasks still pending or running (per squeue)."""
    path = folder / "submitted.json"
    if not path.is_file():
        return {}
    submitted = json.loads(path.read_text())
    out = {}
    for job, cells in submitted.items():
        lines = _run(["squeue", "-h", "-r", "-j", job, "-o", "%K"]).split() if shutil.which("squeue") else []
        for task in lines:
            if task.isdigit() and int(task) < len(cells):
                out[cells[int(task)]] = job
    return out


def note_dead_tasks(sweep, folder: Path, busy: dict, status) -> None:
    """Cells of earlier jobs that are no longer queued, not done, and left no error.log: one from their log."""
    path = folder / "submitted.json"
    if not path.is_file():
        return
    for job, cells in json.loads(path.read_text()).items():
        for task, name in enumerate(cells):
            if name in busy or status(sweep, name) != "partial":
                continue
            log = folder / f"{job}_{task}.log"
            tail = log.read_text(errors="replace").splitlines()[-30:] if log.is_file() else []
            (sweep.runs / name / "error.log").write_text(
                "\n".join(tail + [f"slurm task {job}_{task} ended without result.json (log: {log})"]) + "\n")


def submit(sweep, pending: list, options: dict, dry_run: bool, status) -> int:
    """Submit the pending cells (names) that are not queued already; print the job id and how to follow it."""
    folder = sweep.runs / "slurm"
    busy = queued(folder) if not dry_run else {}
    note_dead_tasks(sweep, folder, busy, status)
    todo = [n for n in pending if n not in busy]
    if busy:
        print(f"{len(busy)} cells are queued or running in earlier jobs ({', '.join(sorted(set(busy.values())))})")
    if not todo:
        print(f"sweep {sweep.name}: nothing to submit ({'all cells finished' if not pending else 'all queued'})")
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cells_file, script_file = folder / f"cells-{stamp}.txt", folder / f"sweep-{stamp}.sbatch"
    text = script(sweep, cells_file, len(todo), options, folder)
    if dry_run:
        print(f"# {script_file} (not submitted), tasks: {', '.join(todo)}\n{text}", end="")
        return 0
    atomic_write_text(cells_file, "".join(n + "\n" for n in todo))
    atomic_write_text(script_file, text)
    out = _run(["sbatch", "--parsable", str(script_file)]).strip()
    job = re.split(r"[;\s]", out)[0]
    path = folder / "submitted.json"
    submitted = json.loads(path.read_text()) if path.is_file() else {}
    submitted[job] = todo
    atomic_write_json(path, submitted, indent=1)
    print(f"submitted job {job}: {len(todo)} tasks ({script_file})\n"
          f"  follow: squeue -j {job}; logs: {folder}/{job}_<task>.log; rerun this command to submit what is "
          f"unfinished; tables and plots: make report SWEEP={sweep.path}")
    return 0
