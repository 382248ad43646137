"""The part of `dpo report` for a study's declared comparisons on the task: [[contrast]] tables in a sweep file.

Each contrast compares cell A with the cell B of the same seed that differs only in the settings it names, on the
HellaSwag items both scored (acc_norm, A − B in points). Three views, as the same items recur in every seed:
- seeds as replicates: the per-seed differences, their mean with a 95% t interval, a paired t test and a sign
  test, and the smallest mean difference a paired t test would find at 80% power with that spread;
- items as units: McNemar pooled over seeds with each item a cluster (stats.clustered_mcnemar), the pooled
  difference with a cluster-robust 95% interval, and its detectable difference at 80% power;
- both at once: seeds and items as crossed random effects (stats.crossed_t), the one view that generalizes to new
  seeds and new items together.
The contrasts are the study's family: every p-value column is Holm-adjusted over all of them (p 1 for a contrast
with no finished pair yet, so that the family does not shrink while a study runs).

Quality against quantity (a sweep with cells at several N, clean and noisy): per seed, the clean pairs that buy the
same acc_norm as N noisy ones, read off the clean cells' curve (straight lines in log N between the clean N that
were run), as a share of N; mean over seeds with a 95% t interval. A noisy cell below every clean cell gives only a
bound, so a second view reads such a cell off a straight line in N from the base model (0 clean pairs) to the
smallest clean N: an assumption, and an upper estimate of the rate if clean gains diminish with N.
"""

import math

from dpo.core import stats
from dpo.study import sweep as sweeps
from dpo.study.results import read_predictions, table_head

METRIC = "acc_norm"  # the primary measure


class Scored:
    """Each finished cell's per-item correctness (by item id), read once."""

    def __init__(self, sweep, found):
        self.sweep, self.finished = sweep, {cell.name for cell, _ in found["results"]}
        self.cache = {}

    def correct(self, cell):
        if cell.name not in self.finished:
            return None
        if cell.name not in self.cache:
            records = read_predictions(sweeps.job_dir(self.sweep, cell.name))
            self.cache[cell.name] = ({r["id"]: c for r, c in zip(records, stats.correct(records, METRIC))}
                                     if records else None)
        return self.cache[cell.name]


def contrast_row(sweep, contrast, scored: Scored) -> dict:
    """The per-seed differences and the item clusters of one contrast, over the seeds where both cells finished."""
    seeds, diffs, clusters, units, per_item = [], [], {}, 0, []
    for a, b in sorted(sweeps.contrast_pairs(sweep, contrast), key=lambda pair: pair[0].seed):
        right_a, right_b = scored.correct(a), scored.correct(b)
        if not right_a or not right_b:
            continue
        items = [i for i in right_a if i in right_b]
        seeds.append(a.seed)
        diffs.append(100 * (sum(right_a[i] for i in items) - sum(right_b[i] for i in items)) / len(items))
        for i in items:
            clusters[i] = clusters.get(i, 0) + right_a[i] - right_b[i]
        units += len(items)
        per_item.append({i: right_a[i] - right_b[i] for i in items})
    effect = stats.cluster_effect(list(clusters.values()), units) if units else None
    shared = [i for i in clusters if all(i in seed for seed in per_item)]  # the items every seed scored
    crossed = stats.crossed_t([[seed[i] for i in shared] for seed in per_item])
    return {"contrast": contrast, "seeds": seeds, "diffs": diffs, "mean": stats.mean_ci(diffs),
            "t_p": stats.paired_t(diffs), "sign_p": stats.sign_test(diffs), "wins": sum(d > 0 for d in diffs),
            "detectable_seeds": stats.detectable_t(diffs), "items": len(clusters), "effect": effect,
            "mcnemar_p": stats.clustered_mcnemar(list(clusters.values())) if clusters else 1.0,
            "crossed": crossed, "crossed_p": crossed.p if crossed else 1.0}


def _crossed(crossed) -> str:
    if crossed is None:
        return "–"
    df = f" (df {crossed.df:.1f})" if math.isfinite(crossed.df) else ""  # (inf: every difference the same)
    return f"{100 * crossed.mean:+.1f} ± {100 * crossed.half:.1f}{df}"


def _points(value, signed=True) -> str:
    return "–" if value is None else (f"{value:+.1f}" if signed else f"{value:.1f}")


def contrast_rows(sweep, found) -> list:
    """contrast_row of each [[contrast]] with a finished pair of cells, with its Holm-adjusted p-values (`<key>_holm`)
    over the whole family: an unfinished contrast counts with p 1, so the family does not shrink while a study runs."""
    scored = Scored(sweep, found)
    rows = [contrast_row(sweep, c, scored) for c in sweep.contrasts]
    for key in ("t_p", "sign_p", "mcnemar_p", "crossed_p"):
        for row, adjusted in zip(rows, stats.holm([r[key] for r in rows])):
            row[key + "_holm"] = adjusted
    return [r for r in rows if r["seeds"]]


def contrast_table(sweep, found) -> str:
    if not sweep.contrasts:
        return ""
    rows = contrast_rows(sweep, found)
    if not rows:
        return "No contrast has a finished pair of cells yet."
    head = ["A vs B", "seeds", f"{METRIC} A − B per seed (points)", "mean ± 95% CI (seeds)", "paired t p (Holm)",
            "A above B in (sign test p, Holm)", "detectable at 80% power (seeds)", "items: A − B ± 95% CI (clustered)",
            "McNemar p, items clustered (Holm)", "detectable at 80% power (items)",
            "seeds and items both random: A − B ± 95% CI", "p (Holm)"]
    lines = table_head(head)
    for r in rows:
        mean, effect = r["mean"], r["effect"]
        ci = _points(mean.mean) + (f" ± {mean.half:.1f}" if mean.half is not None else "")
        items = "–" if effect is None else (f"{100 * effect.diff:+.1f}" + (
            f" ± {100 * effect.half:.1f}" if effect.half is not None else ""))
        lines.append("| " + " | ".join([
            r["contrast"].label(), ", ".join(map(str, r["seeds"])), ", ".join(f"{d:+.1f}" for d in r["diffs"]), ci,
            f"{r['t_p']:.3g} ({r['t_p_holm']:.3g})",
            f"{r['wins']} of {len(r['diffs'])} ({r['sign_p']:.3g}, {r['sign_p_holm']:.3g})",
            _points(r["detectable_seeds"], signed=False), items,
            f"{r['mcnemar_p']:.3g} ({r['mcnemar_p_holm']:.3g})",
            "–" if effect is None or effect.detectable is None else f"{100 * effect.detectable:.1f}",
            _crossed(r["crossed"]),
            "–" if r["crossed"] is None else f"{r['crossed_p']:.3g} ({r['crossed_p_holm']:.3g})"]) + " |")
    return "\n".join(lines)


def section(sweep, found) -> list:
    table, rates = contrast_table(sweep, found), exchange_table(sweep, found)
    out = []
    if rates:
        out += ["## Quality against quantity", "",
                f"How many clean pairs buy the {METRIC} of N noisy ones: per seed, read off that seed's clean cells "
                "(a straight line in log N between the clean N that were run), as a share of N ('<' or '>': "
                "below or above every clean cell, no rate). Mean over seeds with a 95% t interval. Where the base "
                "model was scored, a second view takes it as the clean curve's point at 0 pairs, a straight line in "
                "N up to the smallest clean N, so that a noisy cell below every clean cell still gets a rate ('< 0': "
                "below the base model too); elsewhere the two views agree. That line is an assumption: if clean "
                "gains diminish with N, it lies below the true curve and over-states what noisy pairs are worth. "
                "The intervals are over seeds only: a rate divides by a few points of clean gain, and the sampling "
                "error of the items every seed shares, which the intervals leave out, is of the same order. A seed "
                "with fewer than two clean cells has no rate (in either view).",
                "", rates, ""]
    if not table:
        return out
    return out + ["## Contrasts on the task", "",
            f"The sweep file's [[contrast]] comparisons: cell A against the cell B of the same seed that differs only "
            f"in the settings named, on the same HellaSwag items ({METRIC}, points). Seeds as replicates: mean with a "
            "95% t interval, paired t test, sign test. Items as units: McNemar pooled over seeds with each item a "
            "cluster (the same items recur in every seed; Durkalski et al. 2003) and a cluster-robust interval. "
            "The seed view leaves out the items' sampling error (every seed scores the same items) and the item "
            "view the seeds' (it holds the trained models fixed); the last two columns take both as random at "
            "once (crossed random effects, Satterthwaite's df; a variance component estimated below 0 is taken as "
            "0, as a REML fit would, so with few seeds it can agree with the item view). Every p-value is "
            "Holm-adjusted over all the file's contrasts, finished or not (in parentheses). With 5 seeds or fewer "
            "the sign test cannot go below p 0.0625: it describes, it cannot detect. `detectable`: roughly the "
            "smallest true difference each test finds with 80% power at the spread observed (normal and t "
            "approximations, 0.05 before Holm).", "", table, ""]


def clean_equivalent(clean: dict, accuracy: float, base: float = None):
    """The N at which the clean curve {N: accuracy} reaches `accuracy` (linear in log N between neighbours; the
    first crossing), or a (bound, "<" / ">") pair when it lies below or above every clean point. With `base` (the
    base model: 0 clean pairs), an accuracy below every clean point is read off a straight line in N from the base
    model to the smallest clean N (log N has no 0); (0, "<") below the base model too."""
    points = sorted(clean.items())
    if accuracy < min(a for _, a in points):
        if base is None:
            return (points[0][0], "<")
        return (0, "<") if accuracy < base else points[0][0] * (accuracy - base) / (points[0][1] - base)
    for (n0, a0), (n1, a1) in zip(points, points[1:]):
        if min(a0, a1) <= accuracy <= max(a0, a1) and a0 != a1:
            t = (accuracy - a0) / (a1 - a0)
            return math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
        if a0 == a1 == accuracy:
            return float(n0)
    return (points[-1][0], ">") if accuracy > max(a for _, a in points) else float(points[0][0])


def exchange_rates(points: dict, base: float = None) -> dict:
    """points: seed -> {(noise, N): accuracy}. -> (noise, N) -> per seed, the clean-equivalent N / N (a number) or
    a bound (N*, "<" or ">") where the noisy cell lies outside the clean curve; seeds with fewer than two clean N
    are left out. `base`: the base model's accuracy, the clean curve's point at N = 0 (clean_equivalent)."""
    out = {}
    for seed, cells in sorted(points.items()):
        clean = {n: a for (noise, n), a in cells.items() if noise == 0}
        if len(clean) < 2:
            continue
        for (noise, n), accuracy in sorted(cells.items()):
            if noise == 0:
                continue
            found = clean_equivalent(clean, accuracy, base)
            out.setdefault((noise, n), {})[seed] = found / n if isinstance(found, float) else found
    return out


def exchange_table(sweep, found) -> str:
    """The rates of the sweep's plain cells (no label fix, every other setting at the file's values but noise and
    n), from their acc_norm."""
    points = {}
    for cell, result in found["results"]:
        values = sweeps.resolved(sweep, cell)
        if any(k not in ("noise", "n") and values[k] != sweeps.base_value(sweep, k)
               and not (k == "eps" and values[k] is None) for k in values):
            continue  # a label fix, another loss, ...: not on the two curves
        accuracy = (result.get("eval") or {}).get(METRIC)
        if accuracy is not None:
            points.setdefault(cell.seed, {})[(values["noise"], values["n"])] = 100 * accuracy
    base = ((found["base"] or {}).get("eval") or {}).get(METRIC)
    views = [exchange_rates(points)] + ([exchange_rates(points, 100 * base)] if base is not None else [])
    if not views[0]:
        return ""
    head = ["noise", "N noisy pairs", "clean pairs they are worth, per seed (share of N)", "mean ± 95% CI"]
    if len(views) > 1:
        head += ["with the base model as 0 clean pairs, per seed", "mean ± 95% CI"]
    lines = table_head(head)
    for key in sorted(views[0]):
        row = [sweeps.fmt(key[0]), str(key[1])]
        for rates in views:
            row += _rate_cells(rates[key])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _rate_cells(per_seed: dict) -> list:
    """[the per-seed rates or bounds, their mean ± 95% CI (only when every seed has a rate)]."""
    shown = [f"{seed}: {v:.2f}" if isinstance(v, float) else f"{seed}: {v[1]} {v[0]} pairs"
             for seed, v in sorted(per_seed.items())]
    numbers = [v for v in per_seed.values() if isinstance(v, float)]
    mean = stats.mean_ci(numbers) if len(numbers) == len(per_seed) else None
    ci = "–" if mean is None else f"{mean.mean:.2f}" + (f" ± {mean.half:.2f}" if mean.half is not None else "")
    return [", ".join(shown), ci]
