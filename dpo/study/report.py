"""`dpo report SWEEP.toml`: tables and plots of whatever a sweep has finished, into results_dir/<sweep>/.

REPORT.md    what was run (model, sizes, seeds, losses, hours), which cells are missing or failed, and per grid
             point the mean ± 95% CI over seeds (t-interval; one seed: no CI) of mc_acc, acc, acc_norm and the
             final reward accuracy on the clean validation pairs, with the base model as a row
summary.csv  one row per finished cell (and the base model)
*.png        with matplotlib (the `plots` extra): accuracy vs noise, the [[contrast]] comparisons, an N x noise
             heat map (sweeps over both), training curves, reward accuracy on clean vs flipped training pairs

Reads only runs_dir/<sweep>/ (dpo/study/results.py); plots in dpo/study/report_plots.py, the audit and paired-comparison
sections in dpo/study/report_audit.py. The folder is meant to be
committed: small files only.
"""

import csv
import io
import math
import statistics
from pathlib import Path

from dpo.core import losses as losses_
from dpo.core import stats
from dpo.core.files import atomic_write_text
from dpo.core.metrics import validation
from dpo.study import report_audit, report_task
from dpo.study import sweep as sweeps
from dpo.study.report_plots import PLOT_TEXT, make_plots
from dpo.study.results import (
    ACCURACIES,
    COLUMNS,
    TRAINED_ONLY,
    collect,
    group_points,
    keys_of,
    metric,
    pct,
    read_predictions,
    shown_value,
    table_head,
)

# ------------------------------------------------------------------------------------------------------ tables

def what_was_run(sweep, found) -> list:
    data, train, ev = sweep.data, sweep.train, sweep.eval

    def values(key):
        return ", ".join(sweeps.fmt(v) for v in sweep.grid[key]) if key in sweep.grid else None

    def across(key, default, cells=sweep.cells):  # the values the cells use, grid and extra cells alike
        return ", ".join(dict.fromkeys(sweeps.fmt(c.settings.get(key, default)) for c in cells))

    n = values("n") or str(data.n)
    losses = list(dict.fromkeys(c.settings.get("loss", train.loss) for c in sweep.cells))
    eps_cells = [c for c in sweep.cells if losses_.get(c.settings.get("loss", train.loss)).takes_eps]
    eps = across("eps", train.eps, eps_cells)
    if sweep.grid.get("eps") == ["noise"]:
        eps = "equal to the cell's noise"
    length = f"{train.max_steps} steps" if train.max_steps else f"{train.epochs} epoch(s)"
    counts = {r.get("val_pairs") for _, r in found["results"]} - {None}  # what the cells had (fewer: a small file)
    n_val = counts.pop() if len(counts) == 1 else train.val_size or data.source.validation_count(data)
    val_pairs = f"the first {n_val}" if n_val else "all the"
    scored = {"eval_start": data.eval_start, "eval_size": data.eval_size, **sweep.scored}
    items, first = ev.limit or scored["eval_size"], scored["eval_start"]
    results = [r for _, r in found["results"]] + ([found["base"]] if found["base"] else [])
    hours = sum((r.get("seconds") or {}).get("total") or 0.0 for r in results) / 3600
    own_seed = sum("val_seed" not in r for _, r in found["results"])  # cells run before the eval_seed rule
    own_seed = own_seed if data.source.shared_validation else 0  # a source's own held-out rows: no seed draws them
    held_out = (data.source.held_out(data, sweep.eval_seed) if not own_seed else
                f"drawn with each cell's own seed for {own_seed} cells run before validation pairs followed "
                f"eval_seed (seed {sweep.eval_seed})")
    lines = [f"- model: `{sweep.model}`",
             f"- training pairs N: {n} ({data.source.origin(data)}), noise: {across('noise', data.noise)}",
             f"- losses: {', '.join(losses)}, beta {sweeps.fmt(train.beta)}"
             + (f", eps: {eps}" if eps else ""),
             f"- training: {length} per cell, {train.step_pairs()} pairs per step, learning rate "
             f"{sweeps.fmt(train.learning_rate)}, warmup "
             f"{train.warmup_steps}, {train.lr_scheduler_type}",
             f"- validation: {val_pairs} clean validation pairs (reward accuracy at the end of training), "
             + held_out,
             f"- evaluation: {items} HellaSwag validation items (val[{first}:{first + items}]"
             + (" of the items in their fixed shuffled order" if data.item_order == "shuffled" else "")
             + (", none of them a validation, calibration or training item" if sweep.scored else "")
             + f"), metrics {ev.metrics}, mc prompts drawn with seed {sweep.eval_seed} for every cell and the base "
             "model",
             f"- training items: {training_items(data, len({c.seed for c in sweep.cells}))}",
             f"- seeds: {', '.join(map(str, sweep.seeds))}",
             f"- cells: {len(found['results'])} of {len(sweep.cells)} finished"
             + (", base model scored" if found["base"] else ", base model not scored yet")
             + f"; {hours:.2f} hours ({60 * hours:.0f} min) of compute in the finished results"]
    for key, values_ in sweep.grid.items():
        if key not in ("n", "noise", "eps", "loss") and len(values_) > 1:
            lines.append(f"- {key}: {', '.join(sweeps.fmt(v) for v in values_)}")
    for table in sweep.extra:
        own = ", ".join(f"{k}={sweeps.fmt(v)}" for k, v in table.items() if k != "seeds")
        lines.append(f"- extra cell: {own} (seeds {', '.join(map(str, table['seeds']))})")
    return lines


def training_items(data, seeds: int) -> str:
    """Whether the seeds train on the same items: a reader must know what a seed replicates."""
    if data.seed_stride:
        return (f"each seed its own slice of the pool (seed_stride {data.seed_stride}): no item is shared "
                "between seeds")
    if seeds == 1:
        return "one seed"
    what, redrawn = data.source.rows, data.source.redrawn
    return (f"the same {what} for every seed (a seed redraws only {redrawn}): seeds are not independent samples "
            f"of {what}")


def status_text(sweep, found) -> str:
    out = []
    if found["base"] is None:
        out.append(f"base model: not scored ({sweeps.status(sweep, sweeps.BASE)})")
    for name, line in found["failed"]:
        out.append(f"failed   {name}: {line}")
    for name, problem in found["damaged"]:
        out.append(f"damaged  {name}: {problem} (counted as unfinished; `dpo sweep` runs it again)")
    for name in found["partial"]:
        out.append(f"partial  {name} (started, not finished: running, interrupted or killed)")
    for name in found["missing"]:
        out.append(f"missing  {name}")
    return "\n".join(out)


def results_table(sweep, found) -> str:
    points = group_points(found["results"], sweep)
    keys = keys_of(points)
    shown = [m for m in COLUMNS if any(metric(r, m) is not None for _, r in found["results"])
             or (m not in TRAINED_ONLY and found["base"] and metric(found["base"], m) is not None)]
    head = keys + ["seeds"] + [COLUMNS[m] for m in shown]
    rows = []
    if found["base"]:
        base = found["base"]
        rows.append(["**base model**"] + [""] * (len(keys) - 1) + ["–"]
                    + [pct(metric(base, m)) if m not in TRAINED_ONLY else "–" for m in shown])
    for point, members in points.items():
        settings = dict(point)
        row = [sweeps.fmt(settings[k]) if k in settings else "" for k in keys]
        row.append(", ".join(str(c.seed) for c, _ in members))
        row += [shown_value(m, *stats.mean_ci([metric(r, m) for _, r in members])) for m in shown]
        rows.append(row)
    lines = table_head(head)
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def item_note(found) -> str:
    """How much of a difference the evaluation items alone can make (the same items for every cell)."""
    any_result = found["base"] or (found["results"][0][1] if found["results"] else None)
    if not any_result:
        return ""
    ev = any_result["eval"]
    parts = [f"{m} {100 * 1.96 * ev[m + '_stderr']:.1f}" for m in ACCURACIES
             if ev.get(m + "_stderr") is not None]  # null: one item, no standard error
    text = (f"Every cell and the base model are scored on the same {ev.get('n', '?')} items with the same prompts, "
            "so the intervals above are over training seeds only; the sampling error of the items themselves "
            f"(1.96 x standard error, in points) is about: {', '.join(parts)}.")
    counted = [(r.get("val_pairs") or r.get("train", {}).get("val_size"), r.get("val_reward_accuracy"))
               for _, r in found["results"]]  # the pairs a cell had (result.json), else its val_size
    val = [(n, acc) for n, acc in counted if n and acc is not None]
    if val:  # the same pairs for every cell (eval_seed's; cells run before that rule: their own seed's)
        n, acc = val[0][0], statistics.fmean(a for _, a in val)
        same = "every cell" if all("val_seed" in r for _, r in found["results"]) else "every cell with the same seed"
        text += (f" The {n} clean validation pairs are the same for {same}; at "
                 f"{100 * acc:.0f} % reward accuracy their sampling error is about "
                 f"{100 * 1.96 * math.sqrt(acc * (1 - acc) / n):.1f} points.")
    return text


def versus_base_table(sweep, found) -> str:
    """Every finished cell against the base model on the same items: the difference in points and the exact
    McNemar p-value, raw and Holm-adjusted over the cells of the table (per metric)."""
    base = read_predictions(sweeps.job_dir(sweep, sweeps.BASE)) if found["base"] else None
    if not base:
        return ""
    shown = [m for m, field in stats.ACCURACIES.items() if field in base[0]]
    base_ids = [r["id"] for r in base]
    names, diffs, p_values = [], {m: [] for m in shown}, {m: [] for m in shown}
    for members in group_points(found["results"], sweep).values():
        for cell, _ in members:
            records = read_predictions(sweeps.job_dir(sweep, cell.name))
            if not records or [r["id"] for r in records] != base_ids or any(
                    stats.ACCURACIES[m] not in records[0] for m in shown):
                continue
            names.append(cell.name)
            for m in shown:
                a, b = stats.correct(base, m), stats.correct(records, m)
                diffs[m].append(100 * (stats.accuracy(b) - stats.accuracy(a)))
                p_values[m].append(stats.mcnemar(a, b))
    if not names:
        return ""
    adjusted = {m: stats.holm(p_values[m]) for m in shown}
    head = ["cell"] + [f"{m} − base (McNemar p, Holm)" for m in shown]
    lines = table_head(head)
    for i, name in enumerate(names):
        cells = [f"{diffs[m][i]:+.1f} (p {p_values[m][i]:.2g}, {adjusted[m][i]:.2g})" for m in shown]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def csv_text(sweep, found) -> str:
    keys = keys_of(group_points(found["results"]))
    head = ["cell", *keys, "seed", "extra"]
    for m in ACCURACIES:
        head += [m, m + "_stderr"]
    head += ["eval_items", "val_reward_accuracy", "val_margin", "val_loss", "steps", "pairs_trained",
             "train_seconds", "eval_seconds", "total_seconds"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    rows = ([(None, found["base"])] if found["base"] else []) + found["results"]
    for cell, r in rows:
        ev, summary, seconds = r.get("eval", {}), r.get("train_summary", {}), r.get("seconds", {})
        row = [cell.name if cell else sweeps.BASE] + [cell.settings.get(k, "") if cell else "" for k in keys]
        row += [cell.seed if cell else "", cell.extra if cell else ""]
        for m in ACCURACIES:
            row += [ev.get(m, ""), ev.get(m + "_stderr", "")]
        row += [ev.get("n", ""), r.get("val_reward_accuracy", ""), metric(r, "val_margin"),
                validation(summary).get("loss", ""),
                summary.get("steps", ""), summary.get("pairs_trained", ""), seconds.get("train", ""),
                seconds.get("eval", ""), seconds.get("total", "")]
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def audit_sections(sweep, found) -> list:
    """The audit cells' table and the paired comparisons, for sweeps that have them (dpo/study/report_audit.py)."""
    lines = []
    if found["audits"]:
        lines += ["## Audit: noise-rate estimates and flip detection", "",
                  "Each audit cell scores one pair file with the reference model (`dpo audit`), calibrated on the "
                  "clean validation pairs after the ones that measure the trained policies; means over seeds.", "",
                  report_audit.audit_table(sweep, found["audits"]), ""]
    if sweep.paired and found["results"]:
        paired = report_audit.paired_table(sweep, found["results"])
        lines += ["## Methods", "", "Mean over seeds per group and method (" + ", ".join(sweep.paired) + ").", "",
                  report_audit.methods_table(sweep, found["results"]), ""]
        if paired:
            lines += ["## Paired comparisons within seed", "",
                      "Each method against the baseline (the cell of the same seed whose "
                      + ", ".join(sweep.paired) + " are at the sweep's defaults). Primary: the final "
                      "clean-validation margin, a two-sided sign test over seeds; secondary: reward accuracy on the "
                      "same validation pairs, a McNemar test clustered by pair (every seed is measured on the "
                      "same pairs, so the seeds of one pair are not independent units; Durkalski et al. 2003). "
                      "Holm-adjusted p-values (over all rows of the column) in parentheses.", "", paired, "",
                      "## Method against method within seed", "",
                      "How often one method's final clean-validation margin is above another's, over the seeds "
                      "both ran (no test: read with the table above).", "",
                      report_audit.order_tables(sweep, found["results"]), ""]
    return lines


# ------------------------------------------------------------------------------------------------------ report

def run(path) -> Path:
    """Write REPORT.md, summary.csv and the plots; the results folder."""
    sweep = sweeps.load(path)
    found = collect(sweep)
    out = sweep.results
    out.mkdir(parents=True, exist_ok=True)
    plots, plot_note = make_plots(sweep, found, out)
    for stale in out.glob("*.png"):
        if stale.name not in plots:
            stale.unlink()
    atomic_write_text(out / "summary.csv", csv_text(sweep, found))
    lines = [f"# Sweep `{sweep.name}`", "", f"Sweep file: `{sweep.path}`. Made by `make report SWEEP={sweep.path}` "
             f"from the results in `{sweep.runs}/` (rerun it as cells finish).", ""]
    if sweep.description:
        lines += [sweep.description, ""]
    if sweep.predictions:
        lines += ["## Predictions (written before the study ran)", "", sweep.predictions, ""]
    if sweep.outcomes:
        lines += ["## Outcomes (written after the cells below had run)", "", sweep.outcomes, ""]
    lines += ["## What was run", "", *what_was_run(sweep, found), ""]
    status = status_text(sweep, found)
    lines += ["## Missing or failed cells", "", "```", status or "none: every cell has finished", "```", ""]
    lines += ["## Results", "",
              "Accuracies in %, mean ± 95% CI over seeds (t-interval; one seed: no interval); `val reward acc`: "
              "reward accuracy on the clean validation pairs at the end of training; `val margin`: their mean "
              "beta * h (log-ratio margin) then, i.e. how far training moved the model (near 0, the losses' "
              "gradients are all the sigmoid loss's times a constant). One row per grid point.", "",
              results_table(sweep, found) if found["results"] or found["base"] else "No results yet.", ""]
    note = item_note(found)
    if note:
        lines += [note, ""]
    lines += audit_sections(sweep, found)
    lines += report_task.section(sweep, found)
    paired = versus_base_table(sweep, found)
    if paired:
        lines += ["## Against the base model", "",
                  "Each cell and seed against the base model on the same items: the difference in points and the "
                  "exact McNemar p-value of the items only one of them gets right, raw and Holm-adjusted over the "
                  "cells of this table (per metric; raw p-values below 0.05 are expected in about k / 20 of k "
                  "cells by chance alone).", "", paired, ""]
    if plots or plot_note:
        lines += ["## Plots", ""]
    for name in plots:
        text = next((t for k, t in PLOT_TEXT.items() if name.startswith(k)), "")
        lines += [text, "", f"![{name}]({name})", ""]
    if plot_note:
        lines += [plot_note, ""]
    lines += ["`summary.csv`: one row per finished cell and seed (and the base model)."]
    atomic_write_text(out / "REPORT.md", "\n".join(lines) + "\n")
    print(f"report: {out / 'REPORT.md'} ({len(found['results'])} of {len(sweep.cells)} cells finished"
          + (f", plots: {', '.join(plots)}" if plots else "") + ")")
    if plot_note:
        print(plot_note)
    return out
