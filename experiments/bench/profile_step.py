"""Profile the trainer's real optimizer step (`dpo.train.setup` + `dpo.train.train_step`) with torch.profiler.

    python experiments/bench/profile_step.py --model DIR --train-data-path PAIRS.json --out-dir /tmp/prof \\
        [--warmup 3 --steps 3] [any `dpo train` flag, e.g. --precision bf16 --compile true]

Runs --warmup steps unprofiled (compilation, allocator warm-up), then --steps under the profiler, and writes
OUT_DIR/trace.json (open in chrome://tracing or https://ui.perfetto.dev), OUT_DIR/ops.txt (the top operators by
self CPU and, on CUDA, self CUDA time) and OUT_DIR/profile.json (per-step seconds, pairs/s, tokens/s, and the share
of the step the GPU was busy: near 1 means compute-bound, far below 1 means the GPU waits on Python dispatch).
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dpo.core.config import DataConfig, TrainConfig, add_args, from_args, normalize_argv
from dpo.core.files import atomic_write_json
from dpo.train import train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True, help="where trace.json, ops.txt and profile.json go")
    p.add_argument("--warmup", type=int, default=3, help="unprofiled steps first")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    add_args(p, TrainConfig)
    args = p.parse_args(normalize_argv(argv if argv is not None else __import__("sys").argv[1:]))
    out = Path(args.out_dir)
    cfg = from_args(TrainConfig, args)
    if not cfg.output_dir:
        cfg.output_dir = str(out / "run")
    cfg.max_steps = max(cfg.max_steps, args.warmup + args.steps)
    run = train.setup(DataConfig(), cfg)
    cuda = run.device.type == "cuda"
    for step in range(args.warmup):
        train.train_step(run, step)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows = []
    with profile(activities=activities, record_shapes=False) as prof:
        for step in range(args.warmup, args.warmup + args.steps):
            t0 = time.perf_counter()
            values = train.train_step(run, step)
            rows.append({"step": step + 1, "seconds": time.perf_counter() - t0, "pairs_per_s": values["pairs_per_s"],
                         "tokens_per_s": values["tokens_per_s"], "micro_batches": values["micro_batches"]})
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json"))
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    (out / "ops.txt").write_text(events.table(sort_by=sort, row_limit=40) + "\n")
    wall = sum(r["seconds"] for r in rows)
    gpu_busy = sum(e.self_device_time_total for e in events) / 1e6 / wall if cuda else None
    result = {"device": str(run.device), "precision": run.precision, "compiled": run.info["compiled"],
              "gradient_checkpointing": run.info["gradient_checkpointing"], "batching": run.info["batching"],
              "steps": rows, "gpu_busy_fraction": gpu_busy, "torch": torch.__version__}
    atomic_write_json(out / "profile.json", result, indent=1)
    print((out / "ops.txt").read_text())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
