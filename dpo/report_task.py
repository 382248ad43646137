"""The part of `dpo report` for a study's declared comparisons on the task: [[contrast]] tables in a sweep file.

Each contrast compares cell A with the cell B of the same seed that differs only in the settings it names, on the
HellaSwag items both scored (acc_norm, A − B in points). Two views, as the same items recur in every seed:
- seeds as replicates: the per-seed differences, their mean with a 95% t interval, a paired t test and a sign
  test, and the smallest mean difference a paired t test would find at 80% power with that spread;
- items as units: McNemar pooled over seeds with each item a cluster (stats.clustered_mcnemar), the pooled
  difference with a cluster-robust 95% interval, and its detectable difference at 80% power.
The contrasts are the study's family: every p-value column is Holm-adjusted over them.
"""

from dpo import stats
from dpo import sweep as sweeps
from dpo.results import read_predictions

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
    seeds, diffs, clusters, units = [], [], {}, 0
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
    effect = stats.cluster_effect(list(clusters.values()), units) if units else None
    return {"contrast": contrast, "seeds": seeds, "diffs": diffs, "mean": stats.mean_ci(diffs),
            "t_p": stats.paired_t(diffs), "sign_p": stats.sign_test(diffs), "wins": sum(d > 0 for d in diffs),
            "detectable_seeds": stats.detectable_t(diffs), "items": len(clusters), "effect": effect,
            "mcnemar_p": stats.clustered_mcnemar(list(clusters.values())) if clusters else 1.0}


def _points(value, signed=True) -> str:
    return "–" if value is None else (f"{value:+.1f}" if signed else f"{value:.1f}")


def contrast_table(sweep, found) -> str:
    if not sweep.contrasts:
        return ""
    scored = Scored(sweep, found)
    rows = [contrast_row(sweep, c, scored) for c in sweep.contrasts]
    rows = [r for r in rows if r["seeds"]]
    if not rows:
        return "No contrast has a finished pair of cells yet."
    for key in ("t_p", "sign_p", "mcnemar_p"):
        for row, adjusted in zip(rows, stats.holm([r[key] for r in rows])):
            row[key + "_holm"] = adjusted
    head = ["A vs B", "seeds", f"{METRIC} A − B per seed (points)", "mean ± 95% CI (seeds)", "paired t p (Holm)",
            "A above B in (sign test p, Holm)", "detectable at 80% power (seeds)", "items: A − B ± 95% CI (clustered)",
            "McNemar p, items clustered (Holm)", "detectable at 80% power (items)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
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
            "–" if effect is None or effect.detectable is None else f"{100 * effect.detectable:.1f}"]) + " |")
    return "\n".join(lines)


def section(sweep, found) -> list:
    table = contrast_table(sweep, found)
    if not table:
        return []
    return ["## Contrasts on the task", "",
            f"The sweep file's [[contrast]] comparisons: cell A against the cell B of the same seed that differs only "
            f"in the settings named, on the same HellaSwag items ({METRIC}, points). Seeds as replicates: mean with a "
            "95% t interval, paired t test, sign test. Items as units: McNemar pooled over seeds with each item a "
            "cluster (the same items recur in every seed; Durkalski et al. 2003) and a cluster-robust interval. "
            "Every p-value is Holm-adjusted over the contrasts (in parentheses). `detectable`: the smallest true "
            "difference each test finds with 80% power at the spread observed.", "", table, ""]
