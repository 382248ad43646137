"""`dpo report SWEEP.toml`: tables and plots of whatever a sweep has finished, into results_dir/<sweep>/.

REPORT.md    what was run (model, sizes, seeds, losses, hours), which cells are missing or failed, and per grid
             point the mean ± 95% CI over seeds (t-interval; one seed: no CI) of mc_acc, acc, acc_norm and the
             final reward accuracy on the clean validation pairs, with the base model as a row
summary.csv  one row per finished cell (and the base model)
*.png        with matplotlib (the `plots` extra): accuracy vs noise, an N x noise heat map (sweeps over both),
             training curves, reward accuracy on clean vs flipped training pairs

Reads only runs_dir/<sweep>/*/result.json and metrics.jsonl: no torch, no model. The folder is meant to be
committed: small files only.
"""

import csv
import io
import json
import math
import statistics
from pathlib import Path

from dpo import report_audit, stats
from dpo import sweep as sweeps
from dpo.files import atomic_write_bytes, atomic_write_text

ACCURACIES = ("mc_acc", "acc", "acc_norm")
COLUMNS = {"mc_acc": "mc_acc", "acc": "acc", "acc_norm": "acc_norm", "val_reward_accuracy": "val reward acc",
           "val_margin": "val margin"}
TRAINED_ONLY = ("val_reward_accuracy", "val_margin")  # no value for the base model
MAX_FACETS = 8


# ------------------------------------------------------------------------------------------------------ numbers

def metric(result: dict, key: str):
    if key == "val_reward_accuracy":
        return result.get("val_reward_accuracy")
    if key == "val_margin":  # mean beta * h on the clean validation pairs: how far training moved the model
        return ((result.get("train_summary") or {}).get("val") or {}).get("rewards/margin")
    return result.get("eval", {}).get(key)


def pct(mean, half=None) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.1f}" + (f" ± {100 * half:.1f}" if half is not None else "")


def shown_value(key: str, mean, half=None) -> str:
    if key != "val_margin" or mean is None:
        return pct(mean, half)
    return f"{mean:.3f}" + (f" ± {half:.3f}" if half is not None else "")


# ------------------------------------------------------------------------------------------------- collecting

def collect(sweep) -> dict:
    """Finished results of the sweep's cells, the base model's, and what is missing, failed or under way."""
    found = {"results": [], "base": None, "missing": [], "failed": [], "partial": [],
             "audits": report_audit.collect_audits(sweep)}
    for name in [sweeps.BASE] + [c.name for c in sweep.cells]:
        state = sweeps.status(sweep, name)
        folder = sweeps.job_dir(sweep, name)
        if state == "done":
            result = json.loads((folder / "result.json").read_text())
            if name == sweeps.BASE:
                found["base"] = result
            else:
                found["results"].append((next(c for c in sweep.cells if c.name == name), result))
        elif state == "failed":
            lines = [ln for ln in (folder / "error.log").read_text().splitlines() if ln.strip()]
            found["failed"].append((name, lines[-1] if lines else "?"))
        else:
            found[state].append(name)
    return found


def point_of(cell) -> tuple:
    return tuple(cell.settings.items())


def group_points(results, sweep=None) -> dict:
    """grid point (the cell's settings without the seed) -> its finished (cell, result)s; in sweep order, or
    with `sweep` sorted for a table: text values in grid order, numbers by value (extra cells among the rest)."""
    points = {}
    for cell, result in results:
        points.setdefault(point_of(cell), []).append((cell, result))
    if sweep is None:
        return points

    def order(point):
        out = []
        for k, v in point:
            listed = sweep.grid.get(k, [])
            out.append((0, float(v)) if isinstance(v, (int, float)) else (0, listed.index(v)) if v in listed
                       else (1, str(v)))
        return out

    return dict(sorted(points.items(), key=lambda item: order(item[0])))


def keys_of(points) -> list:
    keys = []
    for point in points:
        keys += [k for k, _ in point if k not in keys]
    return keys


# ------------------------------------------------------------------------------------------------------ tables

def what_was_run(sweep, found) -> list:
    data, train, ev = sweep.data, sweep.train, sweep.eval

    def values(key):
        return ", ".join(sweeps.fmt(v) for v in sweep.grid[key]) if key in sweep.grid else None

    n = values("n") or str(data.n)
    losses = list(dict.fromkeys(c.settings.get("loss", train.loss) for c in sweep.cells))
    eps = values("eps")
    if sweep.grid.get("eps") == ["noise"]:
        eps = "equal to the cell's noise"
    length = f"{train.max_steps} steps" if train.max_steps else f"{train.epochs} epoch(s)"
    val_pairs = train.val_size or data.eval_size
    items = ev.limit or data.eval_size
    results = [r for _, r in found["results"]] + ([found["base"]] if found["base"] else [])
    hours = sum(r.get("seconds", {}).get("total", 0.0) for r in results) / 3600
    own_seed = sum("val_seed" not in r for _, r in found["results"])  # cells run before the eval_seed rule
    held_out = (f"drawn with seed {sweep.eval_seed} for every cell" if not own_seed else
                f"drawn with each cell's own seed for {own_seed} cells run before validation pairs followed "
                f"eval_seed (seed {sweep.eval_seed})")
    lines = [f"- model: `{sweep.model}`",
             f"- training pairs N: {n} ({data.format} format, {data.fewshot} few-shot example(s) per prompt), "
             f"noise: {values('noise') or sweeps.fmt(data.noise)}",
             f"- losses: {', '.join(losses)}, beta {sweeps.fmt(train.beta)}"
             + (f", eps: {eps or sweeps.fmt(train.eps)}" if {"cdpo", "rdpo"} & set(losses) else ""),
             f"- training: {length} per cell, {train.step_pairs()} pairs per step, learning rate "
             f"{sweeps.fmt(train.learning_rate)}, warmup "
             f"{train.warmup_steps}, {train.lr_scheduler_type}",
             f"- validation: the first {val_pairs} clean validation pairs (reward accuracy at the end of training), "
             + held_out,
             f"- evaluation: {items} HellaSwag validation items (val[{data.eval_start}:{data.eval_start + items}]), "
             f"metrics {ev.metrics}, mc prompts drawn with seed {sweep.eval_seed} for every cell and the base model",
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


def status_text(sweep, found) -> str:
    out = []
    if found["base"] is None:
        out.append(f"base model: not scored ({sweeps.status(sweep, sweeps.BASE)})")
    for name, line in found["failed"]:
        out.append(f"failed   {name}: {line}")
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
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def item_note(found) -> str:
    """How much of a difference the evaluation items alone can make (the same items for every cell)."""
    any_result = found["base"] or (found["results"][0][1] if found["results"] else None)
    if not any_result:
        return ""
    ev = any_result["eval"]
    parts = [f"{m} {100 * 1.96 * ev[m + '_stderr']:.1f}" for m in ACCURACIES if m + "_stderr" in ev]
    text = (f"Every cell and the base model are scored on the same {ev.get('n', '?')} items with the same prompts, "
            "so the intervals above are over training seeds only; the sampling error of the items themselves "
            f"(1.96 x standard error, in points) is about: {', '.join(parts)}.")
    val = [(r["train"].get("val_size"), r["val_reward_accuracy"]) for _, r in found["results"]
           if r.get("val_reward_accuracy") is not None and r.get("train", {}).get("val_size")]
    if val:  # the validation pairs are the same for every cell of a seed (their rejected endings are seeded)
        n, acc = val[0][0], statistics.fmean(a for _, a in val)
        text += (f" The {n} clean validation pairs are the same for every cell with the same seed; at "
                 f"{100 * acc:.0f} % reward accuracy their sampling error is about "
                 f"{100 * 1.96 * math.sqrt(acc * (1 - acc) / n):.1f} points.")
    return text


def read_predictions(folder: Path):
    path = folder / "eval" / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else None


def versus_base_table(sweep, found) -> str:
    """Every finished cell against the base model on the same items: the difference in points and the exact
    McNemar p-value (uncorrected for the number of cells)."""
    base = read_predictions(sweeps.job_dir(sweep, sweeps.BASE)) if found["base"] else None
    if not base:
        return ""
    shown = [m for m, field in stats.ACCURACIES.items() if field in base[0]]
    base_ids = [r["id"] for r in base]
    rows = []
    for members in group_points(found["results"], sweep).values():
        for cell, _ in members:
            records = read_predictions(sweeps.job_dir(sweep, cell.name))
            if not records or [r["id"] for r in records] != base_ids:
                continue
            row = [cell.name]
            for m in shown:
                a, b = stats.correct(base, m), stats.correct(records, m)
                row.append(f"{100 * (stats.accuracy(b) - stats.accuracy(a)):+.1f} (p {stats.mcnemar(a, b):.2g})")
            rows.append(row)
    if not rows:
        return ""
    head = ["cell"] + [f"{m} − base (McNemar p)" for m in shown]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


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
                (summary.get("val") or {}).get("loss", ""),
                summary.get("steps", ""), summary.get("pairs_trained", ""), seconds.get("train", ""),
                seconds.get("eval", ""), seconds.get("total", "")]
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------- plots

def x_axis(sweep):
    """The x axis of the accuracy plot: noise when the grid varies it, else its first numeric axis."""
    if "noise" in sweep.grid:
        return "noise"
    for key, values in sweep.grid.items():
        if len(values) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return key
    return None


def series_of(sweep, points, x, drop=()) -> dict:
    """Points grouped into lines: by their settings other than x (and `drop`), leaving out keys tied to x in
    the grid where the tie holds (eps = noise) and keys that are the same for every point."""
    keys = keys_of(points)
    constant = {k for k in keys if len({dict(p).get(k) for p in points}) == 1}
    tied = {k for k, v in sweep.grid.items() if v == [x]}
    out = {}
    for point in points:
        s = dict(point)
        key = tuple((k, v) for k, v in point if k != x and k not in drop and k not in constant
                    and not (k in tied and s.get(x) == v))
        out.setdefault(key, []).append(point)
    return out


def label_of(sweep, key) -> str:
    return ", ".join(f"{k}={sweeps.fmt(v)}" for k, v in key) or sweep.train.loss


def read_metrics(path: Path) -> list:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a kill
            continue
    return rows


def running_mean(steps, values, window=None):
    import numpy as np

    if not values:
        return [], []
    window = window or max(1, min(20, len(values) // 5))
    smooth = np.convolve(np.asarray(values, dtype=float), np.ones(window) / window, mode="valid")
    return steps[window - 1:], smooth


def save(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")  # the results folder is committed: keep it small
    atomic_write_bytes(path, buf.getvalue())
    return path.name


def plot_accuracy(plt, sweep, found, out: Path):
    x = x_axis(sweep)
    points = group_points(found["results"])
    shown = [m for m in ("mc_acc", "acc_norm", "val_reward_accuracy")
             if any(metric(r, m) is not None for _, r in found["results"])]
    if x is None or not points or not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4), squeeze=False)
    lines = series_of(sweep, list(points), x)
    xs = [dict(p)[x] for p in points]
    dodge = 0.008 * ((max(xs) - min(xs)) or 1)  # lines side by side, so equal values stay visible
    for ax, m in zip(axes[0], shown):
        for i, (key, members) in enumerate(lines.items()):
            members = sorted(members, key=lambda p: dict(p)[x])
            cis = [stats.mean_ci([metric(r, m) for _, r in points[p]]) for p in members]
            shift = (i - (len(lines) - 1) / 2) * dodge
            ax.errorbar([dict(p)[x] + shift for p in members], [c[0] for c in cis],
                        yerr=[c[1] or 0 for c in cis], marker="o", capsize=3, label=label_of(sweep, key))
        if found["base"] and metric(found["base"], m) is not None:
            base = metric(found["base"], m)
            ax.axhline(base, color="gray", linestyle="--", label="base model")
            stderr = found["base"]["eval"].get(m + "_stderr")
            if stderr:  # what the evaluation items alone can move an accuracy by
                ax.axhspan(base - 1.96 * stderr, base + 1.96 * stderr, color="gray", alpha=0.12,
                           label="base ± 1.96 item stderr")
        ax.set_xlabel(x)
        ax.set_ylabel(m)
        ax.set_title(f"{m} vs {x} (mean, 95% CI over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    name = save(fig, out / f"accuracy_vs_{x}.png")
    plt.close(fig)
    return name


def plot_heatmap(plt, sweep, found, out: Path):
    """The first accuracy the eval has (mc_acc, else acc_norm, else acc), the clean-validation reward accuracy and
    margin over N x noise, with lines of equal clean pair count N (1 - noise)."""
    import numpy as np

    if not all(len(sweep.grid.get(k, [])) > 1 for k in ("n", "noise")):
        return None
    has = [m for m in ("mc_acc", "acc_norm", "acc", *TRAINED_ONLY)
           if any(metric(r, m) is not None for _, r in found["results"])]
    shown = [m for m in has if m not in TRAINED_ONLY][:1] + [m for m in has if m in TRAINED_ONLY]
    points = group_points([(c, r) for c, r in found["results"] if not c.extra])
    if not shown or not points:
        return None
    ns, noises = sorted(sweep.grid["n"]), sorted(sweep.grid["noise"])
    facets = list(series_of(sweep, list(points), "noise", drop=("n",)).items())
    panels = [(key, members, m) for key, members in facets for m in shown][:MAX_FACETS]
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (1.3 * len(noises) + 2.5), 0.6 * len(ns) + 2.5),
                             squeeze=False)
    for ax, (key, members, m) in zip(axes[0], panels):
        scale, unit, digits = (1, "", 3) if m == "val_margin" else (100, " (%)", 1)
        grid = np.full((len(ns), len(noises)), np.nan)
        for p in members:
            s = dict(p)
            mean = stats.mean_ci([metric(r, m) for _, r in points[p]])[0]
            grid[ns.index(s["n"]), noises.index(s["noise"])] = scale * mean
        image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        for i in range(len(ns)):
            for j in range(len(noises)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.{digits}f}", ha="center", va="center", color="white", fontsize=8)
        rows, cols = np.linspace(0, len(ns) - 1, 200), np.linspace(0, len(noises) - 1, 200)
        clean = (np.interp(rows, range(len(ns)), ns)[:, None]
                 * (1 - np.interp(cols, range(len(noises)), noises))[None, :])
        levels = [v for v in sorted(set(ns)) if clean.min() < v < clean.max()]
        if levels:
            ax.contour(cols, rows, clean, levels=levels, colors="white", linewidths=1, linestyles="dotted")
            for level in levels:  # label each line where it leaves the last column
                row = np.interp(level / (1 - noises[-1]), ns, range(len(ns))) if noises[-1] < 1 else -1
                if 0 <= row <= len(ns) - 1:
                    ax.text(len(noises) - 1.05, row + 0.04, f"{level:g} clean", color="white", fontsize=6,
                            ha="center", va="bottom")
        ax.set_xticks(range(len(noises)), [sweeps.fmt(v) for v in noises])
        ax.set_yticks(range(len(ns)), [str(v) for v in ns])
        ax.set_xlabel("noise")
        ax.set_ylabel("N (pairs)")
        ax.set_title(f"{COLUMNS[m]}{unit}; dotted: equal clean pairs N (1 - noise)"
                     + (f"\n{label_of(sweep, key)}" if key else ""), fontsize=9)
        fig.colorbar(image, ax=ax, label=f"{COLUMNS[m]}{unit}")
    name = save(fig, out / "heatmap_n_noise.png")
    plt.close(fig)
    return name


def curves_by_facet(sweep, found):
    """facet label -> [(x value, cell)] of one seed per x value (the first seed that finished)."""
    x = x_axis(sweep)
    points = group_points(found["results"])
    facets = {}
    for key, members in series_of(sweep, list(points), x).items():
        chosen = sorted(((dict(p).get(x), points[p][0][0]) for p in members), key=lambda t: (t[0] is None, t[0]))
        facets[label_of(sweep, key)] = chosen
    return x, list(facets.items())[:MAX_FACETS]


def colors(plt, n):
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(1, n - 1) * 0.9) for i in range(n)]


def plot_training(plt, sweep, found, out: Path):
    """Train loss (running mean) and validation reward accuracy vs step, one seed per noise level."""
    x, facets = curves_by_facet(sweep, found)
    if not facets:
        return None
    fig, axes = plt.subplots(len(facets), 2, figsize=(11, 3.2 * len(facets)), squeeze=False)
    for (label, chosen), (ax_loss, ax_val) in zip(facets, axes):
        for color, (xv, cell) in zip(colors(plt, len(chosen)), chosen):
            rows = read_metrics(sweeps.job_dir(sweep, cell.name) / "metrics.jsonl")
            train = [r for r in rows if r["split"] == "train"]
            val = [r for r in rows if r["split"] == "val" and "rewards/accuracy" in r]
            name = f"{x}={sweeps.fmt(xv)}" if x else cell.name
            steps, smooth = running_mean([r["step"] for r in train], [r["loss"] for r in train])
            ax_loss.plot(steps, smooth, color=color, label=f"{name} (seed {cell.seed})")
            ax_val.plot([r["step"] for r in val], [r["rewards/accuracy"] for r in val], color=color, marker="o",
                        markersize=3, label=f"{name} (seed {cell.seed})")
        ax_loss.set_title(f"train loss, running mean: {label}", fontsize=9)
        ax_val.set_title(f"validation reward accuracy (clean pairs): {label}", fontsize=9)
        for ax in (ax_loss, ax_val):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    name = save(fig, out / "training_curves.png")
    plt.close(fig)
    return name


def plot_clean_vs_flipped(plt, sweep, found, out: Path):
    """How often the policy prefers the *true* answer on clean (solid) and on flipped (dashed) training pairs."""
    x, facets = curves_by_facet(sweep, found)
    if not facets:
        return None
    fig, axes = plt.subplots(len(facets), 1, figsize=(7, 3.2 * len(facets)), squeeze=False)
    for (label, chosen), (ax,) in zip(facets, axes):
        for color, (xv, cell) in zip(colors(plt, len(chosen)), chosen):
            train = [r for r in read_metrics(sweeps.job_dir(sweep, cell.name) / "metrics.jsonl")
                     if r["split"] == "train"]
            name = f"{x}={sweeps.fmt(xv)}" if x else cell.name
            for kind, style in (("clean", "-"), ("flipped", "--")):
                have = [r for r in train if f"true_accuracy/{kind}" in r]
                steps, smooth = running_mean([r["step"] for r in have], [r[f"true_accuracy/{kind}"] for r in have])
                if len(steps):
                    ax.plot(steps, smooth, color=color, linestyle=style, label=f"{name}, {kind} pairs")
        ax.set_title(f"reward accuracy vs the true label (running mean): {label}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    name = save(fig, out / "clean_vs_flipped.png")
    plt.close(fig)
    return name


def audit_sections(sweep, found) -> list:
    """The audit cells' table and the paired comparisons, for sweeps that have them (dpo/report_audit.py)."""
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
                      "same validation pairs, an exact McNemar test over (seed, pair) units. Holm-adjusted p-values "
                      "(over all rows of the column) in parentheses.", "", paired, ""]
    return lines


def make_plots(sweep, found, out: Path) -> tuple:
    """(file names written, a note when plots were skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ("Plots skipped: matplotlib is not installed. Install it with `.venv/bin/pip install -e "
                    "'.[plots]'` (or `make report`, which does), then rerun the report.")
    if not found["results"] and not found["audits"]:
        return [], "Plots skipped: no cell has finished yet."
    written = []
    for plot in (plot_accuracy, plot_heatmap, plot_training, plot_clean_vs_flipped):
        name = plot(plt, sweep, found, out)
        if name:
            written.append(name)
    if found["audits"]:
        written.append(report_audit.plot_audits(plt, found["audits"], out, save))
    return written, ""


# ------------------------------------------------------------------------------------------------------ report

PLOT_TEXT = {
    "accuracy_vs": "Accuracy, and reward accuracy on the clean validation pairs, vs noise (mean and 95% CI over "
                   "seeds; dashed: the base model; grey band: the base model's 95% sampling error over the "
                   "evaluation items).",
    "heatmap_n_noise": "HellaSwag accuracy (mc_acc, else acc_norm), clean-validation reward accuracy and margin "
                       "over N x noise (mean over seeds); dotted lines join cells with the same number of clean "
                       "pairs N (1 - noise).",
    "training_curves": "Training curves of one seed per noise level.",
    "audit_estimates": "Noise-rate estimates (95% intervals) of the audit cells against the true flip rate, and "
                       "the AUROC of the reference score as a flip detector.",
    "clean_vs_flipped": "Reward accuracy against the true label on clean (solid) and flipped (dashed) training "
                        "pairs: above 0.5 on flipped pairs the model still prefers the true answer, below it has "
                        "learnt the flipped label.",
}


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
    paired = versus_base_table(sweep, found)
    if paired:
        lines += ["## Against the base model", "",
                  "Each cell and seed against the base model on the same items: the difference in points and the "
                  "exact McNemar p-value of the items only one of them gets right. Uncorrected: among k cells, "
                  "about k / 20 fall below 0.05 by chance alone.", "", paired, ""]
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
