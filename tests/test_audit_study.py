"""experiments/audit_real.py, the study of the audit on files noisy before dpo data saw them: its files swap exactly
the share asked, nested over noise levels, and its report counts what the results say."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

STUDY = Path(__file__).resolve().parents[1] / "experiments" / "audit_real.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("audit_real", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_files_swap_exactly_the_share_asked_and_a_higher_noise_swaps_a_superset(study):
    pairs = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(200)]
    low_rows, low = study.swapped_file(pairs, 0.1, seed=3)
    high_rows, high = study.swapped_file(pairs, 0.3, seed=3)
    assert sum(low) == 20 and sum(high) == 60 and all(h for lo, h in zip(low, high) if lo)
    assert all((r["chosen"] == "bad") == s for r, s in zip(high_rows, high))
    assert "flipped" not in high_rows[0]  # the truth stays outside the file
    assert study.swapped_file(pairs, 0.1, seed=4)[1] != low


def test_the_report_counts_errors_coverage_and_refusals_per_arm(study, tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('[study]\nmodel = "m"\nscore = "margin"\nn = 10\nclean = 5\nnoise = [0.2]\nseeds = [1, 2]\n'
                    'reviews = [4]\ndescription = "d"\npredictions = "p"\n')
    results = tmp_path / "runs" / "s" / "results"
    results.mkdir(parents=True)
    est = {"eps": 0.3, "low": 0.1, "high": 0.35, "refused": None}
    for seed, free in ((1, {**est, "tail_below_zero": 0.25}), (2, {"refused": "too few pairs"})):
        (results / f"seed{seed}_noise0.2.json").write_text(json.dumps({
            "seed": seed, "noise": 0.2, "n": 10, "true_eps": 0.2, "auroc": 0.7, "free": free,
            "calibrated": {**est, "eps": 0.25, "high": 0.18},
            "review-4": {**est, "direct": {"eps": 0.25, "low": 0.05, "high": 0.6}}}))
    text = study.report(toml)
    assert "| free | 0.2 | 2 | 1 | 0.100 | +0.100 | 1 of 1 | 0.250 |" in text
    assert "| calibrated | all | 2 | 0 | 0.050 | +0.050 | 0 of 2 | 0.080 |" in text
    assert "| 4 verdicts alone | 0.050 | +0.050 | 2 of 2 | 0.550 |" in text
    assert "- too few pairs" in text and (tmp_path / "runs" / "s" / "REPORT.md").read_text() == text


def test_the_committed_study_file_names_its_arms_and_predicts_before_it_runs(study):
    import tomllib

    spec = tomllib.loads((STUDY.parent / "audit-real-cpu.toml").read_text())["study"]
    assert spec["n"] == 1000 and spec["noise"] == [0.1, 0.2, 0.3, 0.4] and spec["seeds"] == [1, 2, 3, 4, 5]
    assert spec["reviews"] == [50, 100, 200] and "before any file of this study was scored" in spec["predictions"]
    assert list(study.arm_table(spec)) == ["free", "calibrated", "calibrated-own", "review-50", "review-100",
                                           "review-200", "cleanlab"]
    assert "before the two arms below had run" in spec["predictions"]


def test_the_clean_sets_are_disjoint_from_each_other_and_from_every_file(study, tmp_path):
    from conftest import synthetic_items, write_jsonl

    from dpo.data.hellaswag import read_items

    items = read_items(write_jsonl(tmp_path / "val.jsonl", synthetic_items(62)), "val")
    paths = study.clean_sets({"n": 10, "clean": 4, "seeds": [1, 2, 3]}, items, tmp_path)
    made = {key: json.loads(path.read_text()) for key, path in paths.items()}
    prompts = {key: {p["prompt"] for p in pairs} for key, pairs in made.items()}
    assert all(len(v) == 4 for v in prompts.values()) and set(paths) == {"shared", 1, 2, 3}
    assert not (prompts[1] & prompts[2]) and not (prompts[2] & prompts[3]) and prompts[1] == prompts["shared"]
    files = {p["prompt"] for p in study.clean_pairs(items[:50], 1)}  # the five files' items come first
    assert not any(files & v for v in prompts.values())


def test_a_run_adds_only_the_arms_a_finished_file_lacks(study, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "user_file", lambda spec, items, seed, noise, work: (tmp_path, None, [True, False]))
    monkeypatch.setattr(study, "arm_table", lambda spec: {a: (lambda *args, a=a: calls.append(a) or {"eps": 0.5})
                                                          for a in ("free", "cleanlab")})
    monkeypatch.setattr(study, "detector_auroc", lambda here, truth: 0.6)
    out = study.run_file({}, [], {}, 1, 0.1, tmp_path, {"free": {"eps": 0.2}, "auroc": 0.7})
    assert calls == ["cleanlab"] and out["free"] == {"eps": 0.2} and out["auroc"] == 0.7 and out["true_eps"] == 0.5


def test_cleanlab_counts_confidently_negative_scores_as_flips(study, tmp_path):
    """On synthetic scores with a perfect detector, confident learning finds the flip rate; with a weak one it counts
    the detector's errors as flips too (the bias prediction 5 names)."""
    pytest.importorskip("cleanlab")
    rng = np.random.default_rng(0)
    for sd, low, high in ((0.02, 0.27, 0.33), (0.2, 0.33, 0.5)):  # margins of 0.05 per char, then mostly noise
        truth = rng.random(2000) < 0.3
        scores = np.where(truth, -1, 1) * 0.05 + rng.normal(0, sd, 2000)
        (tmp_path / "free").mkdir(exist_ok=True)
        (tmp_path / "free" / "audit.jsonl").write_text("".join(json.dumps({"score": s}) + "\n" for s in scores))
        made = tmp_path / "made.json"
        made.write_text(json.dumps([{"chosen": "x" * 40, "rejected": "y" * 40}] * 2000))
        got = study.cleanlab_arm({}, tmp_path, made, list(truth), 1, {})
        assert low <= got["eps"] <= high and got["low"] <= got["eps"] <= got["high"], (sd, got)
