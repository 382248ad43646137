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


def summary(audit: Audit, pairs: list) -> dict:
    out = {"score": audit.score, "n": len(pairs), "eps_hat": audit.estimate.eps,
           "eps_ci95": [audit.estimate.low, audit.estimate.high], "estimate": asdict(audit.estimate),
           "detector_accuracy": audit.estimate.accuracy, "slope": audit.slope, "threshold": audit.threshold,
           "flagged": int(audit.flagged.sum())}
    if all("flipped" in p for p in pairs):
        out["truth"] = against_truth(audit, [p["flipped"] for p in pairs])
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


def table(out: dict) -> str:
    est = out["estimate"]
    lines = [f"pairs                 {out['n']}",
             f"score                 {out['score']}",
             f"detector accuracy     {percent_interval(est['accuracy'], est['accuracy_ci95'])} of "
             f"{est['n_clean']} clean pairs scored > 0",
             f"scored below 0        {percent_interval(est['q'], est['q_ci95'])} of the pairs",
             f"noise rate eps^       {out['eps_hat']:.3f}  (95% interval {out['eps_ci95'][0]:.3f} - "
             f"{out['eps_ci95'][1]:.3f})",
             f"flagged (posterior > {out['threshold']:g})  {out['flagged']} pairs"]
    truth = out.get("truth")
    if truth:
        lines += [f"true flip rate        {truth['true_eps']:.3f}  (|eps^ - eps| {truth['eps_error']:.3f}, "
                  f"{'inside' if truth['covered'] else 'OUTSIDE'} the interval)",
                  f"AUROC                 {truth['auroc']:.3f}",
                  f"precision / recall    {truth['precision']:.3f} / {truth['recall']:.3f} "
                  f"({truth['flagged_truly_flipped']} of {truth['flagged']} flagged pairs are flipped)"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ plots

def plot(audit: Audit, pairs: list, out_dir: Path) -> list:
    """scores.png (histograms, split by the true label where known) and roc.png (where known). [] without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return []
    known = all("flipped" in p for p in pairs)
    truth = np.array([bool(p.get("flipped")) for p in pairs])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bins = np.histogram_bin_edges(np.concatenate([audit.scores, audit.clean_scores]), bins=50)
    if known:
        ax.hist(audit.scores[~truth], bins=bins, alpha=0.6, label=f"clean pairs of the file ({(~truth).sum()})")
        ax.hist(audit.scores[truth], bins=bins, alpha=0.6, label=f"flipped pairs of the file ({truth.sum()})")
    else:
        ax.hist(audit.scores, bins=bins, alpha=0.6, label=f"pairs of the file ({len(pairs)})")
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

def write_outputs(out_dir: Path, audit: Audit, pairs: list, info: dict) -> dict:
    """audit.jsonl and the plots, then audit.json last (a folder with audit.json is complete)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "audit.jsonl", per_pair_lines(audit, pairs))
    plots = plot(audit, pairs, out_dir)
    result = {**info, **summary(audit, pairs), "plots": plots}
    atomic_write_json(out_dir / "audit.json", result, indent=1)
    return result


def run(cfg) -> dict:
    """`dpo audit`: score the file and the clean pairs with the reference model (through the cache), estimate,
    write, print."""
    from dpo.engine.reference import Scorer

    cfg.validate()
    scorer = Scorer.load(cfg.model, cfg.max_length, cfg.precision, cfg.device, cfg.cache_dir, cfg.threads,
                         cfg.append_eos)
    pairs = scorer.read(cfg.pairs)
    val_file = cfg.val_file or default_val_file(cfg.pairs)
    clean = scorer.read(val_file)[cfg.val_skip:]
    if len(clean) < MIN_CALIBRATION:
        raise InputError(f"{val_file}: {len(clean)} clean pairs after --val-skip {cfg.val_skip}: too few clean pairs "
                         f"to calibrate the detector on (needs at least {MIN_CALIBRATION})")
    check_calibration(pairs, clean, cfg.pairs, val_file, cfg.val_skip)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path("runs") / "audit" / f"{Path(cfg.pairs).stem}-{scorer.slug}"
    scores = pair_scores(cfg.score, *scorer.logprobs(pairs, "reference log-probs (file)"), pairs)
    clean_scores = pair_scores(cfg.score, *scorer.logprobs(clean, "reference log-probs (clean)"), clean)
    audit = audit_scores(scores, clean_scores, cfg.score, cfg.fix_threshold, cfg.pairs)
    info = {"pairs_file": cfg.pairs, "pairs_sha256": sha256_file(cfg.pairs), "val_file": str(val_file),
            "val_sha256": sha256_file(val_file), "val_skip": cfg.val_skip, "model": cfg.model,
            "precision": scorer.precision, "max_length": cfg.max_length,
            **({"append_eos": True} if cfg.append_eos else {})}
    result = write_outputs(out_dir, audit, pairs, info)
    print(table(result))
    print(f"wrote {out_dir}/audit.json, audit.jsonl" + "".join(f", {p}" for p in result["plots"]), file=sys.stderr)
    return result


def default_val_file(pairs_file) -> Path:
    """The clean validation pairs `dpo data` wrote with a pair file (its manifest entry names the settings)."""
    from dpo.data.prepare import validation_file_for

    found = validation_file_for(Path(pairs_file))
    if found is None:
        raise InputError(f"{pairs_file}: no clean pairs to calibrate the detector on: pass --val-file (clean "
                         "pairs from the same distribution, e.g. the validation pairs `dpo data` writes)")
    return found


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
