"""`dpo audit`: the noise-rate estimator on synthetic scores where the truth is known, the flip posterior, and the
command end to end with a tiny model trained here to tell good answers from bad."""

import csv
import json
import math
import re

import numpy as np
import pytest
from conftest import configs, mc_like_pairs, write

from dpo import cli
from dpo.audit import audit
from dpo.core import stats
from dpo.core.files import InputError
from dpo.engine.logprobs import tokenize_pairs
from dpo.train import train


def synthetic(n, m, eps, accuracy, seed):
    """Scores of a file of n pairs with exactly round(eps n) flipped, and m clean calibration pairs: clean scores
    are normal with mean mu and sd 1, where Phi(mu) = accuracy; a flipped pair's score is a clean score negated."""
    rng = np.random.default_rng(seed)
    mu = float(np.sqrt(2) * _erfinv(2 * accuracy - 1))
    flipped = np.zeros(n, dtype=bool)
    flipped[: round(eps * n)] = True
    scores = rng.normal(mu, 1.0, n)
    scores[flipped] *= -1
    return scores, rng.normal(mu, 1.0, m), flipped


def _erfinv(y):  # inverse error function by bisection (numpy has none)
    lo, hi = -6.0, 6.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erf(mid) < y else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("eps", [0.1, 0.25, 0.4])
def test_noise_interval_covers_the_true_rate_in_at_least_93_of_100_trials(eps):
    """N = 1000 pairs, 800 clean calibration pairs, detector accuracy 0.69 (AUROC ~0.75, as SmolLM2 on HellaSwag)."""
    covered, errors = 0, []
    for trial in range(100):
        scores, clean, flipped = synthetic(1000, 800, eps, 0.69, seed=trial)
        est = audit.estimate_noise(scores, clean)
        covered += est.low <= flipped.mean() <= est.high
        errors.append(est.raw - flipped.mean())
    assert covered >= 93
    assert abs(np.mean(errors)) < 0.02  # no bias beyond sampling noise


def test_estimate_of_a_clean_file_is_near_zero_and_clipped():
    scores, clean, _ = synthetic(1000, 800, 0.0, 0.75, seed=1)
    est = audit.estimate_noise(scores, clean)
    assert est.eps < 0.06 and est.low == 0.0  # the interval reaches 0


def test_a_weak_detector_and_a_tiny_sample_are_refused():
    scores, clean, _ = synthetic(1000, 800, 0.2, 0.52, seed=1)
    with pytest.raises(InputError, match="too weak a detector"):
        audit.audit_scores(scores, clean, "margin", 0.5, "f.json")
    scores, clean, _ = synthetic(30, 20, 0.2, 0.7, seed=1)
    with pytest.raises(InputError, match="wider than 0.5"):
        audit.audit_scores(scores, clean, "margin", 0.5, "f.json")


def test_wilson_intervals_hold_at_a_share_of_0_and_1():
    assert audit.wilson(1.0, 1) == pytest.approx((0.2065, 1.0), abs=1e-4)
    assert audit.wilson(0.0, 1) == pytest.approx((0.0, 0.7935), abs=1e-4)
    assert audit.wilson(1.0, 20)[0] == pytest.approx(0.8389, abs=1e-4)
    assert audit.wilson(0.75, 20) == pytest.approx((0.5313, 0.8881), abs=1e-4)  # MIN_CALIBRATION's reason


def test_the_interval_holds_the_true_rate_when_every_calibration_pair_scores_above_zero():
    """A strong detector (accuracy 0.97) and MIN_CALIBRATION clean pairs: in about half the trials every clean pair
    scores above 0 (a = 1), where a normal interval for a has width 0 and eps^'s interval held the true rate in
    about half of them; the Wilson-based one holds it about as often as it should."""
    m = audit.MIN_CALIBRATION
    covered, at_one, covered_at_one = 0, 0, 0
    for trial in range(200):
        scores, clean, flipped = synthetic(1000, m, 0.125, 0.97, seed=trial)
        est = audit.estimate_noise(scores, clean)
        inside = est.low <= flipped.mean() <= est.high
        covered += inside
        if est.accuracy == 1.0:
            at_one += 1
            covered_at_one += inside
            assert est.accuracy_ci95[0] < 0.9  # the interval of a does not collapse at 1
    assert at_one >= 50 and covered_at_one >= 0.9 * at_one
    assert covered >= 0.92 * 200


@pytest.mark.parametrize("m", [1, audit.MIN_CALIBRATION - 1])
def test_too_few_calibration_pairs_are_refused_however_well_they_score(m):
    """Issue 30: one clean pair scored above 0 gave "100.0% of 1 clean pairs" and an interval of width 0.2."""
    scores, _, _ = synthetic(1000, 0, 0.125, 0.97, seed=1)
    with pytest.raises(InputError, match=f"{m} clean pairs to calibrate the detector on: too few clean pairs"):
        audit.audit_scores(scores, [1.0] * m, "margin", 0.5, "f.json")
    audit.audit_scores(scores, [1.0] * audit.MIN_CALIBRATION, "margin", 0.5, "f.json")  # enough: an estimate


def test_audit_json_is_strict_json_when_every_clean_pair_scores_above_zero(tmp_path):
    """The logistic slope is infinite then, and on a clean file that nothing is flagged in, precision and recall
    have no value: each is written as null, so strict JSON parsers read audit.json and audit.jsonl."""
    scores, clean, flipped = synthetic(200, 40, 0.0, 0.999, seed=2)
    result = audit.audit_scores(scores, clean, "margin", 0.5, "f.json")
    assert result.slope == math.inf and not result.flagged.any()
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b", "flipped": bool(f)} for f in flipped]
    audit.write_outputs(tmp_path, result, pairs, {})

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    written = json.loads((tmp_path / "audit.json").read_text(), parse_constant=refuse)
    assert written["slope"] is None and written["truth"]["precision"] is None and written["truth"]["recall"] is None
    for line in (tmp_path / "audit.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)


def test_logistic_slope_of_normal_scores_is_two_mu_over_sigma_squared():
    rng = np.random.default_rng(0)
    for mu, sigma in ((0.5, 1.0), (1.0, 2.0)):
        w = audit.fit_slope(rng.normal(mu, sigma, 200_000))
        assert w == pytest.approx(2 * mu / sigma ** 2, rel=0.03)
    assert audit.fit_slope([0.1, 0.5, 2.0]) == math.inf  # separable: every clean score positive


def test_posterior_is_the_prior_at_zero_and_falls_with_the_score():
    post = audit.posteriors([-2.0, -1.0, 0.0, 1.0, 2.0], eps=0.3, w=1.5)
    assert post[2] == pytest.approx(0.3)
    assert all(a > b for a, b in zip(post, post[1:]))
    assert list(audit.posteriors([-5.0, 5.0], eps=0.0, w=1.0)) == [0.0, 0.0]


def test_posteriors_are_calibrated_on_synthetic_scores():
    """Among pairs given posterior ~p, a share ~p is truly flipped (the normal model is the logistic one)."""
    scores, clean, flipped = synthetic(40_000, 20_000, 0.3, 0.7, seed=3)
    result = audit.audit_scores(scores, clean, "margin", 0.5, "f.json")
    for lo, hi in ((0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9)):
        sel = (result.posterior > lo) & (result.posterior <= hi)
        assert lo - 0.03 < flipped[sel].mean() < hi + 0.03


def test_auroc_equals_the_pairwise_definition():
    rng = np.random.default_rng(5)
    scores, labels = rng.integers(0, 6, 60).astype(float), rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    want = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert stats.auroc(scores, labels) == pytest.approx(want)


def test_holm_and_sign_test():
    assert stats.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert stats.sign_test([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)
    assert stats.sign_test([1, -1, 0]) == 1.0


def test_relabel_swaps_and_filter_drops_the_flagged_pairs():
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b", "flipped": True},
             {"prompt": "p", "chosen": "c", "rejected": "d", "flipped": False}]
    fixed, post, info = audit.apply_fix(pairs, [True, False], "relabel", [0.9, 0.1])
    assert fixed[0] == {"prompt": "p", "chosen": "b", "rejected": "a", "flipped": False} and fixed[1] == pairs[1]
    assert post == pytest.approx([0.1, 0.1]) and info["relabelled"] == 1 and info["changed_truly_flipped"] == 1
    fixed, _, info = audit.apply_fix(pairs, [True, False], "filter", [0.9, 0.1])
    assert fixed == [pairs[1]] and info["dropped"] == 1 and info["truly_flipped_after"] == 0
    fixed, _, _ = audit.apply_fix(pairs, [False, False], "oracle-relabel", [0.5, 0.5])
    assert not any(p["flipped"] for p in fixed) and fixed[0]["chosen"] == "b"
    with pytest.raises(InputError, match="needs the true labels"):
        audit.apply_fix([{"prompt": "p", "chosen": "a", "rejected": "b"}], [False], "oracle-filter", [0.5])


# ------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, tiny_model_dir):
    """The tiny GPT-2 trained to prefer the right answer of mc-like pairs (a run folder: its final/ loads)."""
    tmp = tmp_path_factory.mktemp("judge")
    d, cfg = configs(tmp, tiny_model_dir, train_data_path=write(tmp / "t.json", mc_like_pairs(64, seed=11)),
                     val_data_path="", max_steps=0, epochs=4, per_device_train_batch_size=8,
                     gradient_accumulation_steps=1, learning_rate=3e-3, beta=0.5, output_dir=str(tmp / "judge"))
    train.train(d, cfg)
    return tmp / "judge"


def test_audit_command_on_a_noisy_file(tmp_path, judge_dir, capsys):
    noisy = write(tmp_path / "noisy.json", mc_like_pairs(120, seed=21, noise=0.3))
    clean = write(tmp_path / "clean.json", mc_like_pairs(120, seed=22))
    out = tmp_path / "audit"
    assert cli.main(["audit", noisy, "--model", str(judge_dir), "--val-file", clean, "--out-dir", str(out),
                     "--cache-dir", str(tmp_path / "cache"), "--truth-field", "flipped"]) == 0
    result = json.loads((out / "audit.json").read_text())
    assert result["truth"]["true_eps"] == pytest.approx(0.3)
    assert result["eps_ci95"][0] <= 0.3 <= result["eps_ci95"][1] and result["truth"]["auroc"] > 0.9
    rows = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert len(rows) == 120 and {"index", "score", "posterior", "flipped"} <= set(rows[0])
    assert (out / "scores.png").is_file() and (out / "roc.png").is_file()
    assert "noise rate" in capsys.readouterr().out
    # a second audit of the same file reads every log-prob from the cache
    cache = next((tmp_path / "cache" / "ref").glob("*.json"))
    before = cache.stat().st_mtime_ns
    assert cli.main(["audit", noisy, "--model", str(judge_dir), "--val-file", clean, "--out-dir", str(out),
                     "--cache-dir", str(tmp_path / "cache")]) == 0
    assert cache.stat().st_mtime_ns == before


def test_audit_of_a_plain_file_without_labels_or_clean_pairs(tmp_path, judge_dir, capsys):
    plain = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in mc_like_pairs(80, seed=5, noise=0.2)]
    path = write(tmp_path / "mine.json", plain)
    assert cli.main(["audit", path, "--model", str(judge_dir), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--val-file" in err and "Traceback" not in err
    clean = write(tmp_path / "clean.json", mc_like_pairs(80, seed=6))
    out = tmp_path / "a"
    assert cli.main(["audit", path, "--model", str(judge_dir), "--val-file", clean, "--out-dir", str(out),
                     "--cache-dir", str(tmp_path / "c")]) == 0
    result = json.loads((out / "audit.json").read_text())
    assert "truth" not in result and 0.05 < result["eps_hat"] < 0.35
    assert not (out / "roc.png").exists()


def test_audit_refuses_a_detector_that_cannot_tell(tmp_path, tiny_model_dir, capsys):
    """The untrained tiny model prefers good and bad answers about equally: no estimate, one error line."""
    noisy = write(tmp_path / "noisy.json", mc_like_pairs(60, seed=21, noise=0.3))
    clean = write(tmp_path / "clean.json", mc_like_pairs(200, seed=22))
    assert cli.main(["audit", noisy, "--model", str(tiny_model_dir), "--val-file", clean, "--out-dir",
                     str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "detector" in err and not (tmp_path / "out").exists()


def test_audit_truncates_as_dpo_train_does_with_the_same_cache_key(tmp_path, tiny_model_dir, monkeypatch):
    """dpo audit --truncation-mode cuts pairs as dpo train's flag does, and keys the reference cache with it (so the
    two share entries): the untrained tiny model then gives up, after scoring."""
    from dpo.engine import reference

    modes, real = [], reference.tokenize_pairs
    monkeypatch.setattr(reference, "tokenize_pairs", lambda *a: modes.append(a[4]) or real(*a))
    noisy = write(tmp_path / "noisy.json", mc_like_pairs(60, seed=21, noise=0.3))
    clean = write(tmp_path / "clean.json", mc_like_pairs(200, seed=22))
    cli.main(["audit", noisy, "--model", str(tiny_model_dir), "--val-file", clean, "--out-dir", str(tmp_path / "out"),
              "--cache-dir", str(tmp_path / "c"), "--max-length", "6", "--truncation-mode", "keep_start"])
    (cache,) = (tmp_path / "c" / "ref").glob("*.json")
    assert modes == ["keep_start"] * 2 and json.loads(cache.read_text())["key"]["truncation_mode"] == "keep_start"


def calibration_file(tmp_path, noisy: list, problem: str) -> str:
    """Clean pairs, with pair 30 marked flipped or the same pair as the audited file's pair 5 (flipped there)."""
    clean = mc_like_pairs(60, seed=22)
    if problem == "flipped":
        clean[30] = {**clean[30], "flipped": True}
    else:
        clean[30] = {**noisy[5], "chosen": noisy[5]["rejected"], "rejected": noisy[5]["chosen"], "flipped": False}
    return write(tmp_path / "clean.json", clean)


@pytest.mark.parametrize("problem, message", [("flipped", "pair 30 is marked flipped: true"),
                                              ("shared", "pair 30 is also pair 5 of the audited file")])
def test_calibration_pairs_marked_flipped_or_shared_with_the_audited_file_are_refused(tmp_path, tiny_model_dir,
                                                                                       capsys, problem, message):
    noisy = mc_like_pairs(60, seed=21, noise=0.3)
    clean = calibration_file(tmp_path, noisy, problem)
    assert cli.main(["audit", write(tmp_path / "noisy.json", noisy), "--model", str(tiny_model_dir), "--val-file",
                     clean, "--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err and clean in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_dpo_audit_refuses_fewer_calibration_pairs_than_the_minimum_before_scoring(tmp_path, tiny_model_dir, capsys):
    noisy = write(tmp_path / "noisy.json", mc_like_pairs(60, seed=21, noise=0.3))
    clean = write(tmp_path / "clean.json", mc_like_pairs(60, seed=22))
    assert cli.main(["audit", noisy, "--model", str(tiny_model_dir), "--val-file", clean, "--val-skip", "45",
                     "--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"{clean}: 15 clean pairs after --val-skip 45: too few clean pairs" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()  # refused before any forward pass


# ------------------------------------------------------------------------------------------- training with it

def fix_run(tmp_path, judge_dir, name, **kw):
    """A short run from the judge model on a noisy file, validated on the first 40 of 200 clean pairs (the audit
    calibrates on the other 160)."""
    noisy = write(tmp_path / "noisy.json", mc_like_pairs(96, seed=31, noise=0.3))
    clean = write(tmp_path / "clean.json", mc_like_pairs(200, seed=32))
    settings = dict(train_data_path=noisy, val_data_path=clean, val_size=40, max_steps=0, epochs=1,
                    output_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"))
    d, cfg = configs(tmp_path, judge_dir, **{**settings, **kw})
    return d, cfg


def test_relabel_and_filter_change_the_flagged_pairs_and_record_it(tmp_path, judge_dir, capsys):
    for mode in ("relabel", "filter", "oracle-relabel", "oracle-filter"):
        d, cfg = fix_run(tmp_path, judge_dir, mode, label_fix=mode)
        run = train.setup(d, cfg)
        run.lock.close()
        recorded = json.loads((tmp_path / mode / "config.json").read_text())["label_fix"]
        fix = recorded["fix"]
        verb = "dropped" if "filter" in mode else "relabelled"
        said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("label fix:")]
        assert said == [said[0]] and f"{mode} {verb} {fix[verb]} of 96 pairs" in said[0], said  # printed once
        assert f"marked flipped 29 -> {fix['truly_flipped_after']}" in said[0]
        assert ("the audit estimates eps" in said[0]) == (not mode.startswith("oracle")), said[0]
        assert fix["truly_flipped_before"] == 29
        assert fix["truly_flipped_after"] < 10, mode  # the judge finds most flips; the oracle all of them
        if mode.startswith("oracle"):
            assert fix["truly_flipped_after"] == 0 and fix["changed_truly_flipped"] == 29
        assert len(run.examples) == fix["pairs_after"] == (96 if "relabel" in mode else 96 - fix["dropped"])
        assert int(run.flipped.sum()) == fix["truly_flipped_after"]
        assert len(run.val_examples) == 40  # the validation pairs are never touched
        assert [ex.chosen for ex in run.val_examples] == [
            ex.chosen for ex in tokenize_pairs(run.tokenizer, mc_like_pairs(200, seed=32)[:40], 1024)]


def test_eps_auto_and_posterior_come_from_the_audit(tmp_path, judge_dir):
    d, cfg = fix_run(tmp_path, judge_dir, "auto", loss="rdpo", eps="auto", max_steps=1)
    train.train(d, cfg)
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert config["eps"] == pytest.approx(min(config["label_fix"]["eps_hat"], 0.45))
    (logged,) = [json.loads(line) for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["split"] == "audit"]
    assert logged["step"] == 0 and logged["eps_hat"] == config["label_fix"]["eps_hat"]
    assert config["label_fix"]["eps_ci95"][0] <= 0.3 <= config["label_fix"]["eps_ci95"][1]
    d, cfg = fix_run(tmp_path, judge_dir, "posterior", loss="cdpo", eps="posterior", max_steps=1)
    run = train.setup(d, cfg)
    run.lock.close()
    assert run.pair_eps is not None and len(run.pair_eps) == 96
    assert run.pair_eps[run.flipped.bool()].mean() > run.pair_eps[~run.flipped.bool()].mean() + 0.3


def test_label_fix_needs_calibration_pairs_and_refuses_oracle_without_truth(tmp_path, judge_dir, capsys):
    d, cfg = fix_run(tmp_path, judge_dir, "x", label_fix="relabel", val_size=0)
    with pytest.raises(InputError, match="calibrates on the validation pairs after"):
        train.train(d, cfg)
    plain = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in mc_like_pairs(16)]
    d, cfg = fix_run(tmp_path, judge_dir, "y", label_fix="oracle-filter")
    cfg.train_data_path = write(tmp_path / "plain.json", plain)
    with pytest.raises(InputError, match="needs the true labels"):
        train.train(d, cfg)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert cli.main(["train", "--loss", "sigmoid", "--eps", "auto"]) == 2
    assert "only the losses with a flip rate" in capsys.readouterr().err


@pytest.mark.parametrize("problem, message", [("flipped", "pair 50 is marked flipped: true"),
                                              ("shared", "pair 50 is also pair 5 of the audited file")])
def test_label_fix_refuses_calibration_pairs_marked_flipped_or_shared_with_the_training_file(
        tmp_path, tiny_model_dir, problem, message):
    d, cfg = fix_run(tmp_path, tiny_model_dir, "x", label_fix="relabel")
    noisy, clean = mc_like_pairs(96, seed=31, noise=0.3), mc_like_pairs(200, seed=32)
    if problem == "flipped":
        clean[50] = {**clean[50], "flipped": True}
    else:
        clean[50] = {**noisy[5], "flipped": False}
    cfg.val_data_path = write(tmp_path / "clean.json", clean)
    with pytest.raises(InputError, match=re.escape(message)):
        train.train(d, cfg)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------- the estimate from the file alone

def free_synthetic(n, eps, mu, seed):
    """A file of n pairs, exactly round(eps n) flipped, clean scores normal(mu, 1): log f(-s)/f(s) = -2 mu s, the
    family the calibration-free fit assumes."""
    scores, _, flipped = synthetic(n, 1, eps, 0.5 * (1 + math.erf(mu / math.sqrt(2))), seed)
    return scores, flipped


def test_calibration_free_interval_covers_the_true_rate_in_at_least_18_of_20_trials():
    from dpo.audit import mixture

    covered, errors = 0, []
    for trial in range(20):
        scores, flipped = free_synthetic(1000, 0.1, 1.0, seed=trial)
        est = mixture.fit(scores)
        assert not mixture.refusal(est)
        covered += est.low <= flipped.mean() <= est.high
        errors.append(abs(est.eps - flipped.mean()))
    assert covered >= 18 and np.mean(errors) < 0.04


def test_reviewed_pairs_with_the_scores_cover_the_true_rate_in_at_least_18_of_20_trials():
    from dpo.audit import mixture

    covered = 0
    for trial in range(20):
        scores, flipped = free_synthetic(1000, 0.3, 1.0, seed=trial)
        k = np.random.default_rng(100 + trial).choice(1000, 100, replace=False)
        rest = np.setdiff1d(np.arange(1000), k)
        est = mixture.fit(scores[rest], scores[k], flipped[k])
        covered += est.low <= flipped.mean() <= est.high
    assert covered >= 18


@pytest.mark.parametrize("n, mu, reason", [(150, 1.0, "too few pairs"), (1000, 0.0, "no usable tail")])
def test_the_calibration_free_fit_refuses_too_few_pairs_and_scores_without_a_tail(n, mu, reason):
    from dpo.audit import mixture

    scores, _ = free_synthetic(n, 0.2, mu, seed=3)
    assert reason in mixture.refusal(mixture.fit(scores))


def test_the_calibration_free_fit_refuses_a_file_it_cannot_tell_from_half_swapped():
    from dpo.audit import mixture

    """A usable tail, but an interval that reaches 0.5 (the reviewed arm of one audit-real-cpu file: [0.37, 0.50]) or is
    wider than 0.5: refused as not identified; just inside both limits, not."""
    def est(low, high):
        return mixture.FreeEstimate(eps=(low + high) / 2, low=low, high=high, slope=1.0, n=1000, n_reviewed=0,
                                    tail_lr=50.0)

    assert "the fit is not identified" in mixture.refusal(est(0.37, 0.5))
    assert "the fit is not identified" in mixture.refusal(est(-0.02, 0.49))  # 0.51 wide
    assert mixture.refusal(est(0.0, 0.49)) == ""


def test_review_verdicts_are_read_back_and_a_bad_row_is_refused_by_its_row(tmp_path):
    from dpo.audit import review

    pairs = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    rows = review.review_rows(pairs, review.draw(10, 4, seed=1))
    for row, verdict in zip(rows, ("yes", "No", "unsure", "")):
        row["verdict"] = verdict
    path = tmp_path / "review.csv"
    path.write_text(review.csv_text(rows))
    judged = review.verdicts(path, pairs)
    assert judged == {rows[0]["index"]: False, rows[1]["index"]: True}
    fixed = review.apply_verdicts(pairs, judged)
    assert fixed[rows[1]["index"]]["chosen"] == "b" and fixed[rows[1]["index"]]["reviewed"] == "no"
    rows[2]["verdict"] = "maybe"
    path.write_text(review.csv_text(rows))
    with pytest.raises(InputError, match=r"review.csv: row 4: verdict 'maybe'"):
        review.verdicts(path, pairs)


def test_label_fix_never_changes_a_reviewed_pair():
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b", "reviewed": "yes"},
             {"prompt": "q", "chosen": "a", "rejected": "b"}]
    fixed = audit.apply_fix(pairs, [True, True], "relabel", [0.9, 0.9])
    assert fixed.pairs[0]["chosen"] == "a" and fixed.pairs[1]["chosen"] == "b"


# ------------------------------------------------------------- a user's own file, noisy before dpo data saw it

def natively_noisy_rows(n, eps, seed):
    """A user's file: mc-like rows with round(eps n) of them swapped before any tool saw them, and no `flipped`."""
    return [{k: v for k, v in p.items() if k not in ("flipped", "item")} for p in mc_like_pairs(n, seed, eps)]


def swapped(pair) -> bool:
    """The hidden truth of an mc-like pair: after '... A' the right answer is ' yes', after '... B' ' no'."""
    return pair["chosen"] != (" yes" if pair["prompt"].endswith("A") else " no")


@pytest.fixture
def user_file(tmp_path, monkeypatch, capsys):
    """`dpo data --pairs user.jsonl --noise 0` on a file 30% swapped beforehand: (the file it made, its pairs)."""
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "user.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in natively_noisy_rows(330, 0.3, seed=5)))
    assert cli.main(["data", "--pairs", str(src), "--noise", "0", "--holdout", "30", "--out-dir", "d"]) == 0
    capsys.readouterr()
    path = next((tmp_path / "d").glob("user_n300_noise0_seed1.json"))
    return path, json.loads(path.read_text())


def test_a_natively_noisy_file_gets_an_estimate_from_its_own_scores_and_never_a_false_truth(user_file, judge_dir,
                                                                                             capsys):
    path, pairs = user_file
    true_eps = np.mean([swapped(p) for p in pairs])
    assert cli.main(["audit", str(path), "--model", str(judge_dir), "--out-dir", "a", "--cache-dir", "c"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(open("a/audit.json").read())
    assert result["method"] == "calibration-free" and result["val_file"] is None
    assert result["eps_ci95"][0] <= true_eps <= result["eps_ci95"][1]
    assert "held out of your file, as noisy as the file itself: not calibrating on them" in err
    assert "true flip rate" not in out and "nan" not in out  # `flipped` here is only what dpo data added (none)
    assert "flips added by dpo data: none, so nothing to score the flagged pairs against" in out


def test_review_round_trip_estimates_from_the_verdicts_and_swaps_what_a_person_marked(user_file, judge_dir, capsys):
    path, pairs = user_file
    flags = ["--model", str(judge_dir), "--cache-dir", "c"]
    assert cli.main(["audit", str(path), *flags, "--out-dir", "a", "--review", "60"]) == 0
    capsys.readouterr()
    with open("a/review.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60 and all(r["verdict"] == "" for r in rows)
    for r in rows:  # the person's verdicts: the hidden truth
        r["verdict"] = "no" if swapped(pairs[int(r["index"])]) else "yes"
    with open("a/review.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert cli.main(["audit", str(path), *flags, "--out-dir", "b", "--reviewed", "a/review.csv"]) == 0
    result = json.loads(open("b/audit.json").read())
    marked = sum(r["verdict"] == "no" for r in rows)
    assert result["reviewed"]["direct"]["swapped"] == marked and result["method"] == "reviewed"
    true_eps = np.mean([swapped(p) for p in pairs])
    assert result["eps_ci95"][0] <= true_eps <= result["eps_ci95"][1]
    fixed = json.loads(open("b/reviewed.json").read())
    assert all(not swapped(fixed[int(r["index"])]) for r in rows)  # every pair marked swapped is swapped back
    assert {p["reviewed"] for p in fixed if "reviewed" in p} == {"yes", "no"}


@pytest.mark.parametrize("extra, message", [
    (["--val-file", "missing.json"], "missing.json: no such file"),
    (["--reviewed", "missing.csv"], "missing.csv: no such review file"),
    (["--review", "301"], "--review 301: the file has only 300 pairs"),
    (["--held-out-is-clean", "--val-file", "x.json"], "x.json: no such file"),
])
def test_files_and_flags_are_checked_before_the_model_loads(user_file, capsys, extra, message):
    """The model named does not exist: an error about it would mean the model was loaded first."""
    path, _ = user_file
    assert cli.main(["audit", str(path), "--model", "no/such-model-here", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "no/such-model-here" not in err


def test_a_review_row_of_another_file_is_refused_by_its_row(user_file, tmp_path):
    from dpo.audit import review

    _, pairs = user_file
    rows = review.review_rows(pairs, [0, 1])
    rows[1]["chosen"] = "something else"
    (tmp_path / "r.csv").write_text(review.csv_text(rows))
    with pytest.raises(InputError, match=r"r.csv: row 3: its chosen is not that of pair 1"):
        review.verdicts(tmp_path / "r.csv", pairs)


def test_held_out_rows_calibrate_only_when_the_user_says_they_are_clean_and_few_of_them_warn(tmp_path, judge_dir,
                                                                                              monkeypatch, capsys):
    """A clean source, noise added by dpo data: its held-out rows are clean, and --held-out-is-clean says so."""
    monkeypatch.chdir(tmp_path)
    src = write(tmp_path / "user.json", natively_noisy_rows(330, 0.0, seed=6))
    assert cli.main(["data", "--pairs", src, "--noise", "0.3", "--holdout", "30", "--out-dir", "d"]) == 0
    path = "d/user_n300_noise0.3_seed1.json"
    assert cli.main(["audit", path, "--model", str(judge_dir), "--out-dir", "a", "--cache-dir", "c",
                     "--held-out-is-clean"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(open("a/audit.json").read())
    assert result["calibration"] == "held-out rows of your file, taken as clean (--held-out-is-clean)"
    assert result["calibration_pairs"] == 30 and result["method"] == "calibrated"
    assert "warning: calibrated on only 30 clean pairs" in err and "flips added by dpo data: 0.300" in out


def test_a_truth_field_the_user_names_is_scored_as_the_truth(tmp_path, judge_dir, capsys):
    rows = [{**r, "swapped": swapped(r)} for r in natively_noisy_rows(240, 0.25, seed=8)]
    path = write(tmp_path / "user.json", rows)
    assert cli.main(["audit", path, "--model", str(judge_dir), "--out-dir", str(tmp_path / "a"), "--cache-dir",
                     str(tmp_path / "c"), "--truth-field", "swapped"]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert result["truth"]["true_eps"] == pytest.approx(0.25) and "true flip rate: 0.250" in out
    assert cli.main(["audit", path, "--model", "no/such-model-here", "--truth-field", "truth"]) == 2
    assert "pair 0 has no field 'truth' (--truth-field)" in capsys.readouterr().err


def test_a_review_file_that_is_not_utf8_is_one_error_naming_it(user_file, tmp_path):
    from dpo.audit import review

    _, pairs = user_file
    (tmp_path / "r.csv").write_bytes(b"index,verdict\n0,\xff\n")
    with pytest.raises(InputError, match=r"r.csv"):
        review.verdicts(tmp_path / "r.csv", pairs)
