"""Training speed of this checkout against an earlier revision of dpo-noise, side by side on one machine.

    .venv/bin/python experiments/bench/compare_revisions.py --base d3a038d --format completion \\
        --out experiments/bench/results/revisions_cpu.json

Checks the base revision out into a temporary git worktree, makes one pair file with this checkout's `dpo data`
(from --hellaswag-dir, training pool drawn from validation items outside the evaluation set), then runs
`python -m dpo train` of each revision on the same pairs with the same flags, alternating, --repeats times each.
pairs/s = pairs trained / training-loop seconds (summary.json; the reference pass is timed apart). Ratios use the
median of each side.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from benchlib import hellaswag_arg, portable

from dpo.core import models
from dpo.core.files import atomic_write_json

ROOT = Path(__file__).resolve().parents[2]


def train(source: Path, args, model_dir: str, pairs: Path, work: Path, name: str) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "dpo", "train", "--model", model_dir, "--train-data-path", str(pairs),
           "--val-data-path", "", "--output-dir", str(out), "--cache-dir", str(work / f"cache-{name}"),
           "--per-device-train-batch-size", str(args.micro_batch), "--gradient-accumulation-steps",
           str(args.grad_accum), "--max-steps", str(args.steps), "--gradient-checkpointing",
           str(args.checkpointing).lower(), "--learning-rate", "5e-7", "--eval-every", "0", "--save-every", "0",
           "--threads", str(args.threads), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(source)}
    subprocess.run(cmd, check=True, cwd=source, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return {"pairs_per_s": summary["pairs_trained"] / summary["train_seconds"],
            "train_s": summary["train_seconds"], "reference_s": summary["reference_seconds"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="d3a038d", help="the earlier revision (any git revision name)")
    p.add_argument("--model", default="smollm2-135m", help="model spec (alias, folder, .gguf)")
    p.add_argument("--format", default="completion", choices=("mc", "completion"), help="pair format")
    hellaswag_arg(p, "--hellaswag-dir", help="local HellaSwag copy")
    p.add_argument("--n-pairs", type=int, default=48, help="training pairs (steps x micro x accum are used)")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on (both revisions)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=2, help="runs of each revision, alternating")
    p.add_argument("--out", default=str(ROOT / "experiments/bench/results/revisions_cpu.json"), help="result JSON")
    args = p.parse_args()

    model_dir = models.resolve(args.model)
    base_rev = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    head_rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base_src = work / "base-src"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_src), base_rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            subprocess.run([sys.executable, "-m", "dpo", "data", "--format", args.format, "--n", str(args.n_pairs),
                            "--hellaswag-dir", args.hellaswag_dir, "--train-from-val", "--out-dir",
                            str(work / "data")], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            (pairs,) = (work / "data").glob(f"{args.format}_n{args.n_pairs}_noise0_seed1.json")
            runs = {"head": [], "base": []}
            for i in range(args.repeats):
                for side, source in (("base", base_src), ("head", ROOT)):
                    runs[side].append(train(source, args, model_dir, pairs, work, f"{side}{i}"))
                    print(f"{side} run {i + 1}: {runs[side][-1]['pairs_per_s']:.3f} pairs/s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_src)], cwd=ROOT, capture_output=True)
    median = {side: statistics.median(r["pairs_per_s"] for r in rows) for side, rows in runs.items()}
    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {args.threads} threads",
              "base": base_rev, "head": head_rev, "settings": vars(args), "runs": runs,
              "median_pairs_per_s": median, "speedup": median["head"] / median["base"]}
    atomic_write_json(args.out, portable(result), indent=1)
    print(f"{args.format}: head {median['head']:.3f} pairs/s, base {base_rev[:7]} {median['base']:.3f} pairs/s, "
          f"{result['speedup']:.2f}x")


if __name__ == "__main__":
    main()
