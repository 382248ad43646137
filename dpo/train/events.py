"""TensorBoard event files rebuilt from metrics.jsonl, for run folders that have none (committed sweep cells keep
only metrics.jsonl, which holds the same numbers): `python -m dpo.train.events FOLDER...` (what `make tensorboard`
runs).

Each run folder below FOLDER with a metrics.jsonl and no events.out.tfevents.* file gets one, with every value of
every line as the scalar `<split>/<name>` at its step, as `dpo train` logs them (an earlier version's names as
this version's: `eval/rewards/accuracies`, dpo/core/metrics.py).
"""

import sys
from pathlib import Path

from dpo.core.metrics import parse_line


def rebuild(run_dir: Path) -> bool:
    """Write run_dir's event file from its metrics.jsonl; False when it has one already (or no metrics)."""
    from torch.utils.tensorboard import SummaryWriter

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file() or any(run_dir.glob("events.out.tfevents.*")):
        return False
    writer = SummaryWriter(str(run_dir))
    for row in map(parse_line, metrics.read_text(errors="replace").splitlines()):
        if row is None:  # a line cut by a kill, or damaged
            continue
        for key, value in row.items():
            if key not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"{row.get('split', 'train')}/{key}", value, row.get("step", 0))
    writer.close()
    return True


def main(folders) -> int:
    made = sum(rebuild(m.parent) for folder in folders for m in sorted(Path(folder).rglob("metrics.jsonl")))
    print(f"rebuilt {made} TensorBoard event files from metrics.jsonl", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["runs", "experiments/runs"]))
