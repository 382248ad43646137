"""The plots of `dpo report` (matplotlib, the `plots` extra): accuracy vs noise, the N x noise heat map, training
curves, accuracy on clean vs flipped training pairs, and the audit cells' estimates. Each returns the file name it
wrote, or None when the sweep has nothing to show for it."""

import io
from pathlib import Path

from dpo import report_audit, stats
from dpo import sweep as sweeps
from dpo.files import atomic_write_bytes
from dpo.results import COLUMNS, MAX_FACETS, TRAINED_ONLY, group_points, keys_of, metric, read_metrics


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
