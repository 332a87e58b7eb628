"""Per-layer LoRA ranks from preheated spectra under a parameter budget (pure).

A rank-`r` adapter on an `m x n` weight trains `r (m + n)` parameters. Given
each layer's singular values, `allocate_ranks` spends a budget of trainable
parameters where a rank keeps the most of a layer's update: every layer
gets `min_rank`, then ranks go one at a time to the layer whose next
singular direction holds the largest share of that layer's energy per
parameter it costs (`s_k^2 / sum(s^2) / (m + n)`), while they fit. Shares
are per layer, so a layer with a large update does not outbid the others by
its size alone; a concentrated spectrum gives few ranks, a flat one many.
"""

import numpy as np


def allocate_ranks(spectra, costs, budget, max_ranks, min_rank=1):
    """Ranks per layer that fit `budget` parameters.

    Args:
        spectra: per layer, its singular values (descending, any length).
        costs: per layer, the parameters one rank costs (`m + n`).
        budget: total trainable parameters the adapters may have.
        max_ranks: per layer, the largest rank it may take.
        min_rank: the smallest rank of every layer (given even if the
            budget is smaller).

    Returns:
        A list of ints, one rank per layer.

    Example:

    >>> allocate_ranks([[4.0, 0.1, 0.1], [1.0, 1.0, 1.0]], [10, 10], 40, [3, 3])
    [1, 3]
    """
    if not len(spectra) == len(costs) == len(max_ranks):
        raise ValueError(
            "allocate_ranks: `spectra`, `costs` and `max_ranks` need one entry per layer. "
            f"Received: {len(spectra)}, {len(costs)} and {len(max_ranks)} entries"
        )
    ranks = [min(min_rank, top) for top in max_ranks]
    spent = sum(r * c for r, c in zip(ranks, costs))
    candidates = []
    for layer, (s, cost, top) in enumerate(zip(spectra, costs, max_ranks)):
        energy = np.square(np.asarray(s, "float64"))
        total = energy.sum()
        if not np.isfinite(total) or total <= 0:
            continue  # no usable spectrum: the layer keeps `min_rank`
        for k in range(ranks[layer], min(top, len(energy))):
            candidates.append((energy[k] / total / cost, layer, k))
    for _, layer, k in sorted(candidates, key=lambda item: -item[0]):
        if k == ranks[layer] and spent + costs[layer] <= budget:
            ranks[layer] += 1
            spent += costs[layer]
    return ranks
