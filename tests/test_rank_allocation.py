import numpy as np
import pytest

from keras_hrp.rank_allocation import allocate_ranks


def test_a_concentrated_spectrum_gives_its_budget_to_a_flat_one():
    flat, peaked = np.ones(8), np.array([10.0] + [0.01] * 7)
    ranks = allocate_ranks([peaked, flat], costs=[10, 10], budget=80, max_ranks=[8, 8])
    assert ranks == [1, 7]


def test_the_budget_is_parameters_and_never_exceeded():
    rng = np.random.default_rng(0)
    spectra = [np.sort(rng.random(16))[::-1] for _ in range(5)]
    costs = [40, 40, 80, 80, 160]
    budget = 4 * sum(costs)  # rank 4 everywhere
    ranks = allocate_ranks(spectra, costs, budget, max_ranks=[16] * 5)
    spent = sum(r * c for r, c in zip(ranks, costs))
    assert spent <= budget and budget - spent < min(costs)  # nothing that fits is left unspent
    assert min(ranks) >= 1 and ranks != [4] * 5


def test_bounds_and_unusable_spectra():
    ranks = allocate_ranks([np.ones(8), np.zeros(8), [np.nan] * 8], [10, 10, 10], 1000, [3, 8, 8], min_rank=2)
    assert ranks == [3, 2, 2]  # capped at max_ranks; no energy or NaN: min_rank
    assert allocate_ranks([np.ones(4)], [10], budget=0, max_ranks=[4]) == [1]  # min_rank even past the budget


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="one entry per layer. Received: 2, 1 and 2 entries"):
        allocate_ranks([[1.0], [1.0]], [10], 10, [1, 1])
