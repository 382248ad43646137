"""Side-by-side HellaSwag scoring: `dpo eval` against lm-evaluation-harness 0.4.13, same model and items, one run.

    .venv/bin/python experiments/bench/eval_speed.py --out experiments/bench/results/eval_cpu.json
    python experiments/bench/eval_speed.py --device cuda --model DIR --data FILE --limit 1000 \\
        --harness-python python3 --out eval_gpu.json                                  # the GPU suite's call

Defaults are the issue's CPU benchmark: SmolLM2-135M-Instruct (the offline alias), the first 500 items of
$DPO_HELLASWAG_DIR/hellaswag_val.jsonl, 0-shot completion scoring (acc, acc_norm), batch size 16 for both, fp32.
--device cuda: bf16 for both tools (dpo eval's bf16 autocast; the harness with dtype=bfloat16). Each scorer runs
in its own process; the harness with --harness-python (default: its own virtual environment, peer_venv.sh), never
a dependency. Speed: items / wall seconds of the whole process (imports, model load, data and scoring) for both;
each one's scoring alone (dpo eval's own timing; the harness's request phase, its loglikelihood requests, timed
apart from its model load), whose ratio is `speedup_scoring`. Agreement: the largest per-ending log-likelihood
difference, and whether acc / acc_norm and every prediction are identical. The JSON is written once dpo eval is
done and again with the harness, so a harness failure keeps dpo-noise's figures (and the script exits 1);
--no-harness stops after dpo eval.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from benchlib import hellaswag_arg, portable

from dpo.core import models
from dpo.core.files import atomic_write_json

ROOT = Path(__file__).resolve().parents[2]
HARNESS_PIN = "lm_eval[hf]==0.4.13"


def timed_run(cmd, **kw) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)
    return time.perf_counter() - t


def agreement(preds: list, peer_items: list) -> dict:
    """Per-ending log-likelihood differences and prediction agreement, item by item in file order."""
    if [r["id"] for r in preds] != [f"val/{it['ind']}" for it in peer_items]:
        return {"same_items": False}
    diffs = [abs(a - b) for r, it in zip(preds, peer_items)
             for a, b in zip(r["completion_logliks"], it["loglikelihoods"])]
    same_acc = [r["pred_acc"] == max(range(4), key=lambda j: (it["loglikelihoods"][j], -j))
                for r, it in zip(preds, peer_items)]
    return {"same_items": True, "max_abs_loglik_diff": max(diffs), "endings_compared": len(diffs),
            "acc_predictions_identical": all(same_acc), "acc_predictions_differing": same_acc.count(False)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model spec (alias, folder, .gguf)")
    hellaswag_arg(p, "--data", "hellaswag_val.jsonl", help="HellaSwag JSONL")
    p.add_argument("--limit", type=int, default=500, help="score the first LIMIT items")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of both scorers")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of both scorers")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: bf16 for both tools")
    p.add_argument("--harness-python", default="", help="python with lm_eval (default: peer_venv.sh's lmeval venv)")
    p.add_argument("--no-harness", action="store_true", help="dpo eval alone (where the harness is not installed)")
    p.add_argument("--out", default=str(ROOT / "experiments/bench/results/eval_cpu.json"), help="result JSON")
    args = p.parse_args()
    model_dir = models.resolve(args.model)
    cuda = args.device == "cuda"

    result = {"date": date.today().isoformat(), "device": args.device, "device_name": _device_name(cuda),
              "threads": args.threads, "model": args.model, "model_dir": model_dir, "items": args.limit,
              "batch_size": args.batch_size, "precision": "bf16" if cuda else "fp32"}
    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, peer_out = Path(tmp) / "ours", Path(tmp) / "harness.json"
        ours_cmd = [sys.executable, "-c", f"import torch, sys; torch.set_num_threads({args.threads}); "
                    "from dpo.cli import main; sys.exit(main())", "eval", "--model", model_dir,
                    "--val-file", args.data, "--train-from-val", "--eval-size", str(args.limit),
                    "--metrics", "completion", "--batch-size", str(args.batch_size), "--device", args.device,
                    "--out-dir", str(ours_dir)]
        ours_wall = timed_run(ours_cmd)
        ours = json.loads((ours_dir / "results.json").read_text())
        preds = [json.loads(line) for line in (ours_dir / "predictions.jsonl").read_text().splitlines()]
        result["ours"] = {"acc": ours["acc"], "acc_norm": ours["acc_norm"], "process_wall_s": ours_wall,
                          "items_per_s": args.limit / ours_wall, "load_s": ours.get("load_seconds"),
                          "scoring_s": ours["seconds"], "scoring_items_per_s": ours["items_per_s"],
                          "command": " ".join(ours_cmd)}
        atomic_write_json(args.out, portable(result), indent=1)
        if args.no_harness:
            print(json.dumps(result["ours"], indent=1))
            return

        py = args.harness_python or subprocess.run(
            [str(ROOT / "experiments/bench/peer_venv.sh"), "lmeval", HARNESS_PIN], check=True, capture_output=True,
            text=True).stdout.strip()
        peer_cmd = [py, str(ROOT / "experiments/bench/harness_hellaswag.py"), "--model", model_dir, "--data",
                    args.data, "--limit", str(args.limit), "--batch-size", str(args.batch_size), "--threads",
                    str(args.threads), "--device", args.device, "--dtype", "bfloat16" if cuda else "float32",
                    "--out", str(peer_out)]
        try:
            peer_wall = timed_run(peer_cmd, stdout=subprocess.DEVNULL)
        except subprocess.CalledProcessError as e:
            result["harness"] = {"error": f"exited with {e.returncode}", "command": " ".join(peer_cmd)}
            atomic_write_json(args.out, portable(result), indent=1)
            sys.exit(f"harness failed: {' '.join(peer_cmd)}")
        peer = json.loads(peer_out.read_text())

    result["harness"] = {"acc": peer["acc"], "acc_norm": peer["acc_norm"], "process_wall_s": peer_wall,
                         "items_per_s": args.limit / peer_wall, "load_s": peer.get("load_s"),
                         "requests_s": peer.get("requests_s"), "requests_items_per_s": peer.get("requests_items_per_s"),
                         "simple_evaluate_s": peer["seconds"], "simple_evaluate_items_per_s": peer["items_per_s"],
                         "versions": peer.get("versions"), "command": " ".join(peer_cmd)}
    result["agreement"] = {**agreement(preds, peer["items"]), "acc_identical": ours["acc"] == peer["acc"],
                           "acc_norm_identical": ours["acc_norm"] == peer["acc_norm"]}
    result["speedup"] = result["ours"]["items_per_s"] / result["harness"]["items_per_s"]
    result["speedup_scoring_only"] = ours["items_per_s"] / peer["items_per_s"]  # vs simple_evaluate, load included
    if peer.get("requests_items_per_s"):
        result["speedup_scoring"] = ours["items_per_s"] / peer["requests_items_per_s"]  # vs the request phase
    atomic_write_json(args.out, portable(result), indent=1)
    print(json.dumps({k: result[k] for k in ("ours", "harness", "agreement", "speedup")}, indent=1))


def _device_name(cuda: bool) -> str:
    if cuda:
        import torch

        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
