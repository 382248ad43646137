"""LoRA against full fine-tuning on the CPU, side by side in one run: `dpo train` with and without `--lora-r`, same
model, pairs and settings, each in its own process (peak RSS is its own).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench/lora_speed.py --threads 1 \
        --out experiments/bench/results/lora_cpu.json --note "..."
    .venv/bin/python experiments/bench/lora_speed.py --n-pairs 16 --out /tmp/smoke.json      # a smoke test

Defaults: SmolLM2-135M-Instruct (the offline alias), the first 64 completion pairs (context -> ending, noise 0,
made offline by `python -m dpo data --format completion --train-from-val`), micro-batch 4 x accumulation 4 (4 steps
of 16 pairs), max length 1024, the CPU defaults (fp32, eager, no gradient checkpointing), beta 0.1; full
fine-tuning at lr 1e-5 (the CPU noise study's), LoRA r 8, alpha 16, every linear layer but the output embedding, at
lr 1e-4 (the learning rate does not change the speed). The reference log-probs are computed once, before either
run (the LoRA reference is the base model with its adapters off, whose cache entries full fine-tuning shares), so
both runs read them from the cache and their peak RSS is that of loading and training alone.

Per run: pairs/s of the whole loop (summary.json), steady-state pairs/s from step 2 on (metrics.jsonl), peak RSS
(ru_maxrss of the trainer's process), trainable parameters, and the size of a checkpoint (weights or adapters,
with the optimizer state). Ratios LoRA / full from this one run.
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from benchlib import HELLASWAG, hellaswag_arg, steady_state
from train_speed import completion_pairs

from dpo.core.files import atomic_write_json, json_text
from dpo.data.pairs import read_pairs
from dpo.engine import precision
from dpo.engine.reference import Scorer

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {"full": ["--learning-rate", "1e-5"],
            "lora": ["--learning-rate", "1e-4", "--lora-r", "8", "--lora-alpha", "16"]}


def fill_reference_cache(args, pairs_file: Path, cache: Path) -> float:
    """The reference log-probs of every pair into the cache both runs read; the seconds it took."""
    t0 = time.perf_counter()
    scorer = Scorer.load(args.model, 1024, "auto", "cpu", str(cache), threads=args.threads)
    scorer.logprobs(read_pairs(pairs_file), "reference log-probs")
    return time.perf_counter() - t0


def run(args, pairs_file: Path, work: Path, name: str) -> dict:
    steps = args.n_pairs // (args.micro_batch * args.grad_accum)
    flags = ["--model", args.model, "--train-data-path", str(pairs_file), "--val-data-path", "", "--output-dir",
             str(work / name), "--cache-dir", str(work / "cache"), "--per-device-train-batch-size",
             str(args.micro_batch), "--gradient-accumulation-steps", str(args.grad_accum), "--max-steps", str(steps),
             "--max-length", "1024", "--gradient-checkpointing", "false", "--beta", "0.1", "--warmup-steps", "0",
             "--eval-every", "0", "--save-every", str(steps), "--threads", str(args.threads), "--device", "cpu",
             "--precision", "fp32", *VARIANTS[name]]
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dpo", "train", *flags], check=True, cwd=ROOT)
    wall = time.perf_counter() - t
    out = work / name
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    (ckpt,) = (out / "checkpoints").iterdir()
    trainable = config["lora"]["trainable_params"] if config["lora"] else None
    steady = steady_state(out, first=2) if steps >= 2 else None
    return {"run": name, "pairs_per_s": summary["pairs_trained"] / summary["train_seconds"],
            "steady_pairs_per_s": steady["pairs_per_s"] if steady else None,
            "step_seconds": steady["step_seconds"] if steady else None, "train_s": summary["train_seconds"],
            "peak_rss_mib": summary["peak_memory_mb"], "reference_pairs_computed": config["reference_pairs_computed"],
            "trainable_params": trainable, "lora": config["lora"],
            "checkpoint_mib": sum(p.stat().st_size for p in ckpt.iterdir()) / 2**20,
            "final_loss": json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"],
            "process_wall_s": wall,
            "command": "python -m dpo train " + " ".join(f or "''" for f in flags).replace(str(work), "<tmp>")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model spec (alias, folder, .gguf)")
    hellaswag_arg(p, "--hellaswag", help="folder with hellaswag_val.jsonl, for the completion pairs")
    p.add_argument("--n-pairs", type=int, default=64, help="pairs to train on (one step per micro*accum)")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for both runs")
    p.add_argument("--out", default=str(ROOT / "experiments/bench/results/lora_cpu.json"), help="result JSON")
    p.add_argument("--note", default="", help="what else the machine was doing (recorded in the JSON)")
    args = p.parse_args()
    if args.n_pairs % (args.micro_batch * args.grad_accum):
        p.error(f"--n-pairs {args.n_pairs} is not a multiple of micro-batch * accumulation")
    torch.set_num_threads(args.threads)
    facts = precision.cpu_facts()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs_file = work / "completion.json"
        pairs = json.loads(completion_pairs(args, work).read_text())[: args.n_pairs]
        pairs_file.write_text(json_text(pairs, ensure_ascii=True))
        reference_s = fill_reference_cache(args, pairs_file, work / "cache")
        rows = [run(args, pairs_file, work, name) for name in VARIANTS]
    full, lora = rows
    ratios = {"pairs_per_s": lora["pairs_per_s"] / full["pairs_per_s"],
              "steady_pairs_per_s": lora["steady_pairs_per_s"] / full["steady_pairs_per_s"]
              if full["steady_pairs_per_s"] else None,
              "peak_rss": lora["peak_rss_mib"] / full["peak_rss_mib"],
              "checkpoint_size": lora["checkpoint_mib"] / full["checkpoint_mib"]}
    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {args.threads} torch thread(s)",
              "note": args.note, "cpu": facts, "model": args.model,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "note")},
              "reference_s": reference_s, "rows": rows, "lora_over_full": ratios}
    result["settings"]["hellaswag"] = "$DPO_HELLASWAG_DIR" if HELLASWAG and Path(args.hellaswag).resolve() == \
        Path(HELLASWAG).resolve() else Path(args.hellaswag).name
    atomic_write_json(args.out, result, indent=1)
    print("\n| run | pairs/s (loop) | pairs/s (steps 2+) | peak RSS MiB | trainable params | checkpoint MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        steady = f"{r['steady_pairs_per_s']:.3f}" if r["steady_pairs_per_s"] else "-"
        print(f"| {r['run']} | {r['pairs_per_s']:.3f} | {steady} | {r['peak_rss_mib']:.0f} | "
              f"{r['trainable_params'] or 'all'} | {r['checkpoint_mib']:.1f} |")
    print(f"LoRA / full: {json.dumps({k: round(v, 3) if v else v for k, v in ratios.items()})}; reference pass "
          f"{reference_s:.1f} s (once, shared)")


if __name__ == "__main__":
    main()
