"""Side-by-side HellaSwag scoring: `dpo eval` against lm-evaluation-harness 0.4.13, same model and items, one run.

    .venv/bin/python experiments/bench/eval_speed.py --out experiments/bench/results/eval_cpu.json

Defaults are the issue's CPU benchmark: SmolLM2-135M-Instruct (the offline alias), the first 500 items of
../shared/hellaswag/hellaswag_val.jsonl, 0-shot completion scoring (acc, acc_norm), the harness at batch size 16,
fp32. Each scorer runs in its own process; the harness in a separate virtual environment (peer_venv.sh), never a
dependency. Speed is items / wall seconds of the whole process (imports, model load, data and scoring) for both,
plus each one's own scoring-only figure. Agreement: the largest per-ending log-likelihood difference, and whether
acc / acc_norm and every prediction are identical.
"""

import argparse
import json
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

HARNESS_PIN = "lm_eval[hf]==0.4.13"


def timed_run(cmd, **kw) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model spec (alias, folder, .gguf)")
    p.add_argument("--data", default=str(ROOT / "../shared/hellaswag/hellaswag_val.jsonl"), help="HellaSwag JSONL")
    p.add_argument("--limit", type=int, default=500, help="score the first LIMIT items")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of both scorers")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of both scorers")
    p.add_argument("--out", default=str(ROOT / "experiments/bench/results/eval_cpu.json"), help="result JSON")
    args = p.parse_args()
    model_dir = models.resolve(args.model)

    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, peer_out = Path(tmp) / "ours", Path(tmp) / "harness.json"
        ours_cmd = [sys.executable, "-c", f"import torch, sys; torch.set_num_threads({args.threads}); "
                    "from dpo.cli import main; sys.exit(main())", "eval", "--model", model_dir,
                    "--val-file", args.data, "--train-from-val", "--eval-size", str(args.limit),
                    "--metrics", "completion", "--batch-size", str(args.batch_size), "--device", "cpu",
                    "--out-dir", str(ours_dir)]
        ours_wall = timed_run(ours_cmd)
        py = subprocess.run([str(ROOT / "experiments/bench/peer_venv.sh"), "lmeval", HARNESS_PIN], check=True,
                            capture_output=True, text=True).stdout.strip()
        peer_cmd = [py, str(ROOT / "experiments/bench/harness_hellaswag.py"), "--model", model_dir, "--data",
                    args.data, "--limit", str(args.limit), "--batch-size", str(args.batch_size), "--threads",
                    str(args.threads), "--out", str(peer_out)]
        peer_wall = timed_run(peer_cmd, stdout=subprocess.DEVNULL)
        ours = json.loads((ours_dir / "results.json").read_text())
        preds = [json.loads(line) for line in (ours_dir / "predictions.jsonl").read_text().splitlines()]
        peer = json.loads(peer_out.read_text())

    assert [r["id"] for r in preds] == [f"val/{it['ind']}" for it in peer["items"]], "item order differs"
    diffs = [abs(a - b) for r, it in zip(preds, peer["items"])
             for a, b in zip(r["completion_logliks"], it["loglikelihoods"])]
    same_acc = [r["pred_acc"] == max(range(4), key=lambda j: (it["loglikelihoods"][j], -j))
                for r, it in zip(preds, peer["items"])]
    result = {
        "date": date.today().isoformat(), "cpu": _cpu_name(), "threads": args.threads, "model": args.model,
        "model_dir": model_dir, "items": args.limit, "batch_size": args.batch_size,
        "ours": {"acc": ours["acc"], "acc_norm": ours["acc_norm"], "process_wall_s": ours_wall,
                 "items_per_s": args.limit / ours_wall, "scoring_s": ours["seconds"],
                 "scoring_items_per_s": ours["items_per_s"], "command": " ".join(ours_cmd)},
        "harness": {"acc": peer["acc"], "acc_norm": peer["acc_norm"], "process_wall_s": peer_wall,
                    "items_per_s": args.limit / peer_wall, "simple_evaluate_s": peer["seconds"],
                    "simple_evaluate_items_per_s": peer["items_per_s"], "versions": peer.get("versions"),
                    "command": " ".join(peer_cmd)},
        "agreement": {"max_abs_loglik_diff": max(diffs), "endings_compared": len(diffs),
                      "acc_identical": ours["acc"] == peer["acc"],
                      "acc_norm_identical": ours["acc_norm"] == peer["acc_norm"],
                      "acc_predictions_identical": all(same_acc)},
    }
    result["speedup"] = result["ours"]["items_per_s"] / result["harness"]["items_per_s"]
    result["speedup_scoring_only"] = ours["items_per_s"] / peer["items_per_s"]
    atomic_write_json(args.out, result, indent=1)
    print(json.dumps({k: result[k] for k in ("ours", "harness", "agreement", "speedup")}, indent=1))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
