"""The audit's estimate of a file's flip rate from its own scores alone, with no clean pairs (`dpo audit` without
--val-file; dpo/audit/audit.py has the calibrated one).

Flip symmetry (a flipped pair's score is a clean score negated) makes |s| the same for a pair and its flipped copy,
so a pair's |s| says nothing about whether it is flipped, and only the sign carries the label:

    P(s > 0 | |s| = r) = eps + (1 - 2 eps) g(r),   g(r) = f(r) / (f(r) + f(-r))

g is the chance that a clean pair of that |s| is scored the right way round. The checked family is the one the
flip posterior already uses, log f(-s)/f(s) = -w s, so g(r) = sigmoid(w r) (exact for normal clean scores; w = 2 mu
/ sigma^2). eps is identified by the tail: where g reaches 1 the share of negative scores is eps itself, so the
estimate needs pairs the reference is sure of, and a reference that is wrong even on its surest pairs (g levelling
off below 1) biases eps^ upward by about its error there (`tail_check` reports it).

`fit` maximises the likelihood of the signs given |s| over (eps, w); its 95% interval is the profile likelihood's
(w re-maximised at each eps, so it accounts for w being estimated). Reviewed pairs (a person's verdicts, see
dpo/audit/review.py) add their known labels to the same likelihood: each contributes eps or 1 - eps for its verdict and
g(r) or 1 - g(r) for the sign of its label-corrected score, which pins w on the file's own distribution.
"""

import math
from dataclasses import dataclass

import numpy as np

CHI2_95 = 3.841459  # 95% quantile of chi-square with 1 degree of freedom (the profile-likelihood cut)
MIN_PAIRS = 200  # fewer pairs than this and the tail holds a handful of pairs: no estimate
MAX_WIDTH = 0.5  # an interval wider than this says nothing
EPS_GRID = np.linspace(0.0, 0.5, 101)
W_GRID = np.concatenate([[0.0], np.geomspace(0.02, 200.0, 48), [np.inf]])  # w on |s| / median |s|
GROUPS = 250  # the likelihood groups neighbouring |s| into this many groups (exact at or below it)
TAIL_SHARE = 0.1  # tail_check: the surest 10% of pairs


@dataclass
class FreeEstimate:
    eps: float
    low: float
    high: float
    slope: float  # w on the scores' own scale (log f(-s)/f(s) = -w s)
    n: int  # pairs with a nonzero score
    n_reviewed: int
    tail_lr: float  # 2 (log L - log L at w = 0): how much |s| says about the sign (chi-square 1 df under no tail)
    method: str = "mixture fit on |s| (profile likelihood)"


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.clip(x, -500, 500)))


def _g(r) -> np.ndarray:
    """g = sigmoid(w r) for every w of W_GRID (rows) and every scaled |s| r (columns)."""
    finite = np.where(np.isinf(W_GRID), 0.0, W_GRID)[:, None]
    return np.where(np.isinf(W_GRID)[:, None], 1.0, _sigmoid(finite * r[None, :]))


def _bernoulli(p, y) -> np.ndarray:
    """Sum over the last axis of log p where y is 1 and log (1 - p) where 0."""
    return (np.log(np.clip(p, 1e-300, 1.0)) * y + np.log(np.clip(1 - p, 1e-300, 1.0)) * (1 - y)).sum(axis=-1)


def _groups(r, positive, most: int = GROUPS) -> tuple:
    """(mean r, positives, count) of `most` groups of neighbouring r of near-equal size (each pair its own group
    when there are fewer): the likelihood on 1000s of pairs at the cost of `most`, g varying little within a
    group."""
    order = np.argsort(r)
    parts = np.array_split(order, min(most, len(r))) if len(r) else []
    return (np.array([r[i].mean() for i in parts]), np.array([positive[i].sum() for i in parts], dtype=np.float64),
            np.array([len(i) for i in parts], dtype=np.float64))


def profile(scores, reviewed_scores=(), reviewed_flipped=()) -> tuple:
    """(the log-likelihood on the grid [eps of EPS_GRID, w of W_GRID], the scale of |s| that w applies to): the
    unreviewed pairs' signs given |s|, plus the reviewed pairs' verdicts and label-corrected signs. Pure numpy."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[s != 0]
    rs = np.asarray(reviewed_scores, dtype=np.float64)
    rf = np.asarray(reviewed_flipped, dtype=bool)
    corrected = np.where(rf, -rs, rs)  # the score of the pair the right way round
    corrected = corrected[corrected != 0]
    scale = float(np.median(np.abs(np.concatenate([s, corrected])))) if len(s) + len(corrected) else 1.0
    scale = scale or 1.0
    r, pos, count = _groups(np.abs(s) / scale, s > 0)
    g = _g(r)
    grid = np.empty((len(EPS_GRID), len(W_GRID)))
    for i, e in enumerate(EPS_GRID):
        p = np.clip(e + (1 - 2 * e) * g, 1e-300, 1.0)
        grid[i] = (np.log(p) * pos + np.log(np.clip(1 - p, 1e-300, 1.0)) * (count - pos)).sum(axis=1)
    if len(rf):
        grid += _bernoulli(_g(np.abs(corrected) / scale), (corrected > 0).astype(np.float64))[None, :]
        flips = int(rf.sum())
        with np.errstate(divide="ignore"):
            verdicts = flips * np.log(EPS_GRID) if flips else np.zeros(len(EPS_GRID))
        grid += (verdicts + (len(rf) - flips) * np.log1p(-EPS_GRID))[:, None]
    return grid, scale


def fit(scores, reviewed_scores=(), reviewed_flipped=()) -> FreeEstimate:
    """eps^ (maximum likelihood over EPS_GRID, step 0.005) and its 95% profile-likelihood interval: the eps whose
    best w comes within CHI2_95 / 2 of the maximum."""
    grid, scale = profile(scores, reviewed_scores, reviewed_flipped)
    prof = grid.max(axis=1)
    top = int(np.argmax(prof))
    inside = np.flatnonzero(2 * (prof[top] - prof) <= CHI2_95)
    slope = W_GRID[int(np.argmax(grid[top]))] / scale
    n = int((np.asarray(scores) != 0).sum())
    return FreeEstimate(float(EPS_GRID[top]), float(EPS_GRID[inside.min()]), float(EPS_GRID[inside.max()]),
                        float(slope), n, len(reviewed_flipped), float(2 * (prof[top] - grid[:, 0].max())))


def tail_check(scores, est: FreeEstimate, share: float = TAIL_SHARE) -> dict:
    """The assumption that can be checked without clean pairs: among the surest `share` of pairs (largest |s|),
    the share scored below 0 and what the fit expects there (eps + (1 - 2 eps)(1 - g)). Well above the expectation,
    the reference errs on its surest pairs and eps^ is too high by about the difference."""
    s = np.asarray(scores, dtype=np.float64)
    k = max(1, int(round(share * len(s))))
    tail = s[np.argsort(-np.abs(s))[:k]]
    g = 1.0 if math.isinf(est.slope) else _sigmoid(est.slope * np.abs(tail))
    expected = float(np.mean(est.eps + (1 - 2 * est.eps) * (1 - g)))
    return {"pairs": k, "below_zero": float((tail < 0).mean()), "expected_below_zero": expected}


def predicted_accuracy(scores, est: FreeEstimate) -> float:
    """The detector accuracy on clean pairs that the fit implies, mean g(|s|) over the file (|s| is the same for
    clean and flipped pairs): compared with a clean set's measured accuracy, a check of the fitted family."""
    r = np.abs(np.asarray(scores, dtype=np.float64))
    return 1.0 if math.isinf(est.slope) else float(np.mean(_sigmoid(est.slope * r)))


def refusal(est: FreeEstimate) -> str:
    """Why the estimate means nothing ('' when it does): too few pairs, no usable tail, or not identified."""
    if est.n + est.n_reviewed < MIN_PAIRS:
        return (f"{est.n} pairs with a nonzero score: too few pairs to estimate the noise rate without clean pairs "
                f"(needs at least {MIN_PAIRS}; or give --val-file clean pairs, or --reviewed verdicts)")
    if est.n_reviewed == 0 and est.tail_lr < CHI2_95:
        return ("the scores carry no usable tail: the share of pairs scored below 0 does not fall as |score| grows "
                f"(likelihood ratio {est.tail_lr:.2f} < {CHI2_95:.2f}), so the file's noise cannot be told apart from "
                "the reference's errors (give --val-file clean pairs, --reviewed verdicts, or try --model/--score)")
    if est.high - est.low > MAX_WIDTH or est.high >= EPS_GRID[-1]:
        return (f"the fit is not identified: its 95% interval [{est.low:.2f}, {est.high:.2f}] reaches "
                f"{'0.5' if est.high >= EPS_GRID[-1] else f'wider than {MAX_WIDTH}'} (a file half swapped and a "
                "blind reference fit alike; give --val-file clean pairs or --reviewed verdicts)")
    return ""
