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
