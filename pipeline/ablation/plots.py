"""The figures of a sweep (matplotlib, Agg backend, PNG), drawn from `pipeline.ablation.results.SweepResults`.

    heatmap_overall.png   fuser x layer set: overall accuracy (mean ± std over seeds); invalid and unfinished cells marked
    categories.png        accuracy per task category, one bar per (fuser, layer set), std as error bars, majority ticks
    layer_probe.png       the layer-probe study: accuracy per hidden state per category, raw and normalised per category
    igva_weights.png      IGVA's per-sample group weights on the evaluation split, a box per group per category
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from layerfuse.pipeline.ablation.results import Arm, SweepResults, layer_probe_table
from layerfuse.pipeline.ablation.sweep import STUDY_LAYERS


def _pyplot():
    # imported on first use: pyplot is slow to import (seconds), and only a report that draws a figure needs it
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def draw_plots(res: SweepResults, folder: Path) -> list[Path]:
    """Every plot the results support; returns the files written (stale ones from earlier reports are removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn in (("heatmap_overall.png", heatmap_overall), ("categories.png", category_bars), ("layer_probe.png", layer_probe),
                     ("igva_weights.png", igva_weights)):
        path = folder / name
        if fn(res, path):
            written.append(path)
        elif path.exists():
            path.unlink()
    return written


def _sweep_arms(res: SweepResults) -> list[Arm]:
    return [a for a in res.arms if a.study != STUDY_LAYERS]


def heatmap_overall(res: SweepResults, path: Path) -> bool:
    arms = _sweep_arms(res)
    if not any(a.overall.mean is not None for a in arms):
        return False
    plt = _pyplot()
    fusers = list(dict.fromkeys(a.fuser for a in arms))
    layers = list(dict.fromkeys(a.layers for a in arms))
    grid = np.full((len(fusers), len(layers)), np.nan)
    cell = {(a.fuser, a.layers): a for a in arms}
    for a in arms:
        if a.overall.mean is not None:
            grid[fusers.index(a.fuser), layers.index(a.layers)] = a.overall.mean
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(layers), 1.2 + 0.75 * len(fusers)), constrained_layout=True)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#e6e6e6")
    finite = grid[np.isfinite(grid)]
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=float(finite.min()), vmax=float(max(finite.max(), finite.min() + 1e-6)),
                   aspect="auto")
    mid = (finite.min() + finite.max()) / 2
    for i, f in enumerate(fusers):
        for j, l in enumerate(layers):
            a = cell.get((f, l))
            if a is None:
                continue
            if a.status == "invalid":
                text, colour = "invalid", "#777777"
            elif a.overall.mean is None:
                text, colour = "pending", "#777777"
            else:
                text = f"{a.overall.mean:.3f}" + (f"\n± {a.overall.std:.3f}" if a.overall.std is not None else "")
                text += "" if a.status == "done" else f"\n({len(a.seeds_done)}/{len(a.seeds)} seeds)"
                colour = "black" if a.overall.mean > mid else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color=colour)
    ax.set_xticks(range(len(layers)), labels=layers)
    ax.set_yticks(range(len(fusers)), labels=fusers)
    ax.set_xlabel("layer set")
    ax.set_ylabel("fuser")
    ax.set_title(f"Overall accuracy on {res.sweep['questions']['eval_split']} ({res.sweep['settings']['mode']} mode)")
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def category_bars(res: SweepResults, path: Path) -> bool:
    arms = [a for a in _sweep_arms(res) if a.overall.mean is not None]
    if not arms:
        return False
    plt = _pyplot()
    cats = res.categories + ["overall"]
    n = len(arms)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(min(16.0, 3.0 + 0.16 * n * len(cats)), 5.0), constrained_layout=True)
    colours = plt.get_cmap("tab20" if n > 10 else "tab10")
    x = np.arange(len(cats))
    for k, a in enumerate(arms):
        stats = [a.per_category.get(c) for c in res.categories] + [a.overall]
        means = [s.mean if s is not None and s.mean is not None else 0.0 for s in stats]
        errs = [s.std if s is not None and s.std is not None else 0.0 for s in stats]
        ax.bar(x - 0.4 + width * (k + 0.5), means, width, yerr=errs, capsize=2, label=a.name, color=colours(k % colours.N),
               error_kw={"elinewidth": 0.8})
    majority = [res.majority.get(c) for c in res.categories]
    for i, m in enumerate(majority):
        if m is not None:
            ax.hlines(m, i - 0.45, i + 0.45, colors="black", linestyles="--", linewidth=1, label="majority baseline" if i == 0 else None)
    tops = [s.mean + (s.std or 0.0) for a in arms for s in [*a.per_category.values(), a.overall] if s.mean is not None]
    tops += [m for m in majority if m is not None]
    ax.set_xticks(x, labels=cats)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, min(1.0, 1.15 * max(tops)) if tops and max(tops) > 0 else 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Accuracy per task category (mean ± std over seeds, {res.sweep['questions']['eval_split']})")
    ax.legend(fontsize=8, ncol=2 if n > 6 else 1, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def layer_probe(res: SweepResults, path: Path) -> bool:
    table = layer_probe_table(res)
    if not table or not table["layers"]:
        return False
    plt = _pyplot()
    layers = table["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained", sharex=True)
    colours = plt.get_cmap("tab10")
    for k, c in enumerate(table["categories"]):
        for ax, key in zip(axes, ("raw", "normalised")):
            ys = [np.nan if v is None else v for v in table[key][c]]
            ax.plot(layers, ys, marker="o", markersize=3, color=colours(k % 10), label=c)
    axes[0].plot(layers, [np.nan if v is None else v for v in table["overall"]], color="black", linestyle="--", linewidth=1.5, label="overall")
    for ax, title in zip(axes, ("accuracy", "normalised per category (÷ best layer)")):
        ax.set_xlabel("hidden state hs[i] (0 = embeddings)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].set_ylim(0, 1.05)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside right upper", frameon=False)
    fig.suptitle(f"Layer probe: one single-layer probe per hidden state ({res.sweep['questions']['eval_split']})")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def igva_weights(res: SweepResults, path: Path) -> bool:
    arms = [a for a in res.arms if a.igva_weights]
    if not arms:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(arms), 1, figsize=(max(7.0, 1.5 * len(res.categories)), 3.4 * len(arms)), constrained_layout=True,
                             squeeze=False)
    colours = plt.get_cmap("Set2")
    for ax, a in zip(axes[:, 0], arms):
        w = np.asarray(a.igva_weights["weights"])
        c = np.asarray(a.igva_weights["categories"])
        groups = a.igva_weights["groups"]
        k = len(groups)
        cats = [cat for cat in res.categories if (c == cat).any()]
        span = 0.8 / k
        for g in range(k):
            data = [w[c == cat, g] for cat in cats]
            pos = np.arange(len(cats)) - 0.4 + span * (g + 0.5)
            bp = ax.boxplot(data, positions=pos, widths=span * 0.85, patch_artist=True, showfliers=False, manage_ticks=False)
            for box in bp["boxes"]:
                box.set_facecolor(colours(g % 8))
            for med in bp["medians"]:
                med.set_color("black")
            ax.plot([], [], color=colours(g % 8), linewidth=8, label=f"group {groups[g]}")
        ax.axhline(1.0 / k, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(cats)), labels=cats)
        ax.set_ylabel("weight")
        ax.set_title(f"IGVA `{a.layers}`: per-sample group weights on {res.sweep['questions']['eval_split']} "
                     f"({len(a.seeds_done)} seed(s) pooled; dotted = uniform 1/{k})")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
