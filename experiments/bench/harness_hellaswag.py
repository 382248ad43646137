"""Peer side of the HellaSwag side-by-side: EleutherAI lm-evaluation-harness, zero-shot, offline.

Run with a python that has the harness (not a project dependency): the harness venv on the CPU; on a GPU machine,
whatever python has `pip install lm_eval`, as gpu_suite.sh uses it:

    PY=$(experiments/bench/peer_venv.sh lmeval "lm_eval[hf]==0.4.13")
    $PY experiments/bench/harness_hellaswag.py --model DIR --data $DPO_HELLASWAG_DIR/hellaswag_val.jsonl \
        --limit 500 --batch-size 16 --out RESULT.json [--threads N] [--device cuda --dtype bfloat16]

The harness's `hellaswag` task downloads Rowan/hellaswag from the hub, so the task is redefined offline: a yaml
that `include`s the harness's own tasks/hellaswag/hellaswag.yaml (so process_docs, preprocess, doc_to_text
"{{query}}", doc_to_choice "choices", doc_to_target, metrics acc/acc_norm and output_type multiple_choice are
the harness's own, utils.py included) and overrides only the dataset: `dataset_path: json` with
`dataset_kwargs.data_files.validation` = a temporary JSONL of the first --limit rows.  Rows without
ctx_a/ctx_b (the local copy) get ctx_a = ctx, ctx_b = "", so the harness's query is
preprocess(activity_label + ": " + ctx + " "), which strips to the same text.  Writing only the first
--limit rows changes nothing: the harness's --limit takes the first `limit` docs in file order anyway.

The JSON written to --out holds versions, n, acc/acc_norm (+ stderr), the wall seconds of simple_evaluate
(model load, dataset build and scoring), items/s = n / seconds, and the two phases inside it timed apart: load_s
(the HFLM constructor: model and tokenizer) and requests_s (HFLM.loglikelihood over all 4 n requests: the scoring
itself), requests_items_per_s = n / requests_s; peak RSS MiB (peak CUDA MiB on a GPU), and per item in doc order:
ind, gold, the 4 summed log-likelihoods and is_greedy flags, and the exact strings the harness scored:
`query` (the context of all 4 requests) and the 4 `continuations` (each " " + preprocessed ending).
"""
import argparse
import importlib.metadata as md
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from benchlib import json_text, timed  # this folder (the script's) is on sys.path

# What peer_venv.sh installs; recorded with the versions actually imported.
PINS = {"lm_eval": "0.4.13", "torch": "2.13.0"}
INSTALL = 'experiments/bench/peer_venv.sh lmeval "lm_eval[hf]==0.4.13"'
TASK = "hellaswag_offline"


def write_task(tmp: Path, data: Path, limit: int) -> None:
    """The temporary JSONL (ctx_a/ctx_b filled in) and the yaml that includes the harness's hellaswag.yaml."""
    import lm_eval.tasks.hellaswag.utils as hs_utils  # the harness's own preprocessing

    rows = []
    with open(data) as fh:
        for line in fh:
            if len(rows) >= limit:
                break
            row = json.loads(line)
            if "ctx_a" not in row or "ctx_b" not in row:
                row["ctx_a"], row["ctx_b"] = row["ctx"], ""
            row["label"] = str(row["label"])  # the hub copy stores labels as strings; "{{label}}" renders both alike
            rows.append(row)
    jsonl = tmp / "hellaswag_rows.jsonl"
    jsonl.write_text("".join(json_text(r, indent=None) + "\n" for r in rows))
    base = Path(hs_utils.__file__).with_name("hellaswag.yaml")
    (tmp / f"{TASK}.yaml").write_text(
        f"include: {json.dumps(str(base))}\n"
        f"task: {TASK}\n"
        "tag: []\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {json.dumps(str(jsonl))}\n"
        "training_split: null\n"
        "validation_split: validation\n"
        "test_split: null\n")


def pair(x):
    """(loglikelihood, is_greedy) from one request's resps ([[ll, g]]) or filtered_resps ([ll, g])."""
    while isinstance(x, (list, tuple)) and len(x) == 1:
        x = x[0]
    return float(x[0]), (bool(x[1]) if len(x) > 1 else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="plain HF model folder")
    ap.add_argument("--data", required=True, help="HellaSwag JSONL (ind, activity_label, ctx, endings, label)")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", help="the model's weights: float32 or bfloat16")
    args = ap.parse_args()

    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if args.threads:
        torch.set_num_threads(args.threads)
    load_s, requests_s = [], []
    HFLM.__init__, HFLM.loglikelihood = timed(HFLM.__init__, load_s), timed(HFLM.loglikelihood, requests_s)
    with tempfile.TemporaryDirectory(prefix="harness_hs_") as tmp:
        write_task(Path(tmp), Path(args.data), args.limit)
        tm = TaskManager(include_path=tmp)
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={args.model},dtype={args.dtype}", tasks=[TASK],
            batch_size=args.batch_size, limit=args.limit, log_samples=True, device=args.device, task_manager=tm)
        seconds = time.perf_counter() - t0

    res = out["results"][TASK]
    items = []
    for s in sorted(out["samples"][TASK], key=lambda s: s["doc_id"]):
        lls = [pair(r) for r in s["filtered_resps"]]
        raw = [pair(r)[0] for r in s["resps"]]
        assert raw == [ll for ll, _ in lls], "resps and filtered_resps disagree"
        query = s["arguments"][0][0]
        assert all(a[0] == query for a in s["arguments"]), "one context per item expected"
        items.append({
            "ind": s["doc"]["ind"], "doc_id": s["doc_id"], "gold": int(s["doc"]["gold"]),
            "loglikelihoods": [ll for ll, _ in lls], "is_greedy": [g for _, g in lls],
            "query": query, "continuations": [a[1] for a in s["arguments"]],
            "acc": s["acc"], "acc_norm": s["acc_norm"]})
    n = len(items)
    result = {
        "peer": "lm-evaluation-harness", "task": "hellaswag (harness yaml, offline data)", "install": INSTALL,
        "pins": PINS, "versions": {p: md.version(p) for p in ("lm_eval", "torch", "transformers", "datasets",
                                                                "tokenizers", "accelerate")},
        "python": sys.version.split()[0], "model": str(args.model), "data": str(args.data),
        "limit": args.limit, "batch_size": args.batch_size, "threads": torch.get_num_threads(), "n": n,
        "acc": res["acc,none"], "acc_stderr": res.get("acc_stderr,none"),
        "acc_norm": res["acc_norm,none"], "acc_norm_stderr": res.get("acc_norm_stderr,none"),
        "device": args.device, "dtype": args.dtype, "seconds": seconds, "items_per_s": n / seconds,
        "load_s": sum(load_s), "requests_s": sum(requests_s), "requests_items_per_s": n / sum(requests_s),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None,
        "items": items}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json_text(result))
    print(json.dumps({k: result[k] for k in ("n", "acc", "acc_norm", "seconds", "items_per_s", "load_s", "requests_s",
                                             "requests_items_per_s", "peak_rss_mib")}))


if __name__ == "__main__":
    main()
