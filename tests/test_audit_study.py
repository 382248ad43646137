"""experiments/audit_real.py, the study of the audit on files noisy before dpo data saw them: its files swap exactly
the share asked, nested over noise levels, and its report counts what the results say."""

import importlib.util
import json
from pathlib import Path

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
    assert study.arms(spec) == ["free", "calibrated", "review-50", "review-100", "review-200"]
