"""HellaSwag accuracies from per-item predictions, and paired comparisons of two models on the same items.

Pure functions of 0/1 correctness vectors and prediction records (numpy only, no torch): `dpo eval` computes them
after scoring, `dpo report` compares every sweep cell with the base model from their predictions.jsonl.
"""

import math

import numpy as np

ACCURACIES = {"acc": "pred_acc", "acc_norm": "pred_acc_norm", "mc_acc": "pred_mc"}  # metric -> prediction field
BOOTSTRAP_SEED = 0


def argmax(values) -> int:
    """Index of the first maximum (numpy's rule, so ties break like the harness)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def completion_predictions(logliks, ending_chars) -> tuple:
    """(acc prediction, acc_norm prediction): argmax of loglik and of loglik per character of the ending
    (characters of the ending without the leading space, as the harness counts them; x / 0 = -inf there)."""
    normalized = [x / n if n else -math.inf for x, n in zip(logliks, ending_chars)]
    return argmax(logliks), argmax(normalized)


def accuracy(correct) -> float:
    return sum(correct) / len(correct)


def stderr(p: float, n: int) -> float:
    """Standard error of a mean of n 0/1 values, sample variance as the harness: sqrt(p (1 - p) / (n - 1))."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def paired_bootstrap(a, b, resamples: int, seed: int = BOOTSTRAP_SEED, level=0.95) -> tuple:
    """Percentile CI of mean(b) - mean(a), resampling items (the same items for both) with replacement."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng, means = np.random.default_rng(seed), []
    for start in range(0, resamples, 1000):  # 1000 resamples at a time: memory n * 1000
        idx = rng.integers(0, len(d), size=(min(1000, resamples - start), len(d)))
        means.append(d[idx].mean(axis=1))
    lo, hi = np.percentile(np.concatenate(means), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def mcnemar(a, b) -> float:
    """Exact (binomial) two-sided McNemar p-value: of the items exactly one model gets right, is the split
    between the models compatible with 50/50?"""
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


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
    """Paired comparison per accuracy: A, B, B - A, bootstrap CI of B - A, McNemar p."""
    assert [r["id"] for r in records_a] == [r["id"] for r in records_b], "compare needs the same items"
    out = {}
    for metric, field in ACCURACIES.items():
        if field in records_a[0]:
            a, b = correct(records_a, metric), correct(records_b, metric)
            out[metric] = {"a": accuracy(a), "b": accuracy(b), "diff": accuracy(b) - accuracy(a),
                           "ci95": list(paired_bootstrap(a, b, resamples, seed)), "mcnemar_p": mcnemar(a, b),
                           "only_a_right": sum(x and not y for x, y in zip(a, b)),
                           "only_b_right": sum(y and not x for x, y in zip(a, b))}
    return out


def format_comparison(comparison: dict, name_a: str, name_b: str) -> str:
    lines = [f"A = {name_a}", f"B = {name_b}",
             f"{'metric':<9} {'A':>7} {'B':>7} {'B-A':>8}  {'95% CI of B-A':<19} {'McNemar p':>9}"]
    for metric, c in comparison.items():
        lo, hi = c["ci95"]
        lines.append(f"{metric:<9} {c['a']:>7.4f} {c['b']:>7.4f} {c['diff']:>+8.4f}  [{lo:+.4f}, {hi:+.4f}]"
                     f"  {c['mcnemar_p']:>9.3g}")
    return "\n".join(lines)
