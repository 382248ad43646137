"""Training throughput of the real trainer, `python -m dpo train` in a subprocess, on GPT-2 Large's architecture
with random weights (no download): steady-state pairs/s, policy tokens/s, MFU, peak memory and the reference pass.

    python experiments/bench/gpu_throughput.py --pairs PAIRS.json --tokenizer gpt2 \\
        --presets seed default --out experiments/bench/results/gpu.json [--model DIR] [-- more `dpo train` flags]

Presets (each one `dpo train` run of --steps optimizer steps on --pairs, no validation, no checkpoint and no final
weights written: GPT-2 Large's would be ~12 GB of disk writes that the figures do not need):
  seed     the original project's 4 x 4 micro-batches with gradient checkpointing (precision and compile on auto:
           bf16 compute weights and compiled on CUDA)
  default  no batch or precision flags: the trainer's own choice (on one CUDA GPU the 16-pair step as one
           micro-batch, bf16, compiled, no checkpointing)
Figures are the steady state, steps --steady-from..--steps of the run's metrics.jsonl (compilation and warm-up fall
before): pairs/s = those steps' pairs / their seconds, tokens/s likewise with the real (non-padding) policy tokens,
MFU = 6 N tokens/s / --peak-tflops with N the non-embedding parameters (no credit for recompute or the reference
forward); the reference pass (before the loop) from summary.json and config.json. Without --model a random GPT-2
Large is built first (random_gpt2.py; on the CPU that takes minutes). A preset that fails is recorded with its
error and the script exits 1 after writing the JSON. Runs on whatever device `dpo train` picks (--device in the
extra flags): the CPU serves for a smoke test.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from benchlib import H100_BF16_DENSE, mfu, portable, read_json, steady_state

from dpo.core.files import atomic_write_json

ROOT = Path(__file__).resolve().parents[2]
PRESETS = {
    "seed": ["--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "4",
             "--gradient-checkpointing", "true"],
    "default": [],
}


def run_preset(name: str, args, model_dir: str, n_params: int, work: Path) -> dict:
    """One fresh `dpo train` run (its folder and reference cache removed first, so the reference pass is timed)."""
    out, cache = work / name, work / f"cache-{name}"
    for folder in (out, cache):
        shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "-m", "dpo", "train", "--model", model_dir, "--train-data-path", args.pairs,
           "--val-data-path", "", "--output-dir", str(out), "--cache-dir", str(cache),
           "--max-steps", str(args.steps), "--learning-rate", "5e-7", "--eval-every", "0", "--save-every", "0",
           "--save-final", "false",
           *PRESETS[name], *args.train_args]
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    row = {"preset": name, "command": " ".join(cmd), "process_wall_s": time.perf_counter() - t0,
           "returncode": proc.returncode}
    if proc.returncode != 0:
        return {**row, "error": f"`dpo train` exited with {proc.returncode}"}
    summary, config = read_json(out / "summary.json"), read_json(out / "config.json")
    steady = steady_state(out, args.steady_from, args.steps)
    reference_pairs = config.get("reference_pairs_computed", 0)
    return {**row, **steady, "mfu": mfu(steady["tokens_per_s"], n_params, args.peak_tflops * 1e12),
            "peak_memory_gib": max(steady["peak_memory_mb"], summary["peak_memory_mb"]) / 1024,
            "train_seconds": summary["train_seconds"], "pairs_trained": summary["pairs_trained"],
            "reference_seconds": summary["reference_seconds"], "reference_pairs": reference_pairs,
            "reference_pairs_per_s": reference_pairs / summary["reference_seconds"] if reference_pairs else None,
            **{k: config[k] for k in ("precision", "compiled", "gradient_checkpointing", "batching", "device",
                                      "device_name", "versions")}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="model folder (default: a random GPT-2 Large, built first)")
    p.add_argument("--tokenizer", default="gpt2", help="tokenizer for the built model (hub id or folder)")
    p.add_argument("--pairs", required=True, help="training pairs JSON (e.g. `dpo data --format mc --n 320`'s)")
    p.add_argument("--presets", nargs="+", default=["seed", "default"], choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--steady-from", type=int, default=6, help="first step of the steady state")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE / 1e12,
                   help="dense bf16 peak of the GPU in TFLOP/s (H100 SXM: 989)")
    p.add_argument("--work", default="", help="folder for the runs (default: a temporary folder)")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("train_args", nargs="*", help="after --: more `dpo train` flags, e.g. -- --device cuda")
    args = p.parse_args()
    if not 1 <= args.steady_from <= args.steps:
        p.error(f"--steady-from {args.steady_from} must be within 1..--steps {args.steps}")
    args.pairs = str(Path(args.pairs).resolve())  # the runs start in the repo root

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp).resolve()
        model_dir = str(Path(args.model).resolve()) if Path(args.model or "-").exists() else args.model
        if not model_dir:
            from random_gpt2 import build

            model_dir = build(work / "gpt2-large-random", args.tokenizer)["model_dir"]
        info_file = Path(model_dir) / "bench_model.json"
        if info_file.is_file():
            n_params = read_json(info_file)["non_embedding_params"]
        else:
            from benchlib import non_embedding_params

            n_params = non_embedding_params(model_dir)
        rows = [run_preset(name, args, model_dir, n_params, work) for name in args.presets]
    result = {"date": date.today().isoformat(), "model": model_dir, "non_embedding_params": n_params,
              "pairs_file": args.pairs, "steps": args.steps, "steady_from": args.steady_from,
              "peak_tflops": args.peak_tflops, "rows": rows}
    atomic_write_json(args.out, portable(result), indent=1)
    print("\n| preset | pairs/s | tokens/s | MFU | peak GiB | reference pairs/s |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['preset']} | {r['error']} | | | | |")
        else:
            print(f"| {r['preset']} | {r['pairs_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['mfu']:.3f} | "
                  f"{r['peak_memory_gib']:.1f} | {r['reference_pairs_per_s'] or float('nan'):.1f} |")
    sys.exit(1 if any("error" in r for r in rows) else 0)


if __name__ == "__main__":
    main()
