"""`dpo audit PAIRS`: how noisy is a preference file, and which of its pairs are flipped?

The reference model (the model DPO would start from) scores every pair: s = how much more it likes the labelled
chosen response than the rejected one (`SCORES`; by default the log-prob margin per character, see docs/audit.md). A
flipped pair is a clean pair with its responses swapped, so its score is the negative of a clean pair's: if f is
the density of clean scores, a file with flip rate eps has scores from (1 - eps) f(s) + eps f(-s). Clean pairs (the
validation pairs `dpo data` writes, or any `--val-file` from the same distribution) show f itself, which calibrates
everything:

    a     the detector's accuracy on clean pairs, P(s > 0)
    q     the share of the file's pairs with s < 0: q = (1 - eps)(1 - a) + eps a (a flipped pair falls below 0
          with probability a), so
    eps^  = (q - (1 - a)) / (2a - 1), with a 95% interval from the sampling error of both q and a: each has its
          Wilson score interval (`wilson`, which unlike the normal one holds at a share of 0 or 1), each is mapped
          through eps^ with the other held at its estimate, and the two distances on either side are added in
          quadrature (Newcombe's and Zou & Donner's MOVER; with many pairs the delta method's interval)
    w     log f(-s) / f(s) = -w s: a one-parameter logistic fit on the clean scores (odd by symmetry, so no
          intercept), and the flip posterior of a pair is P(flipped | s) = sigmoid(logit(eps^) - w s)

No assumption about the shape of f enters eps^ (only that flipping negates a score); the posterior adds the
logistic shape. The audit refuses with one error instead of printing a number that means nothing (`check_estimate`):
fewer than MIN_CALIBRATION clean pairs, a detector too weak (a <= MIN_ACCURACY) or not told apart from chance (the
Wilson interval of a reaching 0.5), or an interval wider than the [0, 0.5] range. So does a calibration pair marked
flipped, or one that is also a pair of the audited file (`check_calibration`).

The scores come from the training engine and the reference cache (`dpo/engine/refcache.py`, same key as `dpo train`), so
auditing a file the cache covers costs only the cache's spot checks, and a later `dpo train` on it pays nothing
more for its reference pass.
`dpo train --label-fix ... / --eps auto|posterior` runs `audit_pairs` on its training file (`dpo/train/train.py`).
"""

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dpo.core import stats
from dpo.core.files import InputError, atomic_write_json, atomic_write_text, json_text, pyplot, sha256_file, write_png
from dpo.core.pairscores import MIN_CALIBRATION, SCORES

MIN_ACCURACY = 0.55  # below this the detector is too weak to estimate a noise rate
MAX_WIDTH = 0.5  # an interval wider than the [0, 0.5] range says nothing
Z95 = 1.959964
# What a pair's `flipped` is: the truth (HellaSwag pairs made here; --truth-field), or only the flips `dpo data`
# added to a user's file that may be noisy already
TRUE_FLIPS, ADDED_FLIPS = "true flips", "flips added by dpo data"


def pair_scores(kind: str, chosen, rejected, pairs) -> np.ndarray:
    return np.array([SCORES[kind](float(c), float(r), p) for c, r, p in zip(chosen, rejected, pairs)])


# ------------------------------------------------------------------------------------------------ the estimator

def share_below_zero(scores) -> float:
    """Share of scores below 0, an exact 0 counting half."""
    s = np.asarray(scores, dtype=np.float64)
    return float(((s < 0).sum() + 0.5 * (s == 0).sum()) / len(s))


def wilson(p: float, n: int, z: float = Z95) -> tuple:
    """The Wilson score interval (95% by default) of a share p of n trials. Unlike p +- z sqrt(p (1 - p) / n), it
    does not shrink to a point at p = 0 or 1 (1 of 1 gives [0.21, 1], 20 of 20 [0.84, 1]), and it stays inside
    [0, 1]."""
    if n == 0:
        return 0.0, 1.0
    centre, spread = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n)), min(1.0, (centre + spread) / (1 + z * z / n))


def noise_rate(q: float, a: float) -> float:
    """eps = (q - (1 - a)) / (2a - 1); at a <= 0.5 its limit as a falls to 0.5 (-inf for q < 0.5, +inf above)."""
    if a > 0.5:
        return (q - (1 - a)) / (2 * a - 1)
    return 0.5 if q == 0.5 else math.copysign(math.inf, q - 0.5)


def mover(raw: float, *ranges) -> tuple:
    """(low, high) around raw from each source's own range of raw (MOVER: the distances on each side in
    quadrature), unclipped."""
    below = math.sqrt(sum((raw - min(r)) ** 2 for r in ranges))
    above = math.sqrt(sum((max(r) - raw) ** 2 for r in ranges))
    return raw - below, raw + above


@dataclass
class NoiseEstimate:
    eps: float  # the point estimate, clipped to [0, 1]
    low: float  # 95% interval, clipped to [0, 1]
    high: float
    raw: float  # before clipping (can be below 0 on a clean file)
    q: float  # share of the file's pairs scored below 0
    accuracy: float  # a: share of clean pairs scored above 0
    n: int
    n_clean: int
    q_ci95: tuple = (0.0, 1.0)  # Wilson intervals of q and a
    accuracy_ci95: tuple = (0.0, 1.0)


def estimate_noise(scores, clean_scores) -> NoiseEstimate:
    """eps^ and its 95% interval from the file's scores and the clean calibration scores (see the module doc)."""
    n, m = len(scores), len(clean_scores)
    q, a = share_below_zero(scores), 1 - share_below_zero(clean_scores)
    q_ci, a_ci = wilson(q, n), wilson(a, m)
    if a <= 0.5:
        return NoiseEstimate(float("nan"), 0.0, 1.0, float("nan"), q, a, n, m, q_ci, a_ci)
    raw = noise_rate(q, a)
    low, high = mover(raw, [noise_rate(x, a) for x in q_ci], [noise_rate(q, x) for x in a_ci])
    clip = lambda x: min(1.0, max(0.0, x))  # noqa: E731
    return NoiseEstimate(clip(raw), clip(low), clip(high), raw, q, a, n, m, q_ci, a_ci)


def check_estimate(est: NoiseEstimate, where: str) -> None:
    """Refuse (InputError) an estimate that would mean nothing: too few clean pairs, a detector too weak or not
    told apart from chance, an interval too wide."""
    if est.n_clean < MIN_CALIBRATION:
        raise InputError(f"{where}: {est.n_clean} clean pairs to calibrate the detector on: too few clean pairs "
                         f"(needs at least {MIN_CALIBRATION})")
    if not est.accuracy > MIN_ACCURACY:
        raise InputError(f"{where}: the reference model prefers the chosen response of only {100 * est.accuracy:.1f}% "
                         f"of the {est.n_clean} clean pairs (needs > {100 * MIN_ACCURACY:.0f}%): too weak a detector "
                         "to estimate the noise rate (try --score, another --model, or more clean pairs)")
    if not est.accuracy_ci95[0] > 0.5:
        raise InputError(f"{where}: the reference model prefers the chosen response of {100 * est.accuracy:.1f}% of "
                         f"the {est.n_clean} clean pairs (95% interval {100 * est.accuracy_ci95[0]:.1f}-"
                         f"{100 * est.accuracy_ci95[1]:.1f}%): too few clean pairs to tell the detector from chance")
    if est.high - est.low > MAX_WIDTH:
        raise InputError(f"{where}: the noise-rate interval [{est.low:.2f}, {est.high:.2f}] is wider than "
                         f"{MAX_WIDTH}: too few pairs ({est.n}) or clean pairs ({est.n_clean}) to estimate it")


def same_pair(pair) -> tuple:
    """What makes two pairs the same pair, whichever response is labelled chosen (a flipped copy is the same)."""
    return (pair["prompt"], *sorted((pair["chosen"], pair["rejected"])))


def check_calibration(pairs: list, clean: list, pairs_file, val_file, skip: int) -> None:
    """Refuse (InputError) calibration pairs (clean = the pairs of val_file from index skip on) that cannot
    calibrate: a pair marked flipped (a wrong label in the clean sample biases a, and eps^ with it), or one that is
    also a pair of the audited file (scored twice, it ties the two samples the interval takes as independent)."""
    for j, pair in enumerate(clean):
        if pair.get("flipped"):
            raise InputError(f"{val_file}: pair {skip + j} is marked flipped: true, but the pairs that calibrate the "
                             "audit must be clean (expected flipped false, or no flipped field)")
    audited = {}
    for i, p in enumerate(pairs):
        audited.setdefault(same_pair(p), i)  # the first, where the file repeats a pair
    shared = [(skip + j, audited[same_pair(p)]) for j, p in enumerate(clean) if same_pair(p) in audited]
    if shared:
        (j, i), count = shared[0], len(shared)
        raise InputError(f"{val_file}: pair {j} is also pair {i} of the audited file {pairs_file} ({count} pairs "
                         "are in both): expected clean pairs other than the audited ones")


def fit_slope(clean_scores, iterations: int = 100) -> float:
    """w of log f(-s)/f(s) = -w s, by maximum likelihood on the clean scores and their mirror images: maximize
    sum log sigmoid(w s_i) (concave in w; Newton's method). Infinite when every clean score is positive."""
    s = np.asarray(clean_scores, dtype=np.float64)
    if (s > 0).all():
        return math.inf
    w = 0.0
    for _ in range(iterations):
        p = 1 / (1 + np.exp(np.clip(w * s, -500, 500)))  # sigmoid(-w s)
        grad, hess = (s * p).sum(), -(s * s * p * (1 - p)).sum()
        step = grad / hess if hess < 0 else 0.0
        w -= step
        if abs(step) < 1e-10 * max(1.0, abs(w)):
            break
    return max(w, 0.0)


def posteriors(scores, eps: float, w: float) -> np.ndarray:
    """P(flipped | s) = sigmoid(logit(eps) - w s) for each score (0 everywhere for eps = 0, 1 for eps = 1)."""
    s = np.asarray(scores, dtype=np.float64)
    if eps <= 0 or eps >= 1:
        return np.full(len(s), float(eps >= 1))
    with np.errstate(over="ignore", invalid="ignore"):
        logit = math.log(eps / (1 - eps)) - w * s
    return 1 / (1 + np.exp(-np.clip(np.nan_to_num(logit, nan=0.0), -500, 500)))


# --------------------------------------------------------------------------------------------- one audit, pure

@dataclass
class Audit:
    score: str
    estimate: NoiseEstimate
    slope: float
    threshold: float
    scores: np.ndarray  # per pair of the file
    posterior: np.ndarray
    clean_scores: np.ndarray

    @property
    def flagged(self) -> np.ndarray:
        return self.posterior > self.threshold


def audit_scores(scores, clean_scores, score: str, threshold: float, where: str) -> Audit:
    est = estimate_noise(scores, clean_scores)
    check_estimate(est, where)
    w = fit_slope(clean_scores)
    return Audit(score, est, w, threshold, np.asarray(scores), posteriors(scores, est.eps, w),
                 np.asarray(clean_scores))


def against_truth(audit: Audit, flipped) -> dict:
    """How the audit did, where the file records which pairs are flipped."""
    truth = np.asarray(flipped, dtype=bool)
    flagged = audit.flagged
    true_eps = float(truth.mean())
    hits = int((flagged & truth).sum())
    return {"true_eps": true_eps, "eps_error": abs(audit.estimate.eps - true_eps),
            "covered": audit.estimate.low <= true_eps <= audit.estimate.high,
            "auroc": stats.auroc(-audit.scores, truth),
            "flagged": int(flagged.sum()), "flagged_truly_flipped": hits,
            "precision": hits / int(flagged.sum()) if flagged.any() else float("nan"),
            "recall": hits / int(truth.sum()) if truth.any() else float("nan")}


def summary(audit: Audit, pairs: list, truth_is: str = TRUE_FLIPS) -> dict:
    """The numbers of an audit; against the pairs' `flipped` where every pair has one, named by what it is
    (truth_is: the truth, or only the flips dpo data added)."""
    out = {"score": audit.score, "n": len(pairs), "eps_hat": audit.estimate.eps,
           "eps_ci95": [audit.estimate.low, audit.estimate.high], "estimate": asdict(audit.estimate),
           "detector_accuracy": getattr(audit.estimate, "accuracy", None), "slope": audit.slope,
           "threshold": audit.threshold, "flagged": int(audit.flagged.sum())}
    if pairs and all("flipped" in p for p in pairs):
        key = "truth" if truth_is == TRUE_FLIPS else "added_flips"
        out[key] = against_truth(audit, [p["flipped"] for p in pairs])
    return out


def per_pair_lines(audit: Audit, pairs: list) -> str:
    rows = []
    for i, (pair, s, post) in enumerate(zip(pairs, audit.scores, audit.posterior)):
        row = {"index": i, "item": pair.get("item"), "score": float(s), "posterior": float(post),
               "flagged": bool(post > audit.threshold)}
        if "flipped" in pair:
            row["flipped"] = pair["flipped"]
        rows.append(json_text(row, ensure_ascii=True))
    return "\n".join(rows) + "\n"


def percent_interval(share: float, ci) -> str:
    return f"{100 * share:.1f}% (95% interval {100 * ci[0]:.1f}-{100 * ci[1]:.1f}%)"


# ------------------------------------------------------------------------------------------------------ plots

def plot(audit: Audit, pairs: list, out_dir: Path, truth_is: str = TRUE_FLIPS) -> list:
    """scores.png (histograms, split by the `flipped` of pairs where known: the truth, or the flips dpo data added,
    as truth_is says) and roc.png (where known). [] without matplotlib."""
    plt = pyplot()
    if plt is None:
        return []
    known = all("flipped" in p for p in pairs)
    truth = np.array([bool(p.get("flipped")) for p in pairs])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bins = np.histogram_bin_edges(np.concatenate([audit.scores, audit.clean_scores]), bins=50)
    if known:
        words = ("clean pairs", "flipped pairs") if truth_is == TRUE_FLIPS else \
            ("pairs not flipped by dpo data", "pairs flipped by dpo data")
        ax.hist(audit.scores[~truth], bins=bins, alpha=0.6, label=f"{words[0]} of the file ({(~truth).sum()})")
        ax.hist(audit.scores[truth], bins=bins, alpha=0.6, label=f"{words[1]} of the file ({truth.sum()})")
    else:
        ax.hist(audit.scores, bins=bins, alpha=0.6, label=f"pairs of the file ({len(pairs)})")
    if len(audit.clean_scores):
        ax.hist(audit.clean_scores, bins=bins, histtype="step", color="black", density=False,
                weights=np.full(len(audit.clean_scores), len(pairs) / len(audit.clean_scores)),
                label=f"clean calibration pairs ({len(audit.clean_scores)}, scaled to the file's count)")
    ax.axvline(0, color="gray", linestyle=":")
    ax.set_xlabel(f"reference score ({audit.score}): chosen minus rejected")
    ax.set_ylabel("pairs")
    ax.set_title(f"eps^ = {audit.estimate.eps:.3f} [{audit.estimate.low:.3f}, {audit.estimate.high:.3f}]",
                 fontsize=9)
    ax.legend(fontsize=7)
    written = [write_png(plt, fig, out_dir / "scores.png", dpi=110, trim=False)]
    if known and truth.any() and (~truth).any():
        written.append(plot_roc(plt, audit, truth, out_dir))
    return written


def plot_roc(plt, audit: Audit, truth, out_dir: Path) -> str:
    order = np.argsort(audit.scores)  # most suspicious (lowest score) first
    tp = np.concatenate([[0], np.cumsum(truth[order])]) / truth.sum()
    fp = np.concatenate([[0], np.cumsum(~truth[order])]) / (~truth).sum()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fp, tp, label=f"AUROC {stats.auroc(-audit.scores, truth):.3f}")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="chance")
    flagged = audit.flagged
    ax.plot([(flagged & ~truth).sum() / (~truth).sum()], [(flagged & truth).sum() / truth.sum()], "o",
            label=f"posterior > {audit.threshold:g}")
    ax.set_xlabel("false positive rate (clean pairs flagged)")
    ax.set_ylabel("true positive rate (flipped pairs flagged)")
    ax.legend(fontsize=8, loc="lower right")
    return write_png(plt, fig, out_dir / "roc.png", dpi=110, trim=False)


# ------------------------------------------------------------------------------------------------ the command

def write_outputs(out_dir: Path, audit: Audit, pairs: list, info: dict, truth=None,
                  truth_is: str = TRUE_FLIPS) -> dict:
    """audit.jsonl and the plots, then audit.json last (a folder with audit.json is complete). truth: per pair
    flipped, when known (else the pairs' own `flipped`, where every pair has one), and what it is (truth_is)."""
    if truth is None and pairs and all("flipped" in p for p in pairs):
        truth = [p["flipped"] for p in pairs]
    marked = [{**p, "flipped": bool(f)} for p, f in zip(pairs, truth)] if truth is not None else \
        [{k: v for k, v in p.items() if k != "flipped"} for p in pairs]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "audit.jsonl", per_pair_lines(audit, marked))
    plots = plot(audit, marked, out_dir, truth_is)
    result = {**info, **summary(audit, marked, truth_is), "plots": plots}
    atomic_write_json(out_dir / "audit.json", result, indent=1)
    return result


WARN_CALIBRATION = 100  # fewer calibration pairs than this: the audit warns (a's interval alone is +-0.09 at 100)


class Inputs(NamedTuple):
    """What `dpo audit` reads and checks before the model loads."""
    pairs: list
    clean: list  # calibration pairs ([] for none)
    val_file: Path  # or None
    calibration: str  # what the calibration pairs are, in words
    truth: list  # per pair, or None
    truth_is: str  # TRUE_FLIPS or ADDED_FLIPS
    judged: dict  # --reviewed: index -> flipped


def provenance(pairs_file) -> str:
    """'hellaswag' (a file `dpo data` made from HellaSwag: its `flipped` is the truth), 'pairs' (made from your own
    --pairs: its `flipped` is only what dpo data added, on top of the source's own noise), or '' (unknown)."""
    from dpo.data.prepare import read_manifest

    entry = read_manifest(Path(pairs_file).parent).get(Path(pairs_file).name)
    if not isinstance(entry, dict):
        return ""
    return "pairs" if "pairs" in (entry.get("sources") or {}) else "hellaswag"


def calibration_source(cfg, origin: str) -> tuple:
    """(the calibration file or None, what its pairs are): --val-file; a HellaSwag file's clean validation pairs;
    a --pairs file's held-out rows only with --held-out-is-clean (they are as noisy as the source)."""
    if cfg.val_file:
        return Path(cfg.val_file), "clean pairs of --val-file"
    if cfg.held_out_is_clean and origin != "pairs":
        raise InputError(f"{cfg.pairs}: --held-out-is-clean: expected a file `dpo data --pairs` made (its manifest "
                         "names the held-out rows), and the manifest next to it names none")
    if origin not in ("hellaswag", "pairs"):
        return None, ""
    from dpo.data.prepare import validation_file_for

    found = validation_file_for(Path(cfg.pairs))
    if origin == "hellaswag":
        return found, "clean HellaSwag validation pairs dpo data wrote"
    if cfg.held_out_is_clean:
        if found is None:
            raise InputError(f"{cfg.pairs}: --held-out-is-clean, but the held-out rows `dpo data` wrote with it are "
                             "gone (expected the <stem>_heldout_n<N>.json its manifest names)")
        return found, "held-out rows of your file, taken as clean (--held-out-is-clean)"
    if found is not None:
        print(f"note: {found} holds rows held out of your file, as noisy as the file itself: not calibrating on "
              "them (--held-out-is-clean if your source is clean; --val-file for clean pairs)", file=sys.stderr)
    return None, ""


def truth_of(cfg, pairs: list, origin: str) -> tuple:
    """(per pair flipped or None, what that is): --truth-field NAME; else a HellaSwag file's `flipped` (the truth);
    else a --pairs file's `flipped` (only the flips dpo data added). Any other `flipped` is not taken as truth."""
    from dpo.data.pairs import read_flipped

    if cfg.truth_field:
        for i, p in enumerate(pairs):
            if cfg.truth_field not in p:
                raise InputError(f"{cfg.pairs}: pair {i} has no field {cfg.truth_field!r} (--truth-field): expected "
                                 "true or false on every pair")
        return [read_flipped(p[cfg.truth_field], f"{cfg.pairs}: pair {i}") for i, p in enumerate(pairs)], TRUE_FLIPS
    if origin and all("flipped" in p for p in pairs):
        return [p["flipped"] for p in pairs], (TRUE_FLIPS if origin == "hellaswag" else ADDED_FLIPS)
    return None, ""


def read_inputs(cfg) -> Inputs:
    """Every file and flag checked before the model loads (loading takes seconds to minutes)."""
    from dpo.audit import review
    from dpo.data.pairs import read_pairs
    from dpo.data.sources import ChatTemplate

    if not Path(cfg.pairs).exists():
        raise InputError(f"{cfg.pairs}: no such file (expected the preference file to audit)")
    chat = ChatTemplate(cfg.model)
    pairs = read_pairs(cfg.pairs, chat)
    origin = provenance(cfg.pairs)
    val_file, calibration = calibration_source(cfg, origin)
    clean = []
    if val_file is not None:
        if not Path(val_file).exists():
            raise InputError(f"{val_file}: no such file (expected clean calibration pairs, --val-file)")
        clean = read_pairs(val_file, chat)[cfg.val_skip:]
        if len(clean) < MIN_CALIBRATION:
            raise InputError(f"{val_file}: {len(clean)} clean pairs after --val-skip {cfg.val_skip}: too few clean "
                             f"pairs to calibrate the detector on (needs at least {MIN_CALIBRATION})")
        check_calibration(pairs, clean, cfg.pairs, val_file, cfg.val_skip)
    truth, truth_is = truth_of(cfg, pairs, origin)
    judged = review.verdicts(cfg.reviewed, pairs) if cfg.reviewed else {}
    if cfg.reviewed and not judged:
        raise InputError(f"{cfg.reviewed}: no pair judged yes or no: expected verdicts in the verdict column")
    if cfg.review:
        review.draw(len(pairs), cfg.review, cfg.review_seed)
    return Inputs(pairs, clean, val_file, calibration, truth, truth_is, judged)


def free_summary(scores, est, clean_scores) -> dict:
    """The calibration-free estimate, its checks, and its refusal ('' when none)."""
    from dpo.audit import mixture

    out = {**asdict(est), "refused": mixture.refusal(est), "tail": mixture.tail_check(scores, est),
           "predicted_accuracy": mixture.predicted_accuracy(scores, est)}
    if len(clean_scores):
        out["clean_accuracy"] = 1 - share_below_zero(clean_scores)
    return out


def reviewed_fit(judged: dict, scores) -> tuple:
    """(the direct estimate from the verdicts, the mixture fit of the other pairs' scores with the verdicts)."""
    from dpo.audit import mixture

    idx = np.array(sorted(judged))
    flips = np.array([judged[i] for i in idx], dtype=bool)
    share = float(flips.mean())
    direct = {"method": "share of 'no' verdicts among the reviewed pairs (Wilson interval)", "reviewed": len(idx),
              "swapped": int(flips.sum()), "eps_hat": share, "eps_ci95": list(wilson(share, len(idx)))}
    est = mixture.fit(scores[np.setdiff1d(np.arange(len(scores)), idx)], scores[idx], flips)
    est.method = "mixture fit on |s| with the reviewed pairs' verdicts (profile likelihood)"
    return direct, est


def estimates(cfg, inp: Inputs, scores, clean_scores) -> tuple:
    """(the Audit whose eps and posteriors are used, every estimate that ran, side by side). Used, in order of
    trust: the reviewed pairs' fit, the calibrated one (clean pairs a person trusts), the calibration-free one;
    refused, naming the data problem, where none can run."""
    from dpo.audit import mixture

    free = mixture.fit(scores)
    sections = {"calibration_free": free_summary(scores, free, clean_scores)}
    used, method = None, ""
    if inp.clean:
        used, method = audit_scores(scores, clean_scores, cfg.score, cfg.fix_threshold, str(inp.val_file)), \
            "calibrated"
        sections["calibrated"] = {"method": f"calibrated on {len(inp.clean)} {inp.calibration}",
                                  **asdict(used.estimate)}
    if inp.judged:
        direct, fit = reviewed_fit(inp.judged, scores)
        sections["reviewed"] = {"direct": direct, "combined": {**asdict(fit), "refused": mixture.refusal(fit)}}
        if not mixture.refusal(fit):
            used, method = from_fit(cfg, fit, scores, clean_scores), "reviewed"
    if used is None:
        why = mixture.refusal(free)
        if why:
            direct = sections.get("reviewed", {}).get("direct")
            raise InputError(f"{cfg.pairs}: no estimate from the file alone: {why}" + (
                f" (the {direct['reviewed']} reviewed pairs alone give eps^ {direct['eps_hat']:.3f}, 95% interval "
                f"{direct['eps_ci95'][0]:.3f} - {direct['eps_ci95'][1]:.3f})" if direct else ""))
        used, method = from_fit(cfg, free, scores, clean_scores), "calibration-free"
    if inp.judged:  # a person's verdict is the posterior of the pair they judged
        used.posterior[sorted(inp.judged)] = [float(inp.judged[i]) for i in sorted(inp.judged)]
    return used, {"method": method, **sections}


def from_fit(cfg, fit, scores, clean_scores) -> Audit:
    return Audit(cfg.score, fit, fit.slope, cfg.fix_threshold, scores, posteriors(scores, fit.eps, fit.slope),
                 clean_scores)


def run(cfg) -> dict:
    """`dpo audit`: check the inputs, score the file (and any clean pairs) with the reference model through the
    cache, estimate (calibrated, calibration-free, from reviews), write, print."""
    from dpo.engine.reference import Scorer

    cfg.validate()
    inp = read_inputs(cfg)
    scorer = Scorer.load(cfg.model, cfg.max_length, cfg.precision, cfg.device, cfg.cache_dir, cfg.threads,
                         cfg.append_eos, cfg.truncation_mode)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path("runs") / "audit" / f"{Path(cfg.pairs).stem}-{scorer.slug}"
    pairs = inp.pairs
    scores = pair_scores(cfg.score, *scorer.logprobs(pairs, "reference log-probs (file)"), pairs)
    clean_scores = np.array([])
    if inp.clean:
        clean_scores = pair_scores(cfg.score, *scorer.logprobs(inp.clean, "reference log-probs (clean)"), inp.clean)
    used, sections = estimates(cfg, inp, scores, clean_scores)
    info = {"pairs_file": cfg.pairs, "pairs_sha256": sha256_file(cfg.pairs), "calibration": inp.calibration or None,
            "val_file": str(inp.val_file) if inp.val_file else None,
            "val_sha256": sha256_file(inp.val_file) if inp.val_file else None, "val_skip": cfg.val_skip,
            "calibration_pairs": len(inp.clean), "model": cfg.model, "precision": scorer.precision,
            "max_length": cfg.max_length, **({"append_eos": True} if cfg.append_eos else {}),
            **({"truncation_mode": cfg.truncation_mode} if cfg.truncation_mode != "keep_end" else {}), **sections,
            "extra": write_review_files(cfg, out_dir, inp)}
    result = write_outputs(out_dir, used, pairs, info, inp.truth, inp.truth_is)
    print(table(result))
    if inp.clean and len(inp.clean) < WARN_CALIBRATION:
        print(f"warning: calibrated on only {len(inp.clean)} clean pairs (fewer than {WARN_CALIBRATION}): the "
              "detector's accuracy, and eps^ with it, rest on few pairs", file=sys.stderr)
    print(f"wrote {out_dir}/audit.json, audit.jsonl" + "".join(f", {p}" for p in result["plots"] + result["extra"]),
          file=sys.stderr)
    return result


def write_review_files(cfg, out_dir: Path, inp: Inputs) -> list:
    """review.csv/.jsonl (--review K: pairs for a person to judge), reviewed.json (--reviewed: the file with the
    verdicts applied); the paths written."""
    from dpo.audit import review

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if cfg.review:
        rows = review.review_rows(inp.pairs, review.draw(len(inp.pairs), cfg.review, cfg.review_seed))
        atomic_write_text(out_dir / "review.csv", review.csv_text(rows))
        atomic_write_text(out_dir / "review.jsonl", "".join(json_text(r, ensure_ascii=False) + "\n" for r in rows))
        written += [str(out_dir / "review.csv"), str(out_dir / "review.jsonl")]
        print(f"review: {review.INSTRUCTIONS}", file=sys.stderr)
    if inp.judged:
        atomic_write_json(out_dir / "reviewed.json", review.apply_verdicts(inp.pairs, inp.judged), indent=1)
        written.append(str(out_dir / "reviewed.json"))
    return written


def _f3(x) -> str:
    return "none" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _interval(e: dict) -> str:
    return f"eps^ {e['eps']:.3f}  (95% interval {e['low']:.3f} - {e['high']:.3f}); {e['method']}"


def table(out: dict) -> str:
    """The terminal table: each estimate that ran, side by side, and how the used one did against what the file
    records (the truth, or only the flips dpo data added)."""
    lines = [f"pairs                 {out['n']}", f"score                 {out['score']}"]
    cal = out.get("calibrated")
    if cal:
        lines += [f"calibrated            {_interval(cal)}",
                  f"  detector accuracy   {percent_interval(cal['accuracy'], cal['accuracy_ci95'])} of "
                  f"{cal['n_clean']} calibration pairs scored > 0",
                  f"  scored below 0      {percent_interval(cal['q'], cal['q_ci95'])} of the pairs"]
    free = out.get("calibration_free")
    if free:
        lines.append("calibration-free      " + (f"refused: {free['refused']}" if free["refused"] else _interval(free)))
        tail = free["tail"]
        lines.append(f"  tail check          {100 * tail['below_zero']:.1f}% of the {tail['pairs']} surest pairs "
                     f"score below 0 (the fit expects {100 * tail['expected_below_zero']:.1f}%; more means eps^ is "
                     "too high)")
        if "clean_accuracy" in free:
            lines.append(f"  family check        the fit implies detector accuracy "
                         f"{100 * free['predicted_accuracy']:.1f}%; the calibration pairs measure "
                         f"{100 * free['clean_accuracy']:.1f}%")
    rev = out.get("reviewed")
    if rev:
        d, c = rev["direct"], rev["combined"]
        lines.append(f"reviewed              eps^ {d['eps_hat']:.3f}  (95% interval {d['eps_ci95'][0]:.3f} - "
                     f"{d['eps_ci95'][1]:.3f}); {d['swapped']} of {d['reviewed']} reviewed pairs judged swapped")
        lines.append("reviewed + scores     " + (f"refused: {c['refused']}" if c["refused"] else _interval(c)))
    if out.get("method"):
        lines.append(f"used for posteriors   {out['method']}: eps^ {out['eps_hat']:.3f}")
    else:
        lines.append(f"noise rate eps^       {out['eps_hat']:.3f}  (95% interval {out['eps_ci95'][0]:.3f} - "
                     f"{out['eps_ci95'][1]:.3f})")
    lines.append(f"flagged (posterior > {out['threshold']:g})  {out['flagged']} pairs")
    for key, name in (("truth", "true flip rate"), ("added_flips", "flips added by dpo data")):
        t = out.get(key)
        if t and not t["true_eps"]:
            lines.append(f"{name}: none, so nothing to score the flagged pairs against")
        elif t:
            lines += [f"{name}: {t['true_eps']:.3f}  (|eps^ - it| {t['eps_error']:.3f}, "
                      f"{'inside' if t['covered'] else 'OUTSIDE'} the interval)",
                      f"  AUROC against them  {_f3(t['auroc'])}",
                      f"  precision / recall  {_f3(t['precision']) if t['flagged'] else 'none flagged'} / "
                      f"{_f3(t['recall'])} ({t['flagged_truly_flipped']} of {t['flagged']} flagged pairs are among "
                      "them)"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- correcting the labels

class Fixed(NamedTuple):
    """The pairs after a label fix, their flip posteriors, and what was done (what config.json records)."""
    pairs: list
    posterior: list
    info: dict


def apply_fix(pairs: list, flagged, mode: str, posterior) -> Fixed:
    """The pairs, their flip posteriors and what was done after --label-fix `mode`: relabel swaps chosen and rejected of
    the flagged pairs, filter drops them; the oracle modes do the same to the truly flipped pairs (the `flipped`
    field). A swapped pair's `flipped` (its label is wrong) and posterior turn over."""
    oracle = mode.startswith("oracle-")
    if oracle and not all("flipped" in p for p in pairs):
        raise InputError(f"--label-fix {mode} needs the true labels: every pair needs a `flipped` field")
    chosen = [bool(p["flipped"]) for p in pairs] if oracle else [bool(f) for f in flagged]
    chosen = [pick and "reviewed" not in p for p, pick in zip(pairs, chosen)]  # a person's verdict stands
    known = all("flipped" in p for p in pairs)
    out, post = [], []
    for pair, pick, p in zip(pairs, chosen, posterior):
        if pick and mode.endswith("filter"):
            continue
        if pick:  # relabel
            pair = {**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]}
            if "flipped" in pair:
                pair["flipped"] = not pair["flipped"]
            p = 1 - p
        out.append(pair)
        post.append(p)
    info = {"label_fix": mode, "pairs_before": len(pairs), "pairs_after": len(out),
            ("dropped" if mode.endswith("filter") else "relabelled"): sum(chosen)}
    if known:
        info["truly_flipped_before"] = sum(bool(p["flipped"]) for p in pairs)
        info["changed_truly_flipped"] = sum(1 for p, pick in zip(pairs, chosen) if pick and p["flipped"])
        info["truly_flipped_after"] = sum(bool(p["flipped"]) for p in out)
    return Fixed(out, post, info)
