"""Side-by-side training speed: `dpo train` against TRL's DPOTrainer, same model, pairs and settings, one run.

    .venv/bin/python experiments/bench/train_speed.py --out experiments/bench/results/train_cpu.json

Defaults are the issue's CPU benchmark: SmolLM2-135M-Instruct (the offline alias), the first 48 pairs of the
original project's dpo_000-1.json, micro-batch 4 x accumulation 4, gradient checkpointing on, max length 1024,
fp32. Each trainer runs in its own process (so peak RSS is its own); TRL runs in a separate virtual environment
made by peer_venv.sh (never a dependency). dpo-noise runs twice: with reference log-probs computed before the
loop (its default; their time is reported and also counted in an 'end to end' rate) and with the reference model
run every step (--ref-on-the-fly, what TRL does by default).
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dpo import models  # noqa: E402
from dpo.files import atomic_write_json  # noqa: E402

TRL_PINS = ("trl==1.16.0", "transformers==5.24.0")


def run_ours(args, model_dir, pairs_file, work: Path, on_the_fly: bool) -> dict:
    name = "fly" if on_the_fly else "cached"
    cmd = [sys.executable, "-m", "dpo", "train", "--model", model_dir, "--train-data-path", str(pairs_file),
           "--output-dir", str(work / name), "--cache-dir", str(work / f"cache-{name}"),
           "--per-device-train-batch-size", str(args.micro_batch), "--gradient-accumulation-steps",
           str(args.grad_accum), "--max-steps", str(args.n_pairs // (args.micro_batch * args.grad_accum)),
           "--max-length", "1024", "--gradient-checkpointing", "true", "--beta", "0.1", "--learning-rate", "5e-7",
           "--eval-every", "0", "--save-every", "0", "--threads", str(args.threads), "--device", "cpu",
           "--ref-on-the-fly", str(on_the_fly).lower()]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - t
    summary = json.loads((work / name / "summary.json").read_text())
    train_s, ref_s = summary["train_seconds"], summary["reference_seconds"]
    return {"trainer": f"dpo-noise ({'reference every step' if on_the_fly else 'cached reference log-probs'})",
            "train_s": train_s, "pairs_per_s": summary["pairs_trained"] / train_s, "reference_s": ref_s,
            "pairs_per_s_incl_reference": summary["pairs_trained"] / (train_s + ref_s),
            "peak_rss_mib": summary["peak_memory_mb"], "process_wall_s": wall, "command": " ".join(cmd)}


def run_trl(args, model_dir, pairs_file, work: Path) -> dict:
    py = subprocess.run([str(ROOT / "experiments/bench/peer_venv.sh"), "trl", *TRL_PINS], check=True,
                        capture_output=True, text=True).stdout.strip()
    out = work / "trl.json"
    cmd = [py, str(ROOT / "experiments/bench/trl_dpo.py"), "--model", model_dir, "--pairs", str(pairs_file),
           "--n-pairs", str(args.n_pairs), "--micro-batch", str(args.micro_batch), "--grad-accum",
           str(args.grad_accum), "--max-length", "1024", "--gradient-checkpointing", "--beta", "0.1",
           "--lr", "5e-7", "--threads", str(args.threads), "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    r = json.loads(out.read_text())
    return {"trainer": "TRL DPOTrainer (reference every step)", "train_s": r["train_s"],
            "pairs_per_s": r["pairs_per_s"], "peak_rss_mib": r["peak_rss_mib"], "command": " ".join(cmd),
            "versions": r["versions"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model spec (alias, folder, .gguf)")
    p.add_argument("--pairs", default=str(ROOT / "../shared/hellaswag/seed/dpo_000-1.json"),
                   help="preference file; the first --n-pairs are used")
    p.add_argument("--n-pairs", type=int, default=48, help="pairs to train on (one step per micro*accum)")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for every trainer")
    p.add_argument("--skip-trl", action="store_true", help="measure dpo-noise only")
    p.add_argument("--out", default=str(ROOT / "experiments/bench/results/train_cpu.json"), help="result JSON")
    args = p.parse_args()

    model_dir = models.resolve(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs_file = work / "pairs.json"
        pairs_file.write_text(json.dumps(json.loads(Path(args.pairs).read_text())[: args.n_pairs]))
        rows = [run_ours(args, model_dir, pairs_file, work, on_the_fly=False),
                run_ours(args, model_dir, pairs_file, work, on_the_fly=True)]
        if not args.skip_trl:
            rows.append(run_trl(args, model_dir, pairs_file, work))
    if not args.skip_trl:
        trl = rows[-1]["pairs_per_s"]
        for row in rows[:-1]:
            row["speedup_vs_trl"] = row["pairs_per_s"] / trl
            if "pairs_per_s_incl_reference" in row:
                row["speedup_vs_trl_incl_reference"] = row["pairs_per_s_incl_reference"] / trl
    result = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{args.threads} threads", "cpu": _cpu_name(), "model": args.model, "model_dir": model_dir,
              "settings": vars(args), "rows": rows}
    atomic_write_json(args.out, result, indent=1)
    print("\n| trainer | pairs/s | vs TRL | peak RSS MiB |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['trainer']} | {row['pairs_per_s']:.3f} | {row.get('speedup_vs_trl', 1.0):.2f}x | "
              f"{row['peak_rss_mib']:.0f} |")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
