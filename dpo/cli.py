"""The `dpo` command: `dpo data | train | eval | audit | sweep | report`, each `--help` lists every flag."""

import argparse
import os
import signal
import sys
from dataclasses import fields, replace
from pathlib import Path

from dpo import __version__
from dpo.core.config import (
    AuditConfig,
    DataConfig,
    EvalConfig,
    TrainConfig,
    add_args,
    argparse_text,
    from_args,
    from_mapping,
    normalize_argv,
)
from dpo.core.datasources import PAIRS_FIELDS
from dpo.core.files import InputError, TrainingDiverged, atomic_write_text, disk_error


def cmd_data(args):
    cfg = from_args(DataConfig, args)
    from dpo.data import prepare

    prepare.run(cfg.validate())


def cmd_train(args):
    file = run_file(args.config) if args.config else {}
    data_cfg, cfg = (over_file(cls, file, section, args)
                     for cls, section in ((DataConfig, "data"), (TrainConfig, "train")))
    from dpo.train import train

    if train.train(data_cfg, cfg).get("stopped"):
        raise KeyboardInterrupt  # stopped by Ctrl-C or SIGTERM after a checkpoint: exit status 130, not success


RUN_FILE_SECTIONS = {"data": ("grid",), "train": ()}  # a run file's tables, and the fields they may not set


def run_file(path: str) -> dict:
    """`dpo train --config FILE`: a TOML file with [data] and [train] tables, as a sweep file's (HF's names of the
    same settings accepted), checked before any work."""
    from dpo.study.sweep import load_toml

    raw = load_toml(Path(path))
    for section, table in raw.items():
        if section not in RUN_FILE_SECTIONS or not isinstance(table, dict):
            raise InputError(f"{path}: [{section}] is not a run file's table; expected [data] and [train] (the "
                             "settings of `dpo train --help`, as in a sweep file)")
        for key in RUN_FILE_SECTIONS[section]:
            if key in table:
                raise InputError(f"{path}: [{section}] {key}: not a setting of one run")
    return {section: (path, table) for section, table in raw.items()}


def over_file(cls, file: dict, section: str, args):
    """cls from the run file's [section] (if any), then the flags given on the command line over it."""
    if section not in file:
        return from_args(cls, args)
    path, table = file[section]
    base = from_mapping(cls, table, where=f"{path}: [{section}] ")
    given = {f.name for f in fields(cls) if hasattr(args, f.name)}
    flags = from_args(cls, args)
    return replace(base, **{name: getattr(flags, name) for name in given})


def train_args(p):
    p.add_argument("--config", default="", metavar="FILE", help="a TOML file of this run's settings: [data] and "
                   "[train] tables as in a sweep file (Hugging Face's names such as eval_steps accepted); flags "
                   "given on the command line override it")


def cmd_eval(args):
    cfg, data_cfg = from_args(EvalConfig, args), from_args(DataConfig, args)
    from dpo.eval import score

    score.run(cfg, data_cfg)


def cmd_audit(args):
    cfg = from_args(AuditConfig, args)
    from dpo.audit import audit

    audit.run(cfg)


def cmd_sweep(args):
    from dpo.study import runner

    if runner.run(args.sweep, only=args.only, gpus=args.gpus, dry_run=args.dry_run, launcher=args.launcher,
                 slurm_flags=args.slurm, cells_file=args.cells_file, only_index=args.only_index):
        raise SystemExit(1)  # some cells failed (each logged); rerunning retries them


def sweep_args(p):
    p.add_argument("sweep", metavar="SWEEP", help="sweep file, e.g. experiments/noise.toml")
    p.add_argument("--only", action="append", default=[], metavar="CELL",
                   help="run just this cell (repeatable; 'base' is the base model); --dry-run lists the names")
    p.add_argument("--cells-file", default="", metavar="FILE", help="with --only-index: a JSON list of cell names "
                   "(what a Slurm job array's tasks pick their cell from)")
    p.add_argument("--only-index", type=int, default=None, metavar="K",
                   help="run just the cell at index K (from 0) of --cells-file")
    p.add_argument("--gpus", default="", help="comma-separated GPU ids: one cell per GPU at a time, each in its "
                   "own process with CUDA_VISIBLE_DEVICES set (default: one cell after another, in this process)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their status; run nothing (with "
                   "--launcher slurm: print the sbatch script, submit nothing)")
    p.add_argument("--launcher", default="local", choices=("local", "slurm"), help="local: run the cells here; "
                   "slurm: submit the unfinished ones as one Slurm job array (rerun to submit what is unfinished)")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="a Slurm option (repeatable; over the sweep file's [slurm] table): partition, time, "
                   "gpus_per_task, cpus_per_task, mem, account, extra (a further #SBATCH line)")


def cmd_report(args):
    from dpo.study import report

    report.run(args.sweep)


def report_args(p):
    p.add_argument("sweep", metavar="SWEEP", help="sweep file, e.g. experiments/noise.toml")


# name -> (function, help, [(config class, fields left out of this command's flags) or a function adding the
# command's own arguments])
COMMANDS = {
    "data": (cmd_data, "HellaSwag, or your own preference data (--pairs) -> preference pairs with a controlled "
             "fraction of flipped labels", [(DataConfig, ())]),
    "train": (cmd_train, "DPO fine-tuning against a frozen reference (the data flags pick or create the "
              "training file; conversations are rendered with --model's chat template)",
              [(DataConfig, ("grid", "out_dir", "tokenizer")), (TrainConfig, ()), train_args]),
    "eval": (cmd_eval, "HellaSwag accuracy: lm-evaluation-harness's completion scoring (acc, acc_norm) and the "
             "training prompt's answer (mc_acc); two models side by side with paired statistics",
             [(DataConfig, ("n", "noise", "grid", "format", "out_dir") + PAIRS_FIELDS), (EvalConfig, ())]),
    "audit": (cmd_audit, "how noisy is a preference file? the reference model's per-pair scores, a noise-rate "
              "estimate with a 95% interval calibrated on clean pairs, and each pair's flip posterior",
              [(AuditConfig, ())]),
    "sweep": (cmd_sweep, "run a sweep file's grid of data -> train -> eval cells; rerun to resume (finished "
              "cells are skipped, failed ones retried)", [sweep_args]),
    "report": (cmd_report, "tables (REPORT.md, summary.csv) and plots of a sweep's finished cells, into "
               "experiments/results/<sweep>/", [report_args]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo", description="DPO under preference-label noise, on HellaSwag. "
                                     "Flags accept --with-dashes or --with_underscores.")
    parser.add_argument("--version", action="version", version=f"dpo-noise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text, configs) in COMMANDS.items():
        p = sub.add_parser(name, help=argparse_text(help_text), description=help_text)
        for entry in configs:
            if callable(entry):
                entry(p)
            else:
                add_args(p, *entry)
        p.set_defaults(func=func)
    return parser


def on_sigterm(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, Slurm's time limit) is handled like Ctrl-C: caches and checkpoints saved


DEBUG = "DPO_DEBUG"  # set (not "" or "0"): an unexpected exception is raised as it is (tests/conftest.py sets it)


def crash_report(error: Exception, argv) -> str:
    """The one line for an exception no part of dpo expected (a bug): its traceback, with the command and the
    versions, written atomically to a file under the cache folder (else the temporary folder), which the line
    names."""
    import platform
    import tempfile
    import time
    import traceback

    from dpo.core import models

    text = (f"dpo-noise {__version__}, Python {platform.python_version()}, {platform.platform()}\n"
            f"command: dpo {' '.join(argv)}\n\n{traceback.format_exc()}")
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    for folder in (models.CACHE_DIR / "crashes", Path(tempfile.gettempdir())):
        try:
            atomic_write_text(folder / name, text)
            saved = f"its traceback is in {folder / name}"
            break
        except (OSError, InputError):
            saved = "its traceback could not be saved (rerun with DPO_DEBUG=1 to see it)"
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return (f"{type(error).__name__}: {first} -- an unexpected error, a bug in dpo-noise: {saved}; please report it "
            "with that file")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except Exception as e:  # the last net: every error a user can cause has its own InputError before this
        if os.environ.get(DEBUG, "") not in ("", "0"):
            raise
        print(f"error: {crash_report(e, argv)}", file=sys.stderr)
        return 1


def run(argv) -> int:
    """Parse argv and run the command; an InputError, a diverged training, Ctrl-C or a full disk is its exit
    status and one line."""
    args = build_parser().parse_args(normalize_argv(argv))
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full, read-only or forbidden disk where no writer named the file: still one line
        problem = disk_error(e, e.filename or "a file")
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
