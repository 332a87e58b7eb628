"""Figures, written headless (matplotlib's Agg backend)."""


def figure(width=8, height=4.5, columns=1, **options):
    """`(fig, axes)`: a new figure with `columns` side by side (`options`
    go to `plt.subplots`, e.g. `sharey`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width, height), **options)


def save(fig, path, dpi=110):
    """Writes `fig` to `path` and frees it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def loss_curves(curves, path, ylabel="training loss", width=7, height=4):
    """One moving-mean line per `{label: per-step losses}`, written to `path`."""
    import numpy as np

    fig, ax = figure(width, height)
    window = 1
    for label, losses in curves.items():
        losses = np.asarray(losses, float)
        window = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(smooth)) + window, smooth, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{ylabel} (moving mean of {window})")
    ax.legend()
    save(fig, path, dpi=120)


def seed_mean_curves(table, path, xlabel, ylabel, windows=15):
    """One line per method of `table` (`{method: {"runs": [{"curve": losses}]}}`):
    the per-step loss averaged over its seeds, as a moving mean of a
    `windows`-th of the run, shifted right where a run starts late."""
    import numpy as np

    fig, ax = figure()
    for method, item in table.items():
        length = min(len(r["curve"]) for r in item["runs"])
        losses = np.mean([r["curve"][:length] for r in item["runs"]], axis=0)
        window = max(1, length // windows)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        offset = len(item["runs"][0]["curve"]) - length
        ax.plot(np.arange(len(smooth)) + window + offset, smooth, label=method)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, ncol=2)
    save(fig, path)
