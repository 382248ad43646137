"""Side-by-side training speed on the CPU: `dpo train` in fp32, bf16 and auto against TRL's DPOTrainer at its
fastest settings, same model, pairs and settings, all in one run of this script, with the processor's capability
printed first (the figures hold for that kind of processor: native bf16 or not).

    .venv/bin/python experiments/bench/train_speed.py --out experiments/bench/results/train_cpu.json
    .venv/bin/python experiments/bench/train_speed.py --n-pairs 16 --precisions fp32 auto --trl-variants \
        --formats completion --out /tmp/smoke.json                                        # a smoke test

Defaults are the issue's CPU benchmark: SmolLM2-135M-Instruct (the offline alias), the first 48 pairs of each
format, micro-batch 4 x accumulation 4, gradient checkpointing on, max length 1024, beta 0.1, lr 5e-7, 2 torch
threads for every trainer. Formats: `mc`, the original project's dpo_000-1.json (one row per pair scores both
answers in dpo-noise), and `completion` (context -> ending), made offline here by `python -m dpo data --format
completion --hellaswag-dir HELLASWAG --train-from-val` (noise 0). Per format:
  dpo-noise  --precision fp32, bf16 (bf16 compute weights, fp32 master weights) and auto (the default: what it
             picked on this processor is in the row), reference log-probs cached before the loop: pairs/s of the
             loop (summary.json), the reference pass timed apart and also folded into an end-to-end rate
  TRL        its fastest settings on the processor: with native bf16, bf16=True (autocast) with and without
             precompute_ref_log_probs=True, and fp32 with it; without, fp32 with it (bf16 matrix products are
             several times slower than fp32 there, see the printed probe). Its reference pass runs once, inside
             the DPOTrainer constructor, and is folded into its end-to-end rate likewise. `--trl-variants` names
             others (fp32: its default, a reference copy every step).
             trl_dpo.py in a separate virtual environment (peer_venv.sh), never a dependency
Each trainer runs in its own process (peak RSS is its own). Ratios, computed here from this one run: each
dpo-noise row against the fastest TRL row of its format (loop and end to end), and against the fastest TRL row of
the same precision.
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
from benchlib import hellaswag_arg, portable

from dpo.core import models
from dpo.core.files import atomic_write_json, json_text
from dpo.engine import precision

ROOT = Path(__file__).resolve().parents[2]
TRL_PINS = ("trl==1.16.0", "transformers==5.24.0")
TRL_VARIANTS = {"fp32": [], "bf16": ["--bf16"], "fp32+precompute": ["--precompute-ref"],
                "bf16+precompute": ["--bf16", "--precompute-ref"]}
TRL_FASTEST = ["bf16", "bf16+precompute", "fp32+precompute"]  # its fastest settings on a CPU with native bf16
TRL_FASTEST_NO_BF16 = ["fp32+precompute"]  # ... and without (bf16 matrix products are several times slower there)


def completion_pairs(args, work: Path) -> Path:
    """The first --n-pairs completion pairs (noise 0), written by `dpo data` into work/completion/."""
    out = work / "completion"
    subprocess.run([sys.executable, "-m", "dpo", "data", "--format", "completion", "--hellaswag-dir", args.hellaswag,
                    "--train-from-val", "--n", str(args.n_pairs), "--out-dir", str(out)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    manifest = json.loads((out / "manifest.json").read_text())
    (name,) = [k for k, v in manifest.items() if not v.get("validation")]
    return out / name


def run_ours(args, model_dir, pairs_file, work: Path, fmt: str, precision: str) -> dict:
    name = f"{fmt}-{precision}"
    steps = args.n_pairs // (args.micro_batch * args.grad_accum)
    cmd = [sys.executable, "-m", "dpo", "train", "--model", model_dir, "--train-data-path", str(pairs_file),
           "--val-data-path", "", "--output-dir", str(work / name), "--cache-dir", str(work / f"cache-{name}"),
           "--per-device-train-batch-size", str(args.micro_batch), "--gradient-accumulation-steps",
           str(args.grad_accum), "--max-steps", str(steps), "--max-length", "1024", "--gradient-checkpointing", "true",
           "--beta", "0.1", "--learning-rate", "5e-7", "--eval-every", "0", "--save-every", "0",
           "--threads", str(args.threads), "--device", "cpu", "--precision", precision]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - t
    summary = json.loads((work / name / "summary.json").read_text())
    config = json.loads((work / name / "config.json").read_text())
    train_s, ref_s, pairs = summary["train_seconds"], summary["reference_seconds"], summary["pairs_trained"]
    used = config["precision"]  # what auto picked
    trainer = f"dpo-noise {precision}" + (f" (= {used})" if precision == "auto" else "")
    return {"trainer": trainer, "format": fmt, "precision": used, "requested": precision,
            "precision_choice": config.get("precision_choice"), "train_s": train_s,
            "pairs_per_s": pairs / train_s, "reference_s": ref_s,
            "pairs_per_s_incl_reference": pairs / (train_s + ref_s), "peak_rss_mib": summary["peak_memory_mb"],
            "process_wall_s": wall, "command": " ".join(cmd)}


def run_trl(args, py: str, model_dir, pairs_file, work: Path, fmt: str, variant: str) -> dict:
    out = work / f"trl-{fmt}-{variant}.json"
    cmd = [py, str(ROOT / "experiments/bench/trl_dpo.py"), "--model", model_dir, "--pairs", str(pairs_file),
           "--n-pairs", str(args.n_pairs), "--micro-batch", str(args.micro_batch), "--grad-accum",
           str(args.grad_accum), "--max-length", "1024", "--gradient-checkpointing", "--beta", "0.1",
           "--lr", "5e-7", "--threads", str(args.threads), *TRL_VARIANTS[variant], "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    r = json.loads(out.read_text())
    return {"trainer": f"TRL DPOTrainer {variant}", "format": fmt, "precision": variant.split("+")[0],
            "train_s": r["train_s"], "pairs_per_s": r["pairs_per_s"], "reference_s": r["precompute_s"],
            "pairs_per_s_incl_reference": r["pairs_trained"] / (r["train_s"] + r["precompute_s"]),
            "peak_rss_mib": r["peak_rss_mib"], "init_s": r["init_s"], "command": " ".join(cmd),
            "versions": r["versions"]}


def add_ratios(rows: list) -> None:
    """Each dpo-noise row against the fastest TRL row of its format, and of its format and precision."""
    for row in rows:
        if not row["trainer"].startswith("dpo-noise"):
            continue
        peers = [r for r in rows if r["trainer"].startswith("TRL") and r["format"] == row["format"]]
        same = [r for r in peers if r["precision"] == row["precision"]]
        if peers:
            best = max(peers, key=lambda r: r["pairs_per_s"])
            best_e2e = max(peers, key=lambda r: r["pairs_per_s_incl_reference"])
            row["vs_fastest_trl"] = {"trl": best["trainer"], "speedup": row["pairs_per_s"] / best["pairs_per_s"]}
            row["vs_fastest_trl_incl_reference"] = {
                "trl": best_e2e["trainer"],
                "speedup": row["pairs_per_s_incl_reference"] / best_e2e["pairs_per_s_incl_reference"]}
        if same:
            best = max(same, key=lambda r: r["pairs_per_s"])
            row["vs_fastest_trl_same_precision"] = {"trl": best["trainer"],
                                                    "speedup": row["pairs_per_s"] / best["pairs_per_s"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model spec (alias, folder, .gguf)")
    hellaswag_arg(p, "--pairs", "seed", "dpo_000-1.json", help="the mc preference file; its first --n-pairs are used")
    hellaswag_arg(p, "--hellaswag", help="folder with hellaswag_val.jsonl, for the completion pairs")
    p.add_argument("--formats", nargs="+", default=["mc", "completion"], choices=("mc", "completion"))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "auto"], choices=("fp32", "bf16", "auto"),
                   help="dpo-noise's --precision runs")
    p.add_argument("--trl-variants", nargs="*", default=None, choices=list(TRL_VARIANTS),
                   help="TRL runs (none: dpo-noise only; default: its fastest settings on this processor, "
                        f"{' '.join(TRL_FASTEST)} with native bf16, else {' '.join(TRL_FASTEST_NO_BF16)})")
    p.add_argument("--n-pairs", type=int, default=48, help="pairs to train on (one step per micro*accum)")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for every trainer")
    p.add_argument("--out", default=str(ROOT / "experiments/bench/results/train_cpu.json"), help="result JSON")
    args = p.parse_args()
    if args.n_pairs % (args.micro_batch * args.grad_accum):
        p.error(f"--n-pairs {args.n_pairs} is not a multiple of micro-batch * accumulation")

    processor = processor_info(args.threads)
    print(processor["line"])
    if args.trl_variants is None:
        args.trl_variants = TRL_FASTEST_NO_BF16 if processor["kind"] == "no native bf16" else TRL_FASTEST
        print(f"TRL runs: {', '.join(args.trl_variants)} (its fastest settings on a CPU of this kind)")
    slow = processor["matmul"]["fp32_gflops"] / processor["matmul"]["bf16_gflops"]
    if slow > 2 and ("bf16" in args.precisions or any("bf16" in v for v in args.trl_variants)):
        print(f"note: a bf16 matrix product is {slow:.0f}x slower than fp32 on this CPU (no native bf16 "
              "instructions); the bf16 rows will take that much longer", file=sys.stderr)
    model_dir = models.resolve(args.model)
    py = subprocess.run([str(ROOT / "experiments/bench/peer_venv.sh"), "trl", *TRL_PINS], check=True,
                        capture_output=True, text=True).stdout.strip() if args.trl_variants else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for fmt in args.formats:
            pairs_file = work / f"{fmt}.json"
            source = Path(args.pairs) if fmt == "mc" else completion_pairs(args, work)
            pairs_file.write_text(json_text(json.loads(source.read_text())[: args.n_pairs], ensure_ascii=True))
            rows += [run_ours(args, model_dir, pairs_file, work, fmt, precision) for precision in args.precisions]
            rows += [run_trl(args, py, model_dir, pairs_file, work, fmt, v) for v in args.trl_variants]
    add_ratios(rows)
    result = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{args.threads} threads", "cpu": processor["facts"]["cpu"], "processor": processor,
              "model": args.model, "model_dir": model_dir, "matmul": processor["matmul"], "settings": vars(args),
              "rows": rows}
    atomic_write_json(args.out, portable(result), indent=1)
    print(f"\n{processor['line']}")
    print("\n| format | trainer | pairs/s | incl. reference | vs fastest TRL | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        vs = f"{row['vs_fastest_trl']['speedup']:.2f}x" if "vs_fastest_trl" in row else "-"
        print(f"| {row['format']} | {row['trainer']} | {row['pairs_per_s']:.3f} | "
              f"{row['pairs_per_s_incl_reference']:.3f} | {vs} | {row['peak_rss_mib']:.0f} |")


def processor_info(threads: int) -> dict:
    """What the figures depend on: the CPU (model name, bf16-related flags, torch's CPU capability), the speed of
    a model-shaped matrix product in fp32 and bf16 (2048 x 576 -> 1536, SmolLM2's MLP), and what `--precision
    auto` picks here and why; `line` says it in one line."""
    torch.set_num_threads(threads)
    facts = precision.cpu_facts()
    matmul = precision.probe(shape=(2048, 576, 1536), repeats=5)
    auto = precision.choose("auto", torch.device("cpu"))
    kind = precision.cpu_kind(facts)
    flags = ", ".join(f"{f} {'yes' if f in (facts['flags'] or []) else 'no'}"
                      for f in ("avx512f", "avx512_bf16", "amx_bf16")) if facts["flags"] is not None else "unknown"
    line = (f"processor: {facts['cpu']} ({kind}; {flags}; torch CPU capability {facts['capability']}, torch "
            f"{facts['torch']}, {threads} threads): matmul fp32 {matmul['fp32_gflops']:.0f} GFLOP/s, bf16 "
            f"{matmul['bf16_gflops']:.0f} GFLOP/s; --precision auto -> {auto['precision']} ({auto['reason']})")
    return {"facts": facts, "kind": kind, "matmul": matmul, "auto": auto, "line": line}


if __name__ == "__main__":
    main()
