"""`dpo sweep FILE.toml`: the cells of a sweep file (dpo/study/sweep.py reads, expands and checks it) run resumably, one
after another in this process, one per GPU in worker processes, or as a Slurm job array (dpo/study/slurm.py).

Rerunning: a cell with result.json is skipped, no work at all (a damaged one, cut short or edited, counts as
unfinished: dpo/study/records.py); a cell with a finished training but no result is only evaluated; a cell with
checkpoints resumes training (`--resume`); anything else starts over. A cell trained (or partly) with other settings
than the file gives now (its config.json, compared by dpo/train/runsettings.py) is trained again; result.json
records the settings of its weights. A failing cell writes its traceback to <cell>/error.log, prints one line, and
the sweep goes on. To redo a cell, delete its folder. A cell is run under its lock (<cell>/.sweep.lock, from its
start to result.json): a second sweep of the same file skips it ("running elsewhere"). With --gpus 0,1 each cell
runs in its own `python -m dpo sweep FILE --only CELL` with CUDA_VISIBLE_DEVICES set, one per GPU at a time (its
output in <cell>/worker.log); Ctrl-C or SIGTERM (passed on to the workers) makes every running cell checkpoint and
stop, to resume on the next run. With --launcher slurm the unfinished cells go to a Slurm cluster as one job array
instead (dpo/study/slurm.py; [slurm] table: its options).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

from dpo.core.config import DataConfig, TrainConfig
from dpo.core.files import (
    InputError,
    LockBusy,
    RunInUse,
    atomic_write_json,
    atomic_write_text,
    lock_file,
    lock_held,
    make_dirs,
    open_nofollow,
    read_json,
    sha256_file,
)
from dpo.core.metrics import ACCURACIES, validation
from dpo.eval import harness
from dpo.study import slurm
from dpo.study.sweep import (
    BASE,
    Cell,
    Sweep,
    cell_configs,
    check_calibration,
    eval_configs,
    find_cells,
    job_dir,
    load,
    read_result,
    status,
    validation_file,
)
from dpo.train import runsettings

CELL_LOCK = ".sweep.lock"  # held by the process running a cell, from its start to its result.json
POLL_SECONDS = 5.0  # how often a parallel sweep looks at its workers


def ensure_cell_data(sweep: Sweep, cell: Cell, data: DataConfig, train: TrainConfig):
    """The cell's training pairs and eval_seed's validation pairs, made when missing: (training file, validation
    file). With [data] pairs, the checks that needed the file's row count: a holdout that rounds to no rows (nothing
    would measure the cell), and the audit's calibration pairs (check_calibration)."""
    from dpo.data.prepare import ensure_pairs

    made = ensure_pairs(data)
    shared = validation_file(sweep, data)
    if shared is not None:
        if not shared.is_file():
            ensure_pairs(replace(data, seed=sweep.eval_seed))
        return made.train, shared
    setting = data.source.validation
    if made.val is None:
        raise InputError(f"[data] {setting} {getattr(data, setting):g} makes no validation pairs "
                         f"{data.source.origin(data)}, so nothing would measure the cells: expected a larger {setting} "
                         f"({data.source.validation_values})")
    if data.source.validation_count(data) is None:
        check_calibration(cell, train, len(read_json(made.val, "validation pairs")), str(made.val))
    return made.train, made.val


# --------------------------------------------------------------------------------------------- running a cell

def resolved_settings(sweep: Sweep) -> dict:
    """What sweep.json records: the file, its sha256, the settings after defaults, and every cell."""
    return {"sweep": sweep.name, "file": str(sweep.path), "sha256": sha256_file(sweep.path),
            "description": sweep.description, "model": sweep.model, "keep_weights": sweep.keep_weights,
            "eval_seed": sweep.eval_seed, "runs": str(sweep.runs), "results": str(sweep.results),
            "data": asdict(sweep.data), "train": asdict(sweep.train), "eval": asdict(sweep.eval),
            "grid": sweep.grid, "seeds": sweep.seeds, "extra": sweep.extra,
            "cells": [{"name": c.name, "settings": c.settings, "seed": c.seed, "extra": c.extra}
                      for c in sweep.cells],
            **({"audits": [c.name for c in sweep.audits]} if sweep.audits else {}),
            **({"lm_eval_tasks": sweep.lm_eval_tasks} if sweep.lm_eval_tasks else {})}


def write_settings(sweep: Sweep) -> None:
    """sweep.json, when cells are about to run (a finished sweep's is left as it is, byte for byte)."""
    make_dirs(sweep.runs)
    atomic_write_json(sweep.runs / "sweep.json", resolved_settings(sweep), indent=1)


def delete_weights(folder: Path) -> None:
    for sub in ("checkpoints", "final"):
        shutil.rmtree(folder / sub, ignore_errors=True)


def run_base(sweep: Sweep) -> dict:
    """Score the base model once per sweep -> base/eval/results.json, then base/result.json."""
    from dpo.eval import score

    folder = job_dir(sweep, BASE)
    eval_cfg, data = eval_configs(sweep, sweep.model, folder / "eval", sweep.data)
    t0 = time.perf_counter()
    score.run(eval_cfg, data)
    result = {"sweep": sweep.name, "cell": BASE, "model": sweep.model, "data": asdict(data),
              "eval_settings": asdict(eval_cfg), "eval": read_json(folder / "eval" / "results.json", "eval results"),
              "seconds": {"eval": time.perf_counter() - t0, "total": time.perf_counter() - t0},
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(folder / "result.json", result, indent=1)
    return result


KEPT_ON_RETRAIN = (".lock", CELL_LOCK, "worker.log")  # what a cell trained again keeps of its folder


def retrain_if_changed(sweep: Sweep, cell: Cell, data: DataConfig, train_cfg: TrainConfig) -> None:
    """A cell trained (or partly trained) with other settings than the sweep file gives now (its config.json,
    compared by dpo/train/runsettings.py) is trained again: its training's outputs are removed, with a note naming the
    changes. Weights of other settings never end up beside this file's settings in result.json."""
    from dpo.core import models

    folder = job_dir(sweep, cell.name)
    config = models.run_config(folder)
    changes = runsettings.record_changes(config, data, train_cfg) if config else []
    if not changes:
        return
    print(f"note: {cell.name} was trained with other settings than {sweep.path} gives now ({', '.join(changes)}): "
          "training it again", flush=True)
    for path in folder.iterdir():
        if path.name not in KEPT_ON_RETRAIN:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def run_cell(sweep: Sweep, cell: Cell) -> dict:
    """Train (or resume, or reuse a finished training of the same settings) and evaluate one cell; result.json
    written last, with the settings its weights were trained with (its config.json)."""
    from dpo.core import models
    from dpo.eval import score
    from dpo.train import checkpoint, train

    folder = job_dir(sweep, cell.name)
    data, train_cfg = cell_configs(sweep, cell)
    t0 = time.perf_counter()
    retrain_if_changed(sweep, cell, data, train_cfg)
    finished = (folder / "summary.json").is_file() and (folder / "final").is_dir()
    if finished:
        print(f"  {cell.name}: training finished earlier, evaluating it")
        summary = read_json(folder / "summary.json", "a training summary")
    else:
        ensure_cell_data(sweep, cell, data, train_cfg)
        train_cfg = replace(train_cfg, resume=bool(checkpoint.checkpoints(folder)))
        summary = train.train(data, train_cfg)
        if summary.get("stopped"):
            raise KeyboardInterrupt  # Ctrl-C: train saved a checkpoint; the next sweep resumes it
    t1 = time.perf_counter()
    eval_cfg, eval_data = eval_configs(sweep, str(folder / "final"), folder / "eval", data)
    score.run(eval_cfg, eval_data)
    harnessed = {}  # the harness's tasks on final/, before its weights go
    if sweep.lm_eval_tasks:
        seconds = harness.evaluate(folder / "final", sweep.lm_eval_tasks, sweep.eval, folder / harness.RESULTS_FILE)
        harnessed = {"lm_eval": {"tasks": sweep.lm_eval_tasks, "file": harness.RESULTS_FILE, "seconds": seconds}}
    t2 = time.perf_counter()
    results = read_json(folder / "eval" / "results.json", "eval results")
    trained = models.run_config(folder) or {"data": asdict(data), "train": asdict(train_cfg)}
    if not sweep.keep_weights:
        delete_weights(folder)
    result = {"sweep": sweep.name, "cell": cell.name, "settings": cell.settings, "seed": cell.seed,
              "extra": cell.extra, "model": sweep.model, "data": trained["data"],
              "train": {**trained["train"], "resume": False}, "eval_settings": asdict(eval_cfg),
              "eval_seed": sweep.eval_seed, "val_seed": sweep.eval_seed, "train_summary": summary,
              "val_reward_accuracy": validation(summary).get("rewards/accuracies"), "eval": results,
              "val_pairs": trained.get("val_pairs"),
              "seconds": {"train": t1 - t0 if not finished else 0.0, "eval": t2 - t1, "total": t2 - t0},
              "reused_training": finished, "weights_kept": sweep.keep_weights, **harnessed,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(folder / "result.json", result, indent=1)
    return result


def run_audit_cell(sweep: Sweep, cell: Cell) -> dict:
    """`dpo audit` of the cell's pair file into its folder (audit.json, audit.jsonl, plots), calibrated on the
    validation pairs every cell is measured with (eval_seed's) after the first val_size; result.json last."""
    from dpo.audit import audit
    from dpo.core.config import AuditConfig

    data, train_cfg = cell_configs(sweep, cell)
    pairs_file, val_file = ensure_cell_data(sweep, cell, data, train_cfg)
    t0 = time.perf_counter()
    cfg = AuditConfig(pairs=str(pairs_file), model=sweep.model, val_file=str(val_file),
                      val_skip=train_cfg.val_size, score=train_cfg.audit_score, fix_threshold=train_cfg.fix_threshold,
                      out_dir=str(job_dir(sweep, cell.name)), max_length=train_cfg.max_length,
                      append_eos=train_cfg.append_eos, truncation_mode=train_cfg.truncation_mode,
                      precision="auto", device=train_cfg.device, cache_dir=train_cfg.cache_dir,
                      threads=train_cfg.threads)
    summary = audit.run(cfg)
    result = {"sweep": sweep.name, "cell": cell.name, "kind": "audit", "settings": cell.settings, "seed": cell.seed,
              "model": sweep.model, "data": asdict(data), "audit_settings": asdict(cfg), "audit": summary,
              "seconds": {"audit": time.perf_counter() - t0, "total": time.perf_counter() - t0},
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(job_dir(sweep, cell.name) / "result.json", result, indent=1)
    return result


def running_elsewhere(sweep: Sweep, name: str) -> bool:
    """Another process runs the cell: it holds the cell's lock (a sweep) or its run folder's (a `dpo train`)."""
    folder = job_dir(sweep, name)
    return lock_held(folder / CELL_LOCK) or lock_held(folder / ".lock")


def run_job(sweep: Sweep, job, index: str = "") -> str:
    """One cell (or BASE): 'skipped' when finished, 'elsewhere' when another process runs it (it holds the cell's
    lock, or a `dpo train` its run folder's), else 'done' or 'failed' (traceback in error.log). The cell's lock is
    held from the start to result.json, so two sweeps never run one cell, and no error.log is left beside a
    result."""
    name = job if job == BASE else job.name
    folder = job_dir(sweep, name)
    if status(sweep, name) == "done":
        return "skipped"
    make_dirs(folder)
    try:
        held = lock_file(folder / CELL_LOCK, wait=False, note=f"pid {os.getpid()} (dpo sweep)\n")
    except LockBusy:
        print(f"{index}{name}: running elsewhere (another process holds {folder / CELL_LOCK}); skipped", flush=True)
        return "elsewhere"
    with held:
        if status(sweep, name) == "done":  # finished by another process meanwhile
            return "skipped"
        damaged = read_result(sweep, name)[1]
        if damaged:
            print(f"{index}{name}: {damaged}: running it again", flush=True)
        if lock_held(folder / ".lock"):
            print(f"{index}{name}: running elsewhere (a `dpo train` holds {folder / '.lock'}); skipped", flush=True)
            return "elsewhere"
        (folder / "error.log").unlink(missing_ok=True)
        return _run_held(sweep, job, name, folder, index)


def _run_held(sweep: Sweep, job, name: str, folder: Path, index: str) -> str:
    """run_job's work, with the cell's lock held."""
    print(f"{index}{name}: started", flush=True)
    t0 = time.perf_counter()
    try:
        result = (run_base(sweep) if job == BASE else run_audit_cell(sweep, job) if job.kind == "audit"
                  else run_cell(sweep, job))
    except RunInUse as e:  # a `dpo train` of its own holds the run folder
        print(f"{index}{name}: running elsewhere ({e}); skipped", flush=True)
        return "elsewhere"
    except Exception as e:
        atomic_write_text(folder / "error.log", traceback.format_exc())
        print(f"FAILED {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(traceback: {folder / 'error.log'})", flush=True)
        return "failed"
    (folder / "error.log").unlink(missing_ok=True)  # (one a Slurm check wrote meanwhile)
    ev = result.get("eval", {})
    shown = ", ".join(f"{m} {ev[m]:.4f}" for m in ACCURACIES if m in ev)
    if "audit" in result:
        shown = f"noise rate {result['audit']['eps_hat']:.3f} {result['audit']['eps_ci95']}"
    if result.get("val_reward_accuracy") is not None:
        shown += f", val reward accuracy {result['val_reward_accuracy']:.4f}"
    print(f"{index}{name}: done in {(time.perf_counter() - t0) / 60:.1f} min ({shown})", flush=True)
    return "done"


def stale_note(sweep: Sweep) -> str:
    """Finished cells whose recorded settings differ from what the file gives now where the numbers can differ
    (dpo/train/runsettings.py: paths, logging and fields added later with their defaults do not count); they are kept,
    not rerun."""
    changed = []
    for cell in sweep.cells:
        result = read_result(sweep, cell.name)[0]
        if result is None:
            continue
        changes = runsettings.record_changes(result, *cell_configs(sweep, cell))
        if changes:
            changed.append(f"{cell.name} ({changes[0]})")
    if not changed:
        return ""
    return (f"note: {len(changed)} finished cells were run with other settings than {sweep.path} gives now, "
            f"e.g. {changed[0]}; they are kept as they are: delete their folders to rerun them")


# -------------------------------------------------------------------------------------------------- the sweep

def worker_command(sweep: Sweep, name: str) -> list:
    return [sys.executable, "-m", "dpo", "sweep", str(sweep.path), "--only", name]


def run_parallel(sweep: Sweep, names: list, gpus: list) -> list:
    """Each job in its own process with CUDA_VISIBLE_DEVICES=<gpu>, one per GPU at a time. Failed names."""
    queue, running, failed = list(names), {}, []

    def on_sigterm(signum, frame):  # Ctrl-C reaches the workers too, `kill` only this process: pass it on
        for _, proc, _, _ in running.values():
            proc.send_signal(signal.SIGTERM)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while queue or running:
            for gpu in gpus:
                if gpu not in running and queue:
                    name = queue.pop(0)
                    folder = job_dir(sweep, name)
                    if running_elsewhere(sweep, name):
                        print(f"{name}: running elsewhere; skipped", flush=True)
                        continue
                    folder.mkdir(parents=True, exist_ok=True)
                    try:
                        log = open_nofollow(folder / "worker.log", "a")
                    except InputError as e:  # a link planted in place of the log: this cell fails, the rest run
                        failed.append(name)
                        atomic_write_text(folder / "error.log", f"{e}\n")
                        print(f"FAILED {name}: {e}", flush=True)
                        continue
                    proc = subprocess.Popen(worker_command(sweep, name), stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu})
                    running[gpu] = (name, proc, log, time.perf_counter())
                    print(f"[gpu {gpu}] {name}: started (output: {folder / 'worker.log'})", flush=True)
            for gpu, (name, proc, log, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[gpu]
                minutes = (time.perf_counter() - t0) / 60
                if status(sweep, name) == "done":
                    print(f"[gpu {gpu}] {name}: done in {minutes:.1f} min", flush=True)
                elif proc.returncode == 0 and running_elsewhere(sweep, name):  # the worker found it so too
                    print(f"[gpu {gpu}] {name}: running elsewhere; skipped", flush=True)
                else:
                    failed.append(name)
                    err = job_dir(sweep, name) / "error.log"
                    if not err.is_file():  # killed (out of memory, ...) before it could write one
                        tail = (job_dir(sweep, name) / "worker.log").read_text(errors="replace").splitlines()[-30:]
                        tail.append(f"worker exited with status {proc.returncode}")
                        atomic_write_text(err, "\n".join(tail) + "\n")
                    print(f"FAILED {name} (gpu {gpu}, exit status {proc.returncode}; see {err})", flush=True)
            if running:
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:  # the workers got the Ctrl-C (or SIGTERM) too: they save a checkpoint and stop
        print("interrupted: waiting for the running cells to save a checkpoint", flush=True)
        for _, proc, log, _ in running.values():
            proc.wait()
            log.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failed


def prepare_data(sweep: Sweep, cells: list) -> None:
    """Make every pending cell's pair files in this process first, so parallel workers never race on them."""
    for cell in cells:
        ensure_cell_data(sweep, cell, *cell_configs(sweep, cell))


def run(path, only=(), gpus: str = "", dry_run: bool = False, launcher: str = "local", slurm_flags=(),
        cells_file: str = "", only_index: int = None) -> int:
    """Run every unfinished cell (or just `only`, or a Slurm task's cell: entry only_index of the JSON list in
    cells_file), or submit them to Slurm; the number of failed cells."""
    sweep = load(path)
    if sweep.lm_eval_tasks and not dry_run:  # before any work, not after the first training
        harness.require(f"{sweep.path}: [eval] lm_eval_tasks", sweep.lm_eval_tasks)
    if cells_file or only_index is not None:
        only = [slurm.task_cell(cells_file, only_index)]
    jobs = find_cells(sweep, only) if only else [BASE] + sweep.audits + sweep.cells
    names = [j if j == BASE else j.name for j in jobs]
    pending = [j for j, n in zip(jobs, names) if status(sweep, n) != "done"]
    if launcher == "slurm":
        options = {**sweep.slurm, **slurm.parse_flags(slurm_flags)}
        if not dry_run and pending:
            sweep.eval.validate()
            write_settings(sweep)
            prepare_data(sweep, [j for j in pending if j != BASE])  # once, before the tasks start
        return slurm.submit(sweep, [j if j == BASE else j.name for j in pending], options, dry_run, status)
    if dry_run:
        audits = f"{len(sweep.audits)} audit cells + " if sweep.audits else ""
        print(f"sweep {sweep.name} ({sweep.path}): model {sweep.model}, {audits}{len(sweep.cells)} cells + base, "
              f"folder {sweep.runs}")
        for n in names:
            print(f"  {status(sweep, n):<8} {n}")
        return 0
    if not only:
        try:
            sweep.eval.validate()  # a typo here should fail now, not after the first training
        except InputError as e:
            raise InputError(f"{sweep.path}: [eval]: {e}") from None
        if pending:
            write_settings(sweep)
        note = stale_note(sweep)
        if note:
            print(note)
        print(f"sweep {sweep.name}: {len(jobs) - len(pending)} of {len(jobs)} finished (skipped), "
              f"{len(pending)} to run -> {sweep.runs}", flush=True)
    gpu_list = [g.strip() for g in gpus.split(",") if g.strip()]
    if gpu_list and pending:
        prepare_data(sweep, [j for j in pending if j != BASE])
        failed = run_parallel(sweep, [j if j == BASE else j.name for j in pending], gpu_list)
    else:
        failed = []
        for i, job in enumerate(pending):
            if run_job(sweep, job, index=f"[{i + 1}/{len(pending)}] ") == "failed":
                failed.append(job if job == BASE else job.name)
    if not only:
        done = sum(status(sweep, n) == "done" for n in names)
        print(f"sweep {sweep.name}: {done} of {len(names)} finished" +
              (f", {len(failed)} failed: {', '.join(failed)}" if failed else "") +
              f"; tables and plots: make report SWEEP={sweep.path}")
    return len(failed)
