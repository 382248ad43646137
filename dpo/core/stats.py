"""HellaSwag accuracies from per-item predictions, and paired comparisons of two models on the same items.

Pure functions of 0/1 correctness vectors and prediction records (numpy only, no torch): `dpo eval` computes them
after scoring, `dpo report` compares every sweep cell with the base model from their predictions.jsonl.
"""

import math
import statistics
from typing import NamedTuple

import numpy as np

from dpo.core.metrics import ACCURACIES as ACCURACY_NAMES
from dpo.core.metrics import METRICS

ACCURACIES = {m: METRICS[m].field for m in ACCURACY_NAMES}  # accuracy -> its predictions.jsonl field
BOOTSTRAP_SEED = 0


def accuracy(correct) -> float:
    return sum(correct) / len(correct)


def stderr(p: float, n: int) -> float:
    """Standard error of a mean of n 0/1 values, sample variance as the harness: sqrt(p (1 - p) / (n - 1))."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


class Interval(NamedTuple):
    low: float
    high: float


def paired_bootstrap(a, b, resamples: int, seed: int = BOOTSTRAP_SEED, level=0.95) -> Interval:
    """Percentile CI of mean(b) - mean(a), resampling items (the same items for both) with replacement."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng, means = np.random.default_rng(seed), []
    for start in range(0, resamples, 1000):  # 1000 resamples at a time: memory n * 1000
        idx = rng.integers(0, len(d), size=(min(1000, resamples - start), len(d)))
        means.append(d[idx].mean(axis=1))
    lo, hi = np.percentile(np.concatenate(means), [50 * (1 - level), 50 * (1 + level)])
    return Interval(float(lo), float(hi))


def mcnemar(a, b) -> float:
    """Exact (binomial) two-sided McNemar p-value: of the items exactly one model gets right, is the split
    between the models compatible with 50/50?"""
    return mcnemar_counts(sum(1 for x, y in zip(a, b) if x and not y), sum(1 for x, y in zip(a, b) if y and not x))


def mcnemar_counts(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts."""
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def clustered_mcnemar(cluster_diffs) -> float:
    """Two-sided McNemar p-value when the same items recur in several seeds (Durkalski et al., 2003): per item,
    d = (seeds only B gets right) - (seeds only A gets right), and X^2 = (sum d)^2 / sum d^2 on 1 degree of
    freedom. Counting each (seed, item) as its own unit would treat one item's five seeds as five independent
    items; with one seed per item this is the asymptotic (uncorrected) McNemar test."""
    total, spread = sum(cluster_diffs), sum(d * d for d in cluster_diffs)
    if not spread:
        return 1.0
    return min(1.0, math.erfc(math.sqrt(total * total / spread / 2)))


def correct(records, metric: str) -> list:
    return [int(r[ACCURACIES[metric]] == r["gold"]) for r in records]


def accuracies(records) -> dict:
    """n and each accuracy with its standard error."""
    out = {"n": len(records)}
    for metric, field in ACCURACIES.items():
        if field in records[0]:
            p = accuracy(correct(records, metric))
            out[metric], out[metric + "_stderr"] = p, stderr(p, len(records))
    return out


def summarize(records) -> dict:
    """`accuracies` of all items, and per split_type where items have one."""
    out = accuracies(records)
    split_types = sorted({r["split_type"] for r in records if r.get("split_type")})
    if split_types:
        out["by_split_type"] = {s: accuracies([r for r in records if r.get("split_type") == s]) for s in split_types}
    return out


def compare(records_a, records_b, resamples: int, seed: int = BOOTSTRAP_SEED) -> dict:
    """Paired comparison per accuracy: A, B, A - B (positive: A is better), bootstrap CI of A - B, McNemar p."""
    assert [r["id"] for r in records_a] == [r["id"] for r in records_b], "compare needs the same items"
    out = {}
    for metric, field in ACCURACIES.items():
        if field in records_a[0]:
            a, b = correct(records_a, metric), correct(records_b, metric)
            out[metric] = {"a": accuracy(a), "b": accuracy(b), "diff": accuracy(a) - accuracy(b),
                           "ci95": list(paired_bootstrap(b, a, resamples, seed)), "mcnemar_p": mcnemar(a, b),
                           "only_a_right": sum(x and not y for x, y in zip(a, b)),
                           "only_b_right": sum(y and not x for x, y in zip(a, b))}
    return out


def format_comparison(comparison: dict, name_a: str, name_b: str) -> str:
    lines = [f"A = {name_a}", f"B = {name_b}", "A - B > 0: A scores higher",
             f"{'metric':<9} {'A':>7} {'B':>7} {'A - B':>8}  {'95% CI of A - B':<19} {'McNemar p':>9}"]
    for metric, c in comparison.items():
        lo, hi = c["ci95"]
        lines.append(f"{metric:<9} {c['a']:>7.4f} {c['b']:>7.4f} {c['diff']:>+8.4f}  [{lo:+.4f}, {hi:+.4f}]"
                     f"  {c['mcnemar_p']:>9.3g}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ across seeds and cells

T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """Two-sided 95% quantile of Student's t with df degrees of freedom (table to 30, then a close fit)."""
    return T975[df - 1] if df <= len(T975) else 1.96 + 2.4 / df


class MeanCI(NamedTuple):
    mean: float  # None for no values
    half: float  # the half-width of the 95% t-interval; None for fewer than two values


def mean_ci(values) -> MeanCI:
    """(mean, half-width of the 95% t-interval) of the values that are not None; half-width None for fewer than
    two values, (None, None) for none."""
    values = [v for v in values if v is not None]
    if not values:
        return MeanCI(None, None)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return MeanCI(mean, None)
    return MeanCI(mean, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz's method)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_sf2(t: float, df: int) -> float:
    """Two-sided tail probability of Student's t: P(|T| >= |t|)."""
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_quantile(q: float, df: int) -> float:
    """The q quantile (q > 0.5) of Student's t, by bisection on t_sf2."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_sf2(mid, df) / 2 > 1 - q else (lo, mid)
    return (lo + hi) / 2


def paired_t(differences) -> float:
    """Two-sided p-value of the one-sample t test that the mean of the paired differences is 0 (1.0 for fewer
    than two; 0.0 or 1.0 when they do not vary)."""
    n = len(differences)
    if n < 2:
        return 1.0
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return t_sf2(mean / (sd / math.sqrt(n)), n - 1)


def detectable_t(differences, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t test at 0.05 finds with the given power, for the
    spread and count of these differences: (t_0.975 + t_power) sd / sqrt(n). None for fewer than two."""
    n = len(differences)
    if n < 2:
        return None
    df = n - 1
    return (t_quantile(0.975, df) + t_quantile(power, df)) * statistics.stdev(differences) / math.sqrt(n)


class ClusterEffect(NamedTuple):
    diff: float  # A's accuracy minus B's over the (seed, item) units
    half: float  # half-width of its 95% interval, clusters (items) as the units
    detectable: float  # the smallest difference detectable at 80% power with the same spread


def cluster_effect(cluster_diffs, units: int) -> ClusterEffect:
    """The accuracy difference from per-item sums over seeds of (A right) - (B right), with the items as clusters:
    units = seeds x items. Its standard error is the spread of the item sums (cluster-robust), so one item's five
    seeds count once."""
    k = len(cluster_diffs)
    mean = sum(cluster_diffs) / units
    if k < 2:
        return ClusterEffect(mean, None, None)
    per = statistics.fmean(cluster_diffs)
    se = math.sqrt(k * sum((d - per) ** 2 for d in cluster_diffs) / (k - 1)) / units
    return ClusterEffect(mean, 1.96 * se, (1.96 + 0.8416) * se)


class Crossed(NamedTuple):
    mean: float  # the mean difference over seeds and items
    half: float  # half-width of its 95% interval, seeds and items both random
    p: float  # two-sided p-value that the mean is 0
    df: float  # Satterthwaite's degrees of freedom


def crossed_t(rows) -> Crossed:
    """A mean difference that generalizes to new seeds and new items at once: rows[s][i] is seed s's difference on
    item i (the same items in every row). Seeds and items are crossed random effects (two-way ANOVA, one value a
    cell): Var(mean) = (MS_seed + MS_item - MS_error) / (seeds x items), a variance component estimated below 0
    taken as 0, with Satterthwaite's degrees of freedom (Clark 1973, "the language-as-fixed-effect fallacy"). The
    paired t over seed means leaves out the items' sampling error (every seed shares them) and the clustered
    McNemar test the seeds' (it holds the trained models fixed). None for fewer than two seeds or items."""
    d = np.asarray(rows, dtype=float)
    if d.ndim != 2 or min(d.shape) < 2:
        return None
    seeds, items = d.shape
    mean = float(d.mean())
    seed_dev, item_dev = d.mean(axis=1) - mean, d.mean(axis=0) - mean
    ms_seed = items * float(seed_dev @ seed_dev) / (seeds - 1)
    ms_item = seeds * float(item_dev @ item_dev) / (items - 1)
    resid = d - mean - seed_dev[:, None] - item_dev[None, :]
    ms_error = float((resid * resid).sum()) / ((seeds - 1) * (items - 1))
    terms = [(1.0, ms, df) for ms, df in ((ms_seed, seeds - 1), (ms_item, items - 1)) if ms > ms_error]
    terms.append((1.0 - len(terms), ms_error, (seeds - 1) * (items - 1)))
    v = sum(c * ms for c, ms, _ in terms)
    if v <= 0:
        return Crossed(mean, 0.0, 1.0 if mean == 0 else 0.0, math.inf)
    df = v * v / sum(c * c * ms * ms / df for c, ms, df in terms if c)
    se = math.sqrt(v / (seeds * items))
    return Crossed(mean, t_quantile(0.975, df) * se, t_sf2(mean / se, df), df)


def sign_test(differences) -> float:
    """Exact two-sided sign test p-value of paired differences (zeros dropped): are positive and negative
    differences equally likely?"""
    pos = sum(1 for d in differences if d > 0)
    neg = sum(1 for d in differences if d < 0)
    n = pos + neg
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(pos, neg) + 1)) / 2 ** n)


def holm(p_values) -> list:
    """Holm-adjusted p-values (family-wise error control over all the given tests), in the given order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def auroc(scores, positive) -> float:
    """Area under the ROC curve of `scores` for telling positive (true) from negative items: the probability that
    a random positive scores above a random negative, ties counting half (Mann-Whitney U / (n_pos n_neg))."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average ranks over ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
