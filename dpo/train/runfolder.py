"""The run folder of `dpo train` (runs/<run>/, or --output-dir): checked before anything is written into it, locked
for the run's lifetime, left as it was after a failed start; the metrics it logs (metrics.jsonl and the dashboards),
and what config.json records of the checkout and the machine (git commit, peak memory).
"""

import os
import platform
import resource
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from dpo.core import dashboards, models
from dpo.core.files import InputError, LockBusy, RunInUse, json_text, lock_file, make_dirs, open_nofollow, writing
from dpo.core.metrics import parse_line


def lock_run_dir(out_dir: Path):
    """An exclusive lock on the run folder for this process's lifetime: a second `dpo train` on it fails at once."""
    try:
        return lock_file(out_dir / ".lock", wait=False, note=f"pid {os.getpid()}\n")
    except LockBusy as busy:
        raise RunInUse(f"{out_dir} is in use by another `dpo train` ({busy or 'another process'}); wait for it, "
                       "or pick another --run-name / --output-dir") from None


@contextmanager
def started(out_dir: Path, main: bool):
    """A start of a run in out_dir: the folder made and locked by the main process (the open lock file is yielded;
    None in the other processes). A start that fails (an exception inside) leaves nothing behind: no folder it
    made, no lock file in one that was there (a busy folder is another run's)."""
    created, lock_made, lock = not out_dir.exists(), not (out_dir / ".lock").exists(), None
    try:
        if main:
            make_dirs(out_dir)
            lock = lock_run_dir(out_dir)
        yield lock
    except BaseException as e:
        if main:
            leave_nothing(out_dir, created and not isinstance(e, RunInUse), lock_made and not isinstance(e, RunInUse))
        if lock:
            lock.close()
        raise


def leave_nothing(out_dir: Path, created: bool, lock_made: bool) -> None:
    """After a failed start: remove the run folder if this start made it, else the lock file if it made that."""
    if created:
        shutil.rmtree(out_dir, ignore_errors=True)
    elif lock_made:
        (out_dir / ".lock").unlink(missing_ok=True)


# What a run folder holds (besides config.json): a folder that has these only is a run that has not written its
# config.json yet (stopped during setup; a sweep cell, whose folder, worker.log and error.log the sweep makes first).
RUN_FILES = (".lock", ".sweep.lock", "metrics.jsonl", "summary.json", "checkpoints", "final", "final.tmp", "eval",
             "error.log", "worker.log", "result.json")
WRITTEN_IN_PLACE = (".lock", "metrics.jsonl")  # opened for writing, not replaced atomically


def check_output_dir(out_dir: Path) -> None:
    """Refuse an output folder that is not a dpo-noise run: a file, a dangling link, or a non-empty folder whose
    config.json is not a run's (a JSON object with a "run" key) or, without config.json, that holds anything but
    RUN_FILES and TensorBoard event files. A model or data folder is never written into. Also refuses symbolic
    links in place of the files a run writes in place (WRITTEN_IN_PLACE)."""
    if out_dir.is_symlink() and not out_dir.exists():
        raise InputError(f"{out_dir}: the output folder is a symbolic link to nothing ({os.readlink(out_dir)})")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: not a folder (expected a run folder for --output-dir)")
    entries = sorted(p.name for p in out_dir.iterdir())
    if "config.json" in entries:
        ours = models.run_config(out_dir) is not None
    else:
        ours = all(name in RUN_FILES or name.startswith("events.out.tfevents.") for name in entries)
    if not ours:
        raise InputError(f"{out_dir} is not a dpo-noise run folder (it holds {', '.join(entries[:5])}"
                         f"{', ...' if len(entries) > 5 else ''}, and no config.json of a run): refusing to write "
                         "into it; pick an empty or new --output-dir")
    for name in WRITTEN_IN_PLACE:
        if (out_dir / name).is_symlink():
            raise InputError(f"{out_dir / name} is a symbolic link: refusing to write through it (remove the link)")


class Logger:
    """Every value to metrics.jsonl and the dashboards of --report-to (dpo/core/dashboards.py: TensorBoard in
    runs/<run>/ by default), as `<split>/<name>`; a resumed run drops lines after its step."""

    def __init__(self, out_dir: Path, start_step: int, report_to: str = "tensorboard", run: str = "",
                 config: dict = None):
        self.path = path = out_dir / "metrics.jsonl"
        self.file = open_nofollow(path, "a+", errors="replace")  # never through a planted link
        self.file.seek(0)
        lines = self.file.read().splitlines()
        rows = [parse_line(ln) for ln in lines]  # (an earlier version's lines under today's names)
        if None in rows:  # cut by a crash (or edited): they cannot be told apart from steps after the checkpoint
            print(f"warning: {path}: dropped {rows.count(None)} damaged lines (the first: line "
                  f"{rows.index(None) + 1})", file=sys.stderr)
        kept = [(ln, row) for ln, row in zip(lines, rows) if row is not None and row["step"] <= start_step]
        self.logged = {(row["step"], row["split"]) for _, row in kept}  # (step, split)
        with writing(path):
            self.file.seek(0)
            self.file.truncate()
            self.file.writelines(ln + "\n" for ln, _ in kept)
        with writing(out_dir):
            self.sinks = dashboards.open_all(report_to, out_dir, run or out_dir.name, config or {}, start_step)

    def log(self, step: int, values: dict, split: str) -> None:
        scalars = {f"{split}/{k}": v for k, v in values.items()}
        for sink in self.sinks:
            sink.log(scalars, step)
        with writing(self.path):
            self.file.write(json_text({"step": step, "split": split, **values}, ensure_ascii=True) + "\n")
            self.file.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.file.close()


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def git_commit() -> str:
    """The commit of the dpo-noise checkout this package runs from; "unknown" for an installed copy (whose folder
    may sit inside some other git repository, whose commit would say nothing about this code)."""
    checkout = Path(__file__).resolve().parents[2]  # dpo/train/runfolder.py -> the checkout
    if not (checkout / "setup.py").is_file() or not (checkout / ".git").exists():
        return "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=checkout)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine(device: torch.device, processes: int) -> dict:
    """What config.json records of the code and the machine: the git commit, the device, the number of
    processes, the device's name and the versions."""
    return {"git_commit": git_commit(), "device": str(device), "processes": processes,
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__}}
