"""The plots of `dpo report` (matplotlib, the `plots` extra): accuracy vs noise, the declared contrasts, the N x
noise heat map, training curves, accuracy on clean vs flipped training pairs, and the audit cells' estimates. Each
returns the file name it wrote, or None when the sweep has nothing to show for it."""

from pathlib import Path
from typing import NamedTuple

from dpo.core import stats
from dpo.core.files import pyplot, write_png
from dpo.core.metrics import EVAL
from dpo.study import report_audit, report_task
from dpo.study import sweep as sweeps
from dpo.study.results import COLUMNS, MAX_FACETS, TRAINED_ONLY, group_points, keys_of, metric, read_metrics


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


def running_mean(steps, values, window=None):
    import numpy as np

    if not values:
        return [], []
    window = window or max(1, min(20, len(values) // 5))
    smooth = np.convolve(np.asarray(values, dtype=float), np.ones(window) / window, mode="valid")
    return steps[window - 1:], smooth


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
            cis = [(p, stats.mean_ci([metric(r, m) for _, r in points[p]]))
                   for p in sorted(members, key=lambda p: dict(p)[x])]
            cis = [(p, c) for p, c in cis if c[0] is not None]  # a point no seed has a value for: no marker
            shift = (i - (len(lines) - 1) / 2) * dodge
            ax.errorbar([dict(p)[x] + shift for p, _ in cis], [c[0] for _, c in cis],
                        yerr=[c[1] or 0 for _, c in cis], marker="o", capsize=3, label=label_of(sweep, key))
        if found["base"] and metric(found["base"], m) is not None:
            base = metric(found["base"], m)
            ax.axhline(base, color="gray", linestyle="--", label="base model")
            stderr = found["base"]["eval"].get(m + "_stderr")
            if stderr:  # what the evaluation items alone can move an accuracy by
                ax.axhspan(base - 1.96 * stderr, base + 1.96 * stderr, color="gray", alpha=0.12,
                           label="base ± 1.96 item stderr")
        ax.set_xticks(sorted(set(xs)))  # ticks only where cells are: the side-by-side shifts are not values of x
        ax.set_xlabel(x if len(lines) == 1 else f"{x} (the series side by side at each value)")
        ax.set_ylabel(COLUMNS[m])
        ax.set_title(f"{COLUMNS[m]} vs {x} (mean, 95% CI over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # one legend for all panels, below them, so it hides no point
        more = [(h, la) for h, la in zip(*ax.get_legend_handles_labels()) if la not in labels]
        handles, labels = handles + [h for h, _ in more], labels + [la for _, la in more]
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(labels)),
               fontsize=8, frameon=False)
    return write_png(plt, fig, out / f"accuracy_vs_{x}.png")


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
            if mean is not None:  # else left blank
                grid[ns.index(s["n"]), noises.index(s["noise"])] = scale * mean
        base = metric(found["base"], m) if found["base"] and m not in TRAINED_ONLY else None
        stderr = found["base"]["eval"].get(m + "_stderr") if base is not None else None
        if stderr:  # colour = difference from the base model, the scale its 95% item sampling error
            reach = 100 * 1.96 * stderr
            image = ax.imshow(grid, origin="lower", cmap="RdBu_r", aspect="auto", vmin=100 * base - reach,
                              vmax=100 * base + reach)
            scale_note = (f"\ncolour: difference from the base model ({100 * base:.1f}), the scale its 95% "
                          f"item sampling error (±{reach:.1f})")
        else:
            image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
            scale_note = ""
        for i in range(len(ns)):
            for j in range(len(noises)):
                if not np.isnan(grid[i, j]):
                    r, g, b, _ = image.cmap(image.norm(grid[i, j]))
                    ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                    ax.text(j, i, f"{grid[i, j]:.{digits}f}", ha="center", va="center", color=ink, fontsize=8)
        rows, cols = np.linspace(0, len(ns) - 1, 200), np.linspace(0, len(noises) - 1, 200)
        clean = (np.interp(rows, range(len(ns)), ns)[:, None]
                 * (1 - np.interp(cols, range(len(noises)), noises))[None, :])
        levels = [v for v in sorted(set(ns)) if clean.min() < v < clean.max()]
        if levels:
            ax.contour(cols, rows, clean, levels=levels, colors="gray", linewidths=1, linestyles="dotted")
            for level in levels:  # label each line where it leaves the last column
                row = np.interp(level / (1 - noises[-1]), ns, range(len(ns))) if noises[-1] < 1 else -1
                if 0 <= row <= len(ns) - 1:
                    ax.text(len(noises) - 1.05, row + 0.04, f"{level:g} clean", color="gray", fontsize=6,
                            ha="center", va="bottom")
        ax.set_xticks(range(len(noises)), [sweeps.fmt(v) for v in noises])
        ax.set_yticks(range(len(ns)), [str(v) for v in ns])
        ax.set_xlabel("noise")
        ax.set_ylabel("N (pairs)")
        ax.set_title(f"{COLUMNS[m]}{unit}; dotted: equal clean pairs N (1 - noise)" + scale_note
                     + (f"\n{label_of(sweep, key)}" if key else ""), fontsize=9)
        fig.colorbar(image, ax=ax, label=f"{COLUMNS[m]}{unit}")
    return write_png(plt, fig, out / "heatmap_n_noise.png", layout=False)


def curves_by_facet(sweep, found):
    """facet label -> [(x value, [cells of every seed])], the x values in order."""
    x = x_axis(sweep)
    points = group_points(found["results"])
    facets = {}
    for key, members in series_of(sweep, list(points), x).items():
        chosen = sorted(((dict(p).get(x), [c for c, _ in points[p]]) for p in members),
                        key=lambda t: (t[0] is None, t[0]))
        facets[label_of(sweep, key)] = chosen
    return x, list(facets.items())[:MAX_FACETS]


def palette(plt, facets) -> dict:
    """One colour per x value across every facet, so that (say) noise=0.4 looks the same in each panel."""
    values = sorted({xv for _, chosen in facets for xv, _ in chosen}, key=lambda v: (v is None, v))
    cmap = plt.get_cmap("viridis")
    return {v: cmap(i / max(1, len(values) - 1) * 0.9) for i, v in enumerate(values)}


class Curves(NamedTuple):
    """A metric's curve over the seeds of some cells: at each step they all have, the mean, the lowest and the
    highest; past the last such step, each longer seed's own (steps, values)."""
    steps: list
    mean: list
    low: list
    high: list
    rest: tuple = ()


def seed_curves(sweep, cells, split: str, key: str, smooth: bool = True) -> Curves:
    """(steps, mean over the cells' seeds, min, max) of a metric's curve (running mean with smooth); the steps
    every seed has."""
    import numpy as np

    curves = []
    for cell in cells:
        rows = [r for r in read_metrics(sweeps.job_dir(sweep, cell.name) / "metrics.jsonl")
                if r["split"] == split and key in r]
        steps, values = [r["step"] for r in rows], [r[key] for r in rows]
        curves.append(dict(zip(*(running_mean(steps, values) if smooth else (steps, values)))))
    common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    if not common:
        return Curves([], [], [], [])
    table = np.array([[c[s] for s in common] for c in curves])
    rest = [([s for s in c if s >= common[-1]], [c[s] for s in c if s >= common[-1]]) for c in curves]
    return Curves(common, table.mean(0), table.min(0), table.max(0), [r for r in rest if len(r[0]) > 1])


KEY = "line: mean over seeds, band: their range, thin line: a seed past the shortest one's last step"


def band(ax, curve: Curves, color, label, style="-"):
    """The mean as a line, the range as a band; a seed that runs longer than the others goes on as a thin line."""
    ax.plot(curve.steps, curve.mean, color=color, linestyle=style, label=label)
    if len(curve.steps):
        ax.fill_between(curve.steps, curve.low, curve.high, color=color, alpha=0.15, linewidth=0)
    for steps, values in curve.rest:
        ax.plot(steps, values, color=color, linestyle=style, linewidth=0.6, alpha=0.6)


def seeds_of(cells) -> str:
    return ("seeds " if len(cells) > 1 else "seed ") + ", ".join(str(c.seed) for c in cells)


def plot_training(plt, sweep, found, out: Path):
    """Train loss (running mean) vs step, and validation reward accuracy: mean over seeds, band min to max. A cell
    validated only once (at the end) is a dot per seed at its x value instead of a curve."""
    x, facets = curves_by_facet(sweep, found)
    if not facets:
        return None
    fig, axes = plt.subplots(len(facets), 2, figsize=(11, 3.2 * len(facets)), squeeze=False)
    shade = palette(plt, facets)
    for (label, chosen), (ax_loss, ax_val) in zip(facets, axes):
        once = all(len(seed_curves(sweep, [c], EVAL, "rewards/accuracies", smooth=False)[0]) <= 1
                   for _, cells in chosen for c in cells)
        for i, (xv, cells) in enumerate(chosen):
            color, name = shade[xv], (f"{x}={sweeps.fmt(xv)}" if x else cells[0].name)
            band(ax_loss, seed_curves(sweep, cells, "train", "loss"), color, f"{name} ({seeds_of(cells)})")
            if once:
                finals = [r for c in cells for r in seed_curves(sweep, [c], EVAL, "rewards/accuracies", False)[1]]
                ax_val.plot([i] * len(finals), finals, "o", color=color, alpha=0.6, markersize=4)
                if finals:
                    ax_val.plot([i - 0.2, i + 0.2], [sum(finals) / len(finals)] * 2, color=color, linewidth=2)
            else:
                band(ax_val, seed_curves(sweep, cells, EVAL, "rewards/accuracies", smooth=False), color,
                     f"{name} ({seeds_of(cells)})")
        ax_loss.set_title(f"train loss (running mean over steps); {label}\n{KEY}", fontsize=9)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss")
        ax_loss.legend(fontsize=7)
        if once:
            ax_val.set_xticks(range(len(chosen)), [f"{x}={sweeps.fmt(xv)}" if x else "" for xv, _ in chosen])
            ax_val.set_title(f"validation reward accuracy at the end of training (validated once)\n"
                             f"dot: a seed, bar: their mean; {label}", fontsize=9)
        else:
            ax_val.set_xlabel("step")
            ax_val.set_title(f"validation reward accuracy; {label}\n{KEY}", fontsize=9)
            ax_val.legend(fontsize=7)
        ax_val.set_ylabel("reward accuracy (clean pairs)")
        for ax in (ax_loss, ax_val):
            ax.grid(alpha=0.3)
    return write_png(plt, fig, out / "training_curves.png")


def plot_clean_vs_flipped(plt, sweep, found, out: Path):
    """How often the policy prefers the *true* answer on clean (solid) and on flipped (dashed) training pairs:
    running mean over steps, mean and range over seeds."""
    x, facets = curves_by_facet(sweep, found)
    if not facets:
        return None
    fig, axes = plt.subplots(len(facets), 1, figsize=(8, 3.4 * len(facets)), squeeze=False)
    shade = palette(plt, facets)
    for (label, chosen), (ax,) in zip(facets, axes):
        for xv, cells in chosen:
            color = shade[xv]
            name = f"{x}={sweeps.fmt(xv)}" if x else cells[0].name
            for kind, style in (("clean", "-"), ("flipped", "--")):
                curve = seed_curves(sweep, cells, "train", f"true_accuracy/{kind}")
                if len(curve[0]):
                    band(ax, curve, color, f"{name}, {kind} pairs ({seeds_of(cells)})", style)
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
        ax.set_title(f"training pairs: reward accuracy against the true label (running mean over steps)\n"
                     f"{label}; {KEY}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("prefers the true answer")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return write_png(plt, fig, out / "clean_vs_flipped.png")


def plot_contrasts(plt, sweep, found, out: Path):
    """The [[contrast]] comparisons: each seed's A − B (dots), their mean with its 95% t interval over seeds, and
    the interval with seeds and items both random (report_task.contrast_rows)."""
    rows = report_task.contrast_rows(sweep, found) if sweep.contrasts else []
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.8 * len(rows) + 1.6))
    for k, r in enumerate(rows):
        y = len(rows) - 1 - k
        ax.scatter(r["diffs"], [y + 0.12] * len(r["diffs"]), s=18, color="C0", zorder=3,
                   label="each seed" if k == 0 else None)
        if r["mean"].half is not None:
            ax.errorbar(r["mean"].mean, y + 0.12, xerr=r["mean"].half, fmt="|", ms=12, mew=2, color="C0", capsize=3,
                        label="mean, 95% CI over seeds" if k == 0 else None)
        if r["crossed"] is not None:
            crossed = r["crossed"]
            ax.errorbar(100 * crossed.mean, y - 0.12, xerr=100 * crossed.half, fmt="s", ms=4, color="C1", capsize=3,
                        label="95% CI, seeds and items both random" if k == 0 else None)
    ax.axvline(0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["contrast"].label() for r in reversed(rows)], fontsize=8)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel(f"{report_task.METRIC}: A − B within seed (points)")
    ax.set_title("contrasts: cell A against cell B of the same seed", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1 - 0.25 / len(rows)), ncol=3)
    return write_png(plt, fig, out / "contrasts.png")


class Plots(NamedTuple):
    files: list  # the file names written
    note: str  # why plots were skipped, or ""


def make_plots(sweep, found, out: Path) -> Plots:
    """The plots of a report, into out."""
    plt = pyplot()
    if plt is None:
        return Plots([], "Plots skipped: matplotlib is not installed. Install it with `.venv/bin/pip install -e "
                         "'.[plots]'` (or `make report`, which does), then rerun the report.")
    if not found["results"] and not found["audits"]:
        return Plots([], "Plots skipped: no cell has finished yet.")
    written = []
    for plot in (plot_accuracy, plot_contrasts, plot_heatmap, plot_training, plot_clean_vs_flipped):
        name = plot(plt, sweep, found, out)
        if name:
            written.append(name)
    if found["audits"]:
        written.append(report_audit.plot_audits(plt, found["audits"], out))
    return Plots(written, "")


PLOT_TEXT = {
    "accuracy_vs": "Accuracy, and reward accuracy on the clean validation pairs, vs noise (mean and 95% CI over "
                   "seeds; dashed: the base model; grey band: the base model's 95% sampling error over the "
                   "evaluation items).",
    "heatmap_n_noise": "HellaSwag accuracy (mc_acc, else acc_norm), clean-validation reward accuracy and margin "
                       "over N x noise (mean over seeds); dotted lines join cells with the same number of clean "
                       "pairs N (1 - noise).",
    "contrasts": "The sweep file's contrasts: each seed's difference A − B on the same items (dots), their mean "
                 "with a 95% t interval over seeds, and the 95% interval with seeds and items both random (squares; "
                 "the table above).",
    "training_curves": "Training curves of one seed per noise level.",
    "audit_estimates": "Noise-rate estimates (95% intervals) of the audit cells against the true flip rate, and "
                       "the AUROC of the reference score as a flip detector.",
    "clean_vs_flipped": "Reward accuracy against the true label on clean (solid) and flipped (dashed) training "
                        "pairs: above 0.5 on flipped pairs the model still prefers the true answer, below it has "
                        "learnt the flipped label.",
}
