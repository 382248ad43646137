"""gpu_suite.sh's JSON: the figures of every part that finished, the ratios, versions and each part's status.

    python experiments/bench/suite_report.py env WORK/env.json              device name, versions, date (imports torch)
    python experiments/bench/suite_report.py report WORK OUT.json [--table]  assemble (plain Python, no torch)

`report` reads what the suite's parts left in WORK: parts.tsv (name, status, return code, seconds, note per part)
and settings.tsv, env.json, model/bench_model.json, cuda_tests.xml (pytest's JUnit XML), train_seed.json and
train_default.json (gpu_throughput.py), trl.json and trl_precompute.json (trl_dpo.py), eval.json (eval_speed.py),
profile/profile.json (profile_step.py).
A part that did not finish leaves its figures null, and so are the ratios that need them. --table also prints the
headline figures as a Markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path

from benchlib import json_text, portable

PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "huggingface-hub", "numpy", "pyarrow", "pandas",
            "fsspec", "trl", "datasets", "lm_eval", "pytest")


def environment() -> dict:
    import importlib.metadata as md
    import platform

    import torch

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device_name": torch.cuda.get_device_name() if cuda else f"cpu ({cpu_name()})",
            "cuda": torch.version.cuda,
            "nvidia_smi": output("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"),
            "cpu_count": os.cpu_count(), "versions": versions,
            "git_commit": output("git", "rev-parse", "HEAD")}


def output(*cmd):
    """A command's stdout, or None when it fails or is not there (the GPU machine may lack git)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def read_tsv(path: Path) -> list:
    return [line.split("\t") for line in path.read_text().splitlines()] if path.is_file() else []


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit(path: Path):
    """Counts of pytest's JUnit XML, and the names of the tests that failed."""
    if not path.is_file():
        return None
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = suite.findall("testcase")
    failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
    return {"tests": len(cases), "passed": len(cases) - len(failed) - len(skipped), "failed": failed,
            "skipped": skipped}


def ratio(a, b):
    return a / b if a and b else None


def pick(d, *keys):
    """d[k1][k2]...; None when any level is missing."""
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def assemble(work: Path) -> dict:
    parts = [{"part": r[0], "status": r[1], "returncode": int(r[2]) if r[2] else None, "seconds": int(r[3]),
              "note": r[4] if len(r) > 4 else ""} for r in read_tsv(work / "parts.tsv")]
    settings = {k: v for k, v in read_tsv(work / "settings.tsv")}
    train = {p: (load(work / f"train_{p}.json") or {}).get("rows", [None])[0] for p in ("seed", "default")}
    trl = {k: load(work / f"{k}.json") for k in ("trl", "trl_precompute")}
    ev = load(work / "eval.json")
    env = load(work / "env.json") or {}
    prof = load(work / "profile" / "profile.json")

    def trl_reference_pairs_per_s(r):
        return ratio(r["n_pairs"], r["precompute_s"]) if r and r.get("precompute_s") else None

    trl_bf16 = next((r.get("bf16_autocast") for r in trl.values() if r), None)
    headline = {
        "device_name": env.get("device_name"), "date": env.get("date"), "dry_run": settings.get("dry_run") == "1",
        "trl_precision": {True: "bf16 autocast", False: "fp32"}.get(trl_bf16, "-"),
        "pairs_per_s": {"dpo_seed_4x4_gc": pick(train, "seed", "pairs_per_s"),
                        "dpo_gpu_default": pick(train, "default", "pairs_per_s"),
                        "trl_4x4_gc": pick(trl, "trl", "steady_pairs_per_s"),
                        "trl_4x4_gc_precompute": pick(trl, "trl_precompute", "steady_pairs_per_s")},
        "mfu": {"dpo_gpu_default": pick(train, "default", "mfu"), "dpo_seed_4x4_gc": pick(train, "seed", "mfu")},
        "tokens_per_s": {"dpo_gpu_default": pick(train, "default", "tokens_per_s"),
                         "dpo_seed_4x4_gc": pick(train, "seed", "tokens_per_s")},
        "peak_gib": {"dpo_seed_4x4_gc": pick(train, "seed", "peak_memory_gib"),
                     "dpo_gpu_default": pick(train, "default", "peak_memory_gib"),
                     "trl_4x4_gc": (pick(trl, "trl", "peak_cuda_mib") or 0) / 1024 or None,
                     "trl_4x4_gc_precompute": (pick(trl, "trl_precompute", "peak_cuda_mib") or 0) / 1024 or None},
        "reference_pass": {"dpo_seed_seconds": pick(train, "seed", "reference_seconds"),
                           "dpo_seed_pairs_per_s": pick(train, "seed", "reference_pairs_per_s"),
                           "dpo_default_seconds": pick(train, "default", "reference_seconds"),
                           "dpo_default_pairs_per_s": pick(train, "default", "reference_pairs_per_s"),
                           "trl_precompute_seconds": pick(trl, "trl_precompute", "precompute_s"),
                           "trl_precompute_pairs_per_s": trl_reference_pairs_per_s(trl["trl_precompute"])},
        "profile_gpu_default": {"gpu_busy_fraction": pick(prof, "gpu_busy_fraction"),
                                "step_seconds": [r["seconds"] for r in prof["steps"]] if prof else None},
        "eval_items_per_s": {"dpo_eval_scoring": pick(ev, "ours", "scoring_items_per_s"),
                             "harness_requests": pick(ev, "harness", "requests_items_per_s"),
                             "dpo_eval_process": pick(ev, "ours", "items_per_s"),
                             "harness_process": pick(ev, "harness", "items_per_s")},
    }
    pps = headline["pairs_per_s"]
    headline["ratios"] = {
        "dpo_seed_vs_trl_precompute": ratio(pps["dpo_seed_4x4_gc"], pps["trl_4x4_gc_precompute"]),
        "dpo_default_vs_trl_precompute": ratio(pps["dpo_gpu_default"], pps["trl_4x4_gc_precompute"]),
        "dpo_seed_vs_trl": ratio(pps["dpo_seed_4x4_gc"], pps["trl_4x4_gc"]),
        "dpo_default_vs_trl": ratio(pps["dpo_gpu_default"], pps["trl_4x4_gc"]),
        "dpo_default_vs_dpo_seed": ratio(pps["dpo_gpu_default"], pps["dpo_seed_4x4_gc"]),
        "eval_scoring_vs_harness_requests": ratio(headline["eval_items_per_s"]["dpo_eval_scoring"],
                                                  headline["eval_items_per_s"]["harness_requests"]),
        "eval_process_vs_harness_process": ratio(headline["eval_items_per_s"]["dpo_eval_process"],
                                                 headline["eval_items_per_s"]["harness_process"]),
    }
    return {"headline": headline, "parts": parts, "settings": settings, "environment": env,
            "model": load(work / "model" / "bench_model.json"), "cuda_tests": junit(work / "cuda_tests.xml"),
            "train": train, "trl": trl, "eval": ev, "profile": prof}


def table(report: dict) -> str:
    h = report["headline"]

    def f(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    rows = [("dpo train, seed 4x4 + checkpointing", h["pairs_per_s"]["dpo_seed_4x4_gc"], h["mfu"]["dpo_seed_4x4_gc"],
             h["peak_gib"]["dpo_seed_4x4_gc"]),
            ("dpo train, GPU default", h["pairs_per_s"]["dpo_gpu_default"], h["mfu"]["dpo_gpu_default"],
             h["peak_gib"]["dpo_gpu_default"]),
            (f"TRL 4x4 + checkpointing, {h['trl_precision']}", h["pairs_per_s"]["trl_4x4_gc"], None,
             h["peak_gib"]["trl_4x4_gc"]),
            ("TRL, same + precompute_ref_log_probs", h["pairs_per_s"]["trl_4x4_gc_precompute"], None,
             h["peak_gib"]["trl_4x4_gc_precompute"])]
    lines = [f"device: {h['device_name']}  date: {h['date']}  dry run: {h['dry_run']}",
             "| training (steady state) | pairs/s | MFU | peak GiB |", "|---|---|---|---|"]
    lines += [f"| {name} | {f(p)} | {f(m, '.3f')} | {f(g, '.1f')} |" for name, p, m, g in rows]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {f(v)} |" for k, v in h["ratios"].items()]
    lines += ["", "| part | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {p['part']} | {p['status']} | {p['seconds']} | {p['note']} |" for p in report["parts"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="device name, versions, date -> JSON")
    e.add_argument("out")
    r = sub.add_parser("report", help="assemble the suite's JSON")
    r.add_argument("work")
    r.add_argument("out")
    r.add_argument("--table", action="store_true", help="also print the headline figures as a table")
    args = p.parse_args(argv)
    if args.command == "env":
        result = environment()
    else:
        result = assemble(Path(args.work))
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json_text(portable(result)))
    tmp.replace(args.out)
    if args.command == "env":
        print(json.dumps(result, indent=1))
    elif args.table:
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
