"""The parts of `dpo report` for studies of label correction: audit cells and paired comparisons within seed.

Audit cells ([audit] in a sweep file, `dpo sweep` runs `dpo audit` on each pair file): per noise level, the
noise-rate estimates against the true rate (error, interval coverage), the detector's AUROC and its precision and
recall at the flagging threshold; a plot of every estimate with its interval.

Paired comparisons ([sweep] paired = ["label_fix", "loss", "eps"]: the keys that make a method): every cell is
compared with its baseline, the cell of the same seed and other settings whose method keys are at their [data] /
[train] values. Primary measure: the final clean-validation margin, the difference per seed and a two-sided sign
test over seeds; secondary: validation reward accuracy, with a McNemar test clustered by validation pair
(every seed is measured on the same pairs; from each cell's val_margins.json). Each family of p-values gets a
Holm correction, shown beside the raw ones.
"""

import statistics
from typing import NamedTuple

from dpo.core import stats
from dpo.core.files import write_png
from dpo.core.metrics import validation
from dpo.study import records
from dpo.study import sweep as sweeps
from dpo.study.results import table_head


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _f(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------------------ audit cells

def audit_table(sweep, audits: list) -> str:
    by_noise = {}
    for cell, result in audits:
        by_noise.setdefault(cell.settings["noise"], []).append(result["audit"])
    head = ["noise", "seeds", "true eps", "eps^ (mean)", "mean abs error", "inside 95% interval", "AUROC (range)",
            "detector accuracy", "flagged", "precision", "recall"]
    rows = []
    for noise, runs in sorted(by_noise.items()):
        truth = [r.get("truth") or r["added_flips"] for r in runs if "truth" in r or "added_flips" in r]
        aurocs = [t["auroc"] for t in truth if t["auroc"] is not None]
        rows.append([sweeps.fmt(noise), str(len(runs)), _f(_mean([t["true_eps"] for t in truth])),
                     _f(_mean([r["eps_hat"] for r in runs])), _f(_mean([t["eps_error"] for t in truth])),
                     f"{sum(t['covered'] for t in truth)} of {len(truth)}",
                     f"{_f(_mean(aurocs))} ({_f(min(aurocs))}–{_f(max(aurocs))})" if aurocs else "–",
                     _f(_mean([r["detector_accuracy"] for r in runs])),
                     _f(_mean([r["flagged"] for r in runs]), 1), _f(_mean([t["precision"] for t in truth])),
                     _f(_mean([t["recall"] for t in truth]))])
    lines = table_head(head)
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def plot_audits(plt, audits: list, out) -> str:
    if not audits:
        return None
    fig, (ax, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
    seeds = sorted({c.seed for c, _ in audits})
    for cell, result in audits:
        a = result["audit"]
        known = a.get("truth") or a.get("added_flips") or {}
        true_eps = known.get("true_eps", cell.settings["noise"])
        x = true_eps + 0.006 * (seeds.index(cell.seed) - (len(seeds) - 1) / 2)
        eps, (low, high) = a["eps_hat"], a["eps_ci95"]
        if eps is not None:  # null: no estimate (a non-finite number is written as null)
            ax.errorbar([x], [eps], yerr=[[eps - low], [high - eps]], marker="o", markersize=3, capsize=2,
                        color=f"C{seeds.index(cell.seed)}",
                        label=f"seed {cell.seed}" if true_eps == min(c.settings["noise"] for c, _ in audits) else None)
        if known.get("auroc") is not None:
            ax_auc.plot([true_eps], [known["auroc"]], "o", color=f"C{seeds.index(cell.seed)}")
    top = max(c.settings["noise"] for c, _ in audits) + 0.1
    ax.plot([0, top], [0, top], color="gray", linestyle=":", label="eps^ = eps")
    ax.set_xlabel("true flip rate eps")
    ax.set_ylabel("estimated eps^ (95% interval)")
    ax.set_title("noise-rate estimate per seed", fontsize=9)
    ax.legend(fontsize=7)
    ax_auc.set_xlabel("true flip rate eps")
    ax_auc.set_ylabel("AUROC of the reference score")
    ax_auc.set_ylim(0.5, 1.0)
    ax_auc.set_title("how well the reference score ranks flipped pairs first (0.5: chance)", fontsize=9)
    for a in (ax, ax_auc):
        a.grid(alpha=0.3)
    return write_png(plt, fig, out / "audit_estimates.png")


# ------------------------------------------------------------------------------------------ paired comparisons

def method_of(sweep, cell) -> tuple:
    return tuple((k, cell.settings.get(k, sweeps.base_value(sweep, k))) for k in sweep.paired)


def group_of(sweep, cell) -> tuple:
    return tuple((k, v) for k, v in cell.settings.items() if k not in sweep.paired)


def sweep_order(sweep):
    """A sort key for (group, method) pairs: the order in which the sweep file lists them (baseline first)."""
    seen = {}
    for cell in sweep.cells:
        seen.setdefault((group_of(sweep, cell), method_of(sweep, cell)), len(seen))
    baseline = tuple((k, sweeps.base_value(sweep, k)) for k in sweep.paired)
    return lambda group, method: (seen.get((group, baseline), len(seen)), method != baseline,
                                  seen.get((group, method), len(seen)))


VAL_MARGINS = {"margins": records.Required(list), "tie": records.Required(records.NUMBER)}


def val_margins(sweep, cell):
    """A cell's val_margins.json (each validation pair's final margin), or None (absent, or damaged: a warning)."""
    found = records.read_record(sweeps.job_dir(sweep, cell.name) / "val_margins.json", VAL_MARGINS)
    if found and not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in found["margins"]):
        records.warn(f"{sweeps.job_dir(sweep, cell.name) / 'val_margins.json'}: a margin is not a number")
        return None
    return found


def comparisons(sweep, results: list) -> list:
    """One entry per (group, method) other than the baseline: the per-seed pairs (baseline result, result)."""
    baseline = tuple((k, sweeps.base_value(sweep, k)) for k in sweep.paired)
    index = {(group_of(sweep, c), method_of(sweep, c), c.seed): (c, r) for c, r in results}
    out = {}
    for (group, method, seed), (cell, result) in index.items():
        if method == baseline or (group, baseline, seed) not in index:
            continue
        out.setdefault((group, method), []).append((index[(group, baseline, seed)], (cell, result)))
    return [{"group": g, "method": m, "pairs": sorted(p, key=lambda t: t[0][0].seed)} for (g, m), p in out.items()]


def _margin(result):
    return validation(result.get("train_summary")).get("rewards/margins")


class Discordant(NamedTuple):
    only_base: int  # (seed, validation pair) units only the baseline gets right
    only_method: int
    per_pair: list  # per validation pair, summed over seeds: (only method) - (only baseline); the clusters


def mcnemar_units(sweep, pairs: list) -> Discordant:
    """The discordant (seed, validation pair) units, and per pair over the seeds (every seed is measured on the
    same pairs, so a pair is a cluster): right = margin above the tie tolerance."""
    only_base = only_method = 0
    per_pair = {}
    for (bc, _), (mc, _) in pairs:
        b, m = val_margins(sweep, bc), val_margins(sweep, mc)
        if not b or not m or len(b["margins"]) != len(m["margins"]):
            continue
        for j, (x, y) in enumerate(zip(b["margins"], m["margins"])):
            right_b, right_m = x > b["tie"], y > m["tie"]
            only_base += right_b and not right_m
            only_method += right_m and not right_b
            per_pair[j] = per_pair.get(j, 0) + int(right_m) - int(right_b)
    return Discordant(only_base, only_method, list(per_pair.values()))


def paired_rows(sweep, results: list) -> list:
    rows = []
    for comp in comparisons(sweep, results):
        diffs = [_margin(r) - _margin(b) for (_, b), (_, r) in comp["pairs"]
                 if _margin(r) is not None and _margin(b) is not None]
        acc = [r.get("val_reward_accuracy") - b.get("val_reward_accuracy") for (_, b), (_, r) in comp["pairs"]
               if r.get("val_reward_accuracy") is not None and b.get("val_reward_accuracy") is not None]
        units = mcnemar_units(sweep, comp["pairs"])
        rows.append({**comp, "diffs": diffs, "acc_diffs": acc, "sign_p": stats.sign_test(diffs),
                     "wins": sum(d > 0 for d in diffs), "only_base": units.only_base,
                     "only_method": units.only_method, "mcnemar_p": stats.clustered_mcnemar(units.per_pair)})
    for key, out in (("sign_p", "sign_p_holm"), ("mcnemar_p", "mcnemar_p_holm")):
        for row, adjusted in zip(rows, stats.holm([r[key] for r in rows])):
            row[out] = adjusted
    return rows


def _label(pairs) -> str:
    return ", ".join(f"{k}={sweeps.fmt(v)}" for k, v in pairs) or "–"


def _method_label(sweep, method) -> str:
    """A method by what it changes from the baseline (the sweep's defaults): 'label_fix=relabel'."""
    changed = [(k, v) for k, v in method if v != sweeps.base_value(sweep, k)]
    return _label(changed) if changed else "baseline"


def paired_table(sweep, results: list) -> str:
    rows = paired_rows(sweep, results)
    if not rows:
        return ""
    head = ["group", "method vs baseline", "seeds", "val margin: method − baseline per seed", "method better in",
            "sign test p (Holm)", "val reward acc − baseline, mean (points)", "McNemar: only baseline / only method "
            "right (seed × pair units)", "McNemar p, clustered by pair (Holm)"]
    lines = table_head(head)
    order = sweep_order(sweep)
    for r in sorted(rows, key=lambda r: order(r["group"], r["method"])):
        acc = _mean(r["acc_diffs"])
        lines.append("| " + " | ".join([
            _label(r["group"]), _method_label(sweep, r["method"]), str(len(r["pairs"])),
            ", ".join(f"{d:+.4f}" for d in r["diffs"]), f"{r['wins']} of {len(r['diffs'])}",
            f"{r['sign_p']:.3g} ({r['sign_p_holm']:.3g})", "–" if acc is None else f"{100 * acc:+.1f}",
            f"{r['only_base']} / {r['only_method']}", f"{r['mcnemar_p']:.3g} ({r['mcnemar_p_holm']:.3g})"]) + " |")
    return "\n".join(lines)


def order_tables(sweep, results: list) -> str:
    """Per group, every method against every other within seed: the cell in row A, column B reads "k of n" when
    A's final validation margin is above B's in k of the n seeds both have (the order a prediction states)."""
    margins = {}  # group -> method -> seed -> margin
    for cell, result in results:
        if _margin(result) is not None:
            margins.setdefault(group_of(sweep, cell), {}).setdefault(method_of(sweep, cell), {})[cell.seed] = \
                _margin(result)
    order, tables = sweep_order(sweep), []
    for group, methods in sorted(margins.items(), key=lambda item: order(item[0], ())):
        names = sorted(methods, key=lambda m: order(group, m))
        if len(names) < 2:
            continue
        head = [f"{_label(group)}: row above column in"] + [_method_label(sweep, m) for m in names]
        lines = table_head(head)
        for a in names:
            row = [_method_label(sweep, a)]
            for b in names:
                common = sorted(set(methods[a]) & set(methods[b]))
                wins = sum(methods[a][seed] > methods[b][seed] for seed in common)
                row.append("–" if a == b or not common else f"{wins} of {len(common)}")
            lines.append("| " + " | ".join(row) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def methods_table(sweep, results: list) -> str:
    """Per group and method: mean final val margin and reward accuracy, the share of oracle-relabel's margin
    (where the group has it), and what the label correction did (relabelled or dropped, truly flipped among them)."""
    groups = {}
    for cell, result in results:
        groups.setdefault(group_of(sweep, cell), {}).setdefault(method_of(sweep, cell), []).append((cell, result))
    head = ["group", "method", "seeds", "val margin", "share of oracle-relabel", "val reward acc",
            "pairs changed (truly flipped among them)", "flipped pairs trained on"]
    lines = table_head(head)
    order = sweep_order(sweep)
    for group, methods in sorted(groups.items(), key=lambda item: order(item[0], ())):
        oracle = next((m for m in methods if dict(m).get("label_fix") == "oracle-relabel"), None)
        ceiling = _mean([_margin(r) for _, r in methods[oracle]]) if oracle else None
        for method, members in sorted(methods.items(), key=lambda item: order(group, item[0])):
            margin = _mean([_margin(r) for _, r in members])
            fixes = [fix_info(sweep, c) for c, _ in members]
            changed = [f.get("relabelled", f.get("dropped")) for f in fixes if f]
            truly = [f.get("changed_truly_flipped") for f in fixes if f]
            left = [trained_flipped(sweep, c) for c, _ in members]
            left = [n for n in left if n is not None]
            lines.append("| " + " | ".join([
                _label(group), _method_label(sweep, method), str(len(members)), _f(margin, 4),
                _f(margin / ceiling, 2) if ceiling and margin is not None else "–",
                _f(_mean([r.get("val_reward_accuracy") for _, r in members])),
                f"{_f(_mean(changed), 1)} ({_f(_mean(truly), 1)})" if changed else "–",
                _f(_mean(left), 1) if left else "–"]) + " |")
    return "\n".join(lines)


FIX = {k: records.Optional(records.NUMBER) for k in ("relabelled", "dropped", "changed_truly_flipped")}
RUN_CONFIG = {"flipped": records.Optional(records.NUMBER),
              "label_fix": records.Optional({"fix": records.Optional(FIX)})}


def trained_flipped(sweep, cell):
    """How many of the pairs a cell trained on were flipped (after any label fix), from its config.json."""
    config = records.read_record(sweeps.job_dir(sweep, cell.name) / "config.json", RUN_CONFIG)
    return config.get("flipped") if config else None


def fix_info(sweep, cell) -> dict:
    config = records.read_record(sweeps.job_dir(sweep, cell.name) / "config.json", RUN_CONFIG)
    return ((config or {}).get("label_fix") or {}).get("fix") or {}
