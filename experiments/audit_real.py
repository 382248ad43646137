"""The audit on files whose noise is already inside them (experiments/audit-real-cpu.toml says what and why).

For every seed and noise level: a user's file (HellaSwag completion pairs, a known share swapped, no `flipped`
field), `dpo data --pairs` on it, then `dpo audit` once per arm (no clean set; a clean set; K reviewed pairs, the
verdicts the hidden truth). One result file per (seed, noise) in experiments/runs/<study>/results/, written last,
so an interrupted run resumes at the next file; `--report` writes REPORT.md from them. The files made from
HellaSwag stay under data/ (never committed); only the numbers are.

    DPO_HELLASWAG_DIR=/path/to/hellaswag python experiments/audit_real.py experiments/audit-real-cpu.toml
    python experiments/audit_real.py experiments/audit-real-cpu.toml --report
"""

import argparse
import functools
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import tomllib

from dpo import cli
from dpo.audit import audit, review
from dpo.core import stats
from dpo.core.config import AuditConfig
from dpo.core.files import InputError, atomic_write_json, atomic_write_text
from dpo.data.hellaswag import read_items
from dpo.data.pairs import make_pair

FIRST_ITEM = 1000  # val[0:1000] is the default evaluation set


def study_items(hellaswag_dir: str, name: str) -> list:
    items = read_items(Path(hellaswag_dir) / "hellaswag_val.jsonl", "validation items")[FIRST_ITEM:]
    random.Random(name).shuffle(items)
    return items


def clean_pairs(items: list, seed: int) -> list:
    return [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in
            (make_pair(item, "completion", [], 0, seed) for item in items)]


def swapped_file(pairs: list, noise: float, seed: int) -> tuple:
    """(the rows of a user's file with exactly round(noise n) pairs swapped, which are): nested over noise levels."""
    order = list(range(len(pairs)))
    random.Random(f"swaps/{seed}").shuffle(order)
    swap = set(order[:round(noise * len(pairs))])
    rows = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} if i in swap else p for i, p in enumerate(pairs)]
    return rows, [i in swap for i in range(len(pairs))]


def audit_arm(pairs_file: Path, out_dir: Path, spec: dict, **flags) -> dict:
    """One `dpo audit` (in this process: the model loads once); its audit.json, or the refusal's message."""
    cfg = AuditConfig(pairs=str(pairs_file), model=spec["model"], score=spec["score"], out_dir=str(out_dir),
                      cache_dir=spec["cache_dir"], **flags)
    try:
        return audit.run(cfg)
    except InputError as e:
        return {"refused": str(e)}


def reviewed_verdicts(pairs: list, truth: list, k: int, seed: int, path: Path) -> None:
    """review.csv as --review K draws it, every verdict filled in with the truth (a careful reviewer)."""
    rows = review.review_rows(pairs, review.draw(len(pairs), k, seed))
    for row in rows:
        row["verdict"] = "no" if truth[row["index"]] else "yes"
    atomic_write_text(path, review.csv_text(rows))


def estimate_of(result: dict, section: str = "") -> dict:
    """eps^, its interval and any refusal of one estimate in an audit.json."""
    if "refused" in result:
        return {"refused": result["refused"]}
    part = result.get(section) if section else None
    if section == "calibration_free":
        return {"eps": part["eps"], "low": part["low"], "high": part["high"], "refused": part["refused"] or None,
                "tail_below_zero": part["tail"]["below_zero"]}
    if section == "reviewed":
        c, d = part["combined"], part["direct"]
        return {"eps": c["eps"], "low": c["low"], "high": c["high"], "refused": c["refused"] or None,
                "direct": {"eps": d["eps_hat"], "low": d["eps_ci95"][0], "high": d["eps_ci95"][1]}}
    return {"eps": result["eps_hat"], "low": result["eps_ci95"][0], "high": result["eps_ci95"][1], "refused": None}


def file_scores(here: Path):
    """The reference's score of each pair of the file (the same in every arm), from the first arm that wrote them;
    None if every arm refused."""
    for arm in ("free", "calibrated", "calibrated-own"):
        if (here / arm / "audit.jsonl").exists():
            lines = (here / arm / "audit.jsonl").read_text().splitlines()
            return np.array([json.loads(line)["score"] for line in lines])
    return None


def detector_auroc(here: Path, truth: list):
    """AUROC of the scores against the truth; None if every arm refused."""
    scores = file_scores(here)
    return None if scores is None else stats.auroc(-scores, np.asarray(truth, dtype=bool))


def user_file(spec: dict, items: list, seed: int, noise: float, work: Path) -> tuple:
    """(the folder of seed and noise's file, the file `dpo data --pairs` made of it, the truth of each of its pairs):
    made when missing, the same every time."""
    n = spec["n"]
    pairs = clean_pairs(items[(seed - 1) * n: seed * n], seed)
    rows, truth = swapped_file(pairs, noise, seed)
    here = work / f"seed{seed}_noise{noise}"
    made = here / "d" / f"user_n{n}_noise0_seed1.json"
    if not made.exists():
        here.mkdir(parents=True, exist_ok=True)
        src = here / "user.jsonl"
        atomic_write_text(src, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        if cli.main(["data", "--pairs", str(src), "--noise", "0", "--holdout", "0", "--out-dir", str(here / "d")]):
            raise SystemExit(f"dpo data failed on {src}")
    audited = json.loads(made.read_text())
    return here, made, [truth[int(p["item"].split("/")[1])] for p in audited]  # item: row/<index in the source>


def free_arm(spec, here, made, truth, seed, clean) -> dict:
    return estimate_of(audit_arm(made, here / "free", spec), "calibration_free")


def calibrated_arm(spec, here, made, truth, seed, clean) -> dict:
    return estimate_of(audit_arm(made, here / "calibrated", spec, val_file=str(clean["shared"])))


def own_clean_arm(spec, here, made, truth, seed, clean) -> dict:
    return estimate_of(audit_arm(made, here / "calibrated-own", spec, val_file=str(clean[seed])))


def review_arm(k: int):
    def arm(spec, here, made, truth, seed, clean) -> dict:
        audited = json.loads(made.read_text())
        reviewed_verdicts(audited, truth, k, seed, here / f"review{k}.csv")
        return estimate_of(audit_arm(made, here / f"review-{k}", spec, reviewed=str(here / f"review{k}.csv")),
                           "reviewed")
    return arm


def cleanlab_arm(spec, here, made, truth, seed, clean) -> dict:
    """Confident learning (cleanlab.count.estimate_joint), the standard peer without clean labels, on the free arm's
    scores: each pair shown in a random order (seeded), its label the position of the file's chosen, the predicted
    probability of that position sigma(m s), s the audit's score and m the file's median response length in
    characters (s is per character: m s is on the scale of a summed log-prob margin). eps^ is the joint's
    off-diagonal mass; its interval the 2.5-97.5 percentiles over 200 resamples of the pairs (cleanlab gives none)."""
    from cleanlab.count import estimate_joint  # the `cleanlab` extra (setup.py): this arm only

    scores = file_scores(here)
    if scores is None:
        return {"refused": "no arm scored the file"}
    audited = json.loads(made.read_text())
    m = float(np.median([len(p[k].lstrip()) for p in audited for k in ("chosen", "rejected")]))
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, len(scores))  # 0: chosen shown first
    p_first = np.where(label == 0, 1 / (1 + np.exp(-m * scores)), 1 / (1 + np.exp(m * scores)))
    probs = np.stack([p_first, 1 - p_first], axis=1)

    def eps(idx):
        joint = estimate_joint(label[idx], probs[idx])
        return float(joint[0, 1] + joint[1, 0])

    boot = [eps(rng.integers(0, len(scores), len(scores))) for _ in range(200)]
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"eps": eps(np.arange(len(scores))), "low": float(low), "high": float(high), "refused": None,
            "scale_m": m}


def arm_table(spec: dict) -> dict:
    """arm -> how it estimates, in the report's order; `cleanlab` reads the free arm's scores."""
    return {"free": free_arm, "calibrated": calibrated_arm, "calibrated-own": own_clean_arm,
            **{f"review-{k}": review_arm(k) for k in spec["reviews"]}, "cleanlab": cleanlab_arm}


def run_file(spec: dict, items: list, clean: dict, seed: int, noise: float, work: Path, out: dict) -> dict:
    """The arms this file's result lacks (all of them for a new file), added to out."""
    here, made, truth = user_file(spec, items, seed, noise, work)
    out.update(seed=seed, noise=noise, n=len(truth), true_eps=float(np.mean(truth)))
    for name, arm in arm_table(spec).items():
        if name not in out:
            out[name] = arm(spec, here, made, truth, seed, clean)
    if out.get("auroc") is None:
        out["auroc"] = detector_auroc(here, truth)
    return out


def clean_sets(spec: dict, items: list, work: Path) -> dict:
    """The clean sets, written once: "shared" (one for every file: the arm `calibrated`) and one per seed (the
    arm `calibrated-own`, shared by that seed's noise levels), none with an item of any file. The seeds' sets are
    disjoint from each other; seed 1's has the shared set's items, with its own rejected endings (drawn with seed
    1, the shared set's with 0)."""
    assert max(spec["seeds"]) <= 5, "the files take items [0, 5 n): seeds 1-5"
    size, first = spec["clean"], 5 * spec["n"]
    sets = {"shared": (items[first: first + size], 0)}
    sets.update({seed: (items[first + (seed - 1) * size: first + seed * size], seed) for seed in spec["seeds"]})
    paths = {}
    for key, (chunk, draw) in sets.items():
        assert len(chunk) == size, "the study's slices need more items"
        paths[key] = work / ("clean.json" if key == "shared" else f"clean_seed{key}.json")
        if not paths[key].exists():
            atomic_write_text(paths[key], json.dumps(clean_pairs(chunk, draw)))
    return paths


def run(path: Path) -> None:
    spec = tomllib.loads(path.read_text())["study"]
    name = path.stem
    spec["cache_dir"] = "data/cache"
    hellaswag = os.environ.get("DPO_HELLASWAG_DIR")
    if not hellaswag:
        raise SystemExit("error: set DPO_HELLASWAG_DIR to a folder with hellaswag_val.jsonl")
    items = study_items(hellaswag, name)
    work, results = Path("data") / name, path.parent / "runs" / name / "results"
    results.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    clean = clean_sets(spec, items, work)
    from dpo.engine import refcache
    from dpo.engine.reference import Scorer
    Scorer.load = functools.lru_cache(maxsize=2)(Scorer.load)  # one model load for the whole study
    # Every cache entry this study reads, this process wrote (data/cache is its own): the spot checks that guard a
    # cache written by others (59 fresh forward passes of the file and 59 of the clean set per audit, 100 audits)
    # would double its cost and guard nothing here.
    refcache.SPOT_CHECKS = 0
    for seed in spec["seeds"]:
        for noise in spec["noise"]:
            target = results / f"seed{seed}_noise{noise}.json"
            out = json.loads(target.read_text()) if target.exists() else {}
            if all(arm in out for arm in arm_table(spec)):
                continue
            t0 = time.perf_counter()
            out = run_file(spec, items, clean, seed, noise, work, out)
            out["seconds"] = round(out.get("seconds", 0.0) + time.perf_counter() - t0, 1)
            atomic_write_json(target, out, indent=1)
            print(f"done {target.name}: {json.dumps({k: out[k] for k in ('true_eps', 'auroc')})}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------------ report

def arms(spec: dict, files: list) -> list:
    """The arms of the table that some finished file has."""
    return [arm for arm in arm_table(spec) if any(arm in f for f in files)]


def arm_row(files: list, arm: str, noise=None) -> str:
    rows = [f for f in files if arm in f and (noise is None or f["noise"] == noise)]
    done = [f for f in rows if not f[arm].get("refused")]
    if not done:
        return f"| {arm} | {'all' if noise is None else noise} | {len(rows)} | {len(rows)} | | | | |"
    err = [f[arm]["eps"] - f["true_eps"] for f in done]
    cover = sum(f[arm]["low"] <= f["true_eps"] <= f[arm]["high"] for f in done)
    width = np.mean([f[arm]["high"] - f[arm]["low"] for f in done])
    return (f"| {arm} | {'all' if noise is None else noise} | {len(rows)} | {len(rows) - len(done)} | "
            f"{np.mean(np.abs(err)):.3f} | {np.mean(err):+.3f} | {cover} of {len(done)} | {width:.3f} |")


def report(path: Path) -> str:
    spec = tomllib.loads(path.read_text())["study"]
    folder = path.parent / "runs" / path.stem
    files = [json.loads(p.read_text()) for p in sorted((folder / "results").glob("*.json"))]
    outcomes = ["## Outcomes", "", spec["outcomes"].strip(), ""] if spec.get("outcomes") else []
    lines = [f"# {path.stem}", "", spec["description"].strip(), "", "## Predictions", "", spec["predictions"].strip(),
             "", *outcomes, f"## Results ({len(files)} of {len(spec['seeds']) * len(spec['noise'])} files)", "",
             "Per arm and noise level: files, refused, mean |eps^ - eps|, mean eps^ - eps (bias), interval coverage "
             "(of the files not refused), mean interval width.", "",
             "| arm | noise | files | refused | mean abs error | bias | coverage | width |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in arms(spec, files):
        lines += [arm_row(files, arm, noise) for noise in spec["noise"]] + [arm_row(files, arm)]
    lines += ["", "Verdicts alone (Wilson interval), and the tail share (the share below 0 among the surest 10% of "
              "pairs: an anchor-point estimate):", "", "| estimate | mean abs error | bias | coverage | width |",
              "| --- | --- | --- | --- | --- |"]
    for k in spec["reviews"]:
        d = [f[f"review-{k}"]["direct"] for f in files if "direct" in f[f"review-{k}"]]
        err = [x["eps"] - f["true_eps"] for x, f in zip(d, files)]
        cover = sum(x["low"] <= f["true_eps"] <= x["high"] for x, f in zip(d, files))
        lines.append(f"| {k} verdicts alone | {np.mean(np.abs(err)):.3f} | {np.mean(err):+.3f} | {cover} of {len(d)} "
                     f"| {np.mean([x['high'] - x['low'] for x in d]):.3f} |")
    tail = [f["free"]["tail_below_zero"] - f["true_eps"] for f in files if "tail_below_zero" in f["free"]]
    lines.append(f"| tail share (surest 10%) | {np.mean(np.abs(tail)):.3f} | {np.mean(tail):+.3f} | | |")
    lines += ["", "AUROC of the scores as a flip detector, per noise level (mean over seeds): " + ", ".join(
        f"{noise}: {np.mean([f['auroc'] for f in files if f['noise'] == noise]):.3f}" for noise in spec["noise"]
        if any(f["noise"] == noise for f in files)), ""]
    refusals = sorted({f[a]["refused"] for f in files for a in arms(spec, files) if a in f and f[a].get("refused")})
    lines += ["Refusals:" if refusals else "No refusals.", ""] + [f"- {r}" for r in refusals]
    text = "\n".join(lines).rstrip() + "\n"
    atomic_write_text(folder / "REPORT.md", text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("toml", type=Path, help="the study file, e.g. experiments/audit-real-cpu.toml")
    p.add_argument("--report", action="store_true", help="write REPORT.md from the finished files, run nothing")
    args = p.parse_args()
    print(report(args.toml) if args.report else run(args.toml) or "")


if __name__ == "__main__":
    main()
