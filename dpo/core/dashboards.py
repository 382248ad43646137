"""Where `dpo train` sends its scalars besides metrics.jsonl (always written): `--report-to`, a comma list of the
backends in one table, `BACKENDS` (default tensorboard; none: metrics.jsonl only), as TRL's `report_to`.

Every backend receives the same scalars: `<split>/<name>` at their step, the names of metrics.jsonl (TRL's:
train/loss, train/rewards/accuracies, eval/rewards/margins, ...). Each backend is an optional extra of setup.py
(tensorboard comes with the package); one that is not installed is an `error:` line before anything is loaded
(`check_installed`), never a failure mid-run. The runs' settings go along as the run's config. wandb and trackio
work offline: WANDB_MODE=offline (sync later with `wandb sync`), and trackio keeps its runs locally unless told
otherwise (`trackio show`). Their project is WANDB_PROJECT, TRACKIO_PROJECT or MLFLOW_EXPERIMENT_NAME, as with
transformers' integrations (default: dpo-noise).

Adding a backend is one class here:

    @backend("aim", module="aim", help="Aim runs (aim up)")
    class Aim:
        def __init__(self, out_dir, run, config, start_step): ...
        def log(self, scalars, step): ...
        def close(self): ...
"""

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

NONE = "none"  # --report-to none: metrics.jsonl only
PROJECT = "dpo-noise"


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # what it imports
    extra: str  # the setup.py extra that installs it ("": a dependency of the package)
    help: str
    sink: type  # sink(out_dir, run name, config dict, start step): .log(scalars, step), .close()


BACKENDS = {}  # name -> Backend, in the order declared


def backend(name: str, module: str, help: str, extra: str = None):
    def declare(cls):
        BACKENDS[name] = Backend(name, module, name if extra is None else extra, help, cls)
        return cls
    return declare


def names(report_to: str) -> list:
    """The backends of a --report-to value ([] for none)."""
    return [n for n in (part.strip() for part in report_to.split(",")) if n and n != NONE]


def problem(report_to: str) -> str:
    """'' when --report-to names known backends (or none alone), else what is wrong."""
    given = [part.strip() for part in report_to.split(",") if part.strip()]
    unknown = [n for n in given if n not in BACKENDS and n != NONE]
    if unknown or not given or (NONE in given and len(given) > 1):
        return (f"--report-to {report_to!r}: expected a comma-separated list of {', '.join(BACKENDS)}, or {NONE} "
                "(metrics.jsonl only)")
    return ""


def check_installed(report_to: str) -> None:
    """An InputError naming the first backend whose package does not import, and how to install it."""
    from dpo.core.files import InputError

    for name in names(report_to):
        spec = BACKENDS[name]
        try:
            importlib.import_module(spec.module)
        except ImportError:
            how = f"pip install -e '.[{spec.extra}]' (or pip install {spec.module})" if spec.extra else \
                f"pip install {spec.module}"
            raise InputError(f"--report-to {name}: the {spec.module} package is not installed: {how}; or leave "
                             f"{name} out of --report-to") from None


def open_all(report_to: str, out_dir: Path, run: str, config: dict, start_step: int) -> list:
    """A sink of every backend named, in order."""
    return [BACKENDS[name].sink(out_dir, run, config, start_step) for name in names(report_to)]


def flat(config: dict, prefix: str = "") -> dict:
    """{"train": {"beta": 0.1}} -> {"train.beta": 0.1}, for backends whose parameters are flat."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ------------------------------------------------------------------------------------------------- the backends

@backend("tensorboard", module="tensorboard", help="event files in the run folder (make tensorboard)", extra="")
class TensorBoard:
    def __init__(self, out_dir: Path, run: str, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops what an earlier session logged after its checkpoint
        self.writer = SummaryWriter(str(out_dir), purge_step=start_step + 1 if start_step else None)

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


@backend("wandb", module="wandb", help="a Weights & Biases run, its files in <run>/wandb (offline: WANDB_MODE=offline)")
class WandB:
    def __init__(self, out_dir: Path, run: str, config: dict, start_step: int):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run, dir=str(out_dir),
                              config=config)

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


@backend("mlflow", module="mlflow", help="an MLflow run (MLFLOW_TRACKING_URI; default ./mlruns)")
class MLflow:
    def __init__(self, out_dir: Path, run: str, config: dict, start_step: int):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT))
        mlflow.start_run(run_name=run)
        mlflow.log_params({k: str(v)[:500] for k, v in flat(config).items()})

    def log(self, scalars: dict, step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


@backend("trackio", module="trackio", help="a trackio run, kept locally (trackio show)")
class Trackio:
    def __init__(self, out_dir: Path, run: str, config: dict, start_step: int):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=run, config=config, resume="allow")

    def log(self, scalars: dict, step: int) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()
