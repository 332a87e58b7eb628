import math

import keras
import numpy as np
import pytest

from keras_hrp.initializers import directions_from_svd
from keras_hrp.initializers import expected_norm
from keras_hrp.initializers import preheated_a
from keras_hrp.initializers import preheated_factors
from tests.helpers import numpy_of
from tests.helpers import principal_angle_cos


@pytest.mark.parametrize(
    "initializer,shape",
    [("he_uniform", (300, 8)), ("glorot_normal", (100, 4)), ("lecun_normal", (6, 50, 3)), ("ones", (7, 3))],
)
def test_expected_norm_matches_samples(initializer, shape):
    init = keras.initializers.get(initializer)
    config = init.get_config()
    draws = [
        init.__class__.from_config({**config, "seed": seed} if "seed" in config else config)
        for seed in range(40)
    ]
    samples = [np.linalg.norm(numpy_of(draw(shape, "float32"))) for draw in draws]
    assert expected_norm(initializer, shape) == pytest.approx(np.mean(samples), rel=0.03)


def test_expected_norm_he_uniform_closed_form():
    assert expected_norm("he_uniform", (64, 8)) == pytest.approx(math.sqrt(16))


def test_preheated_a_keeps_top_directions_and_sets_norm():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(80, 12)) * 0.6 ** np.arange(12)
    b = rng.normal(size=(12, 40))
    new_a, s, energy = preheated_a(a.astype("float32"), b.astype("float32"), rank=3, norm=5.0)
    new_a, s = numpy_of(new_a), numpy_of(s)
    u_ref, s_ref, _ = np.linalg.svd(a @ b, full_matrices=False)
    assert new_a.shape == (80, 3)
    assert np.linalg.norm(new_a) == pytest.approx(5.0, rel=1e-5)
    gram = new_a.T @ new_a  # orthogonal columns of equal norm
    np.testing.assert_allclose(gram, np.eye(3) * 25.0 / 3, atol=1e-3)
    assert principal_angle_cos(new_a, u_ref[:, :3]) > 0.999
    np.testing.assert_allclose(s, s_ref[:12], rtol=1e-3)
    ref_energy = (s_ref[:3] ** 2).sum() / (s_ref**2).sum()
    assert float(numpy_of(energy)) == pytest.approx(ref_energy, rel=1e-4)


def test_truncated_from_svd_is_the_best_rank_r_approximation_balanced():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(30, 6)) * 0.5 ** np.arange(6)
    b = rng.normal(size=(6, 20))
    new_a, new_b, s, energy = preheated_factors(a.astype("float32"), b.astype("float32"), rank=2)
    u_ref, s_ref, vt_ref = np.linalg.svd(a @ b, full_matrices=False)
    best = (u_ref[:, :2] * s_ref[:2]) @ vt_ref[:2]
    assert new_a.shape == (30, 2) and new_b.shape == (2, 20)
    np.testing.assert_allclose(new_a @ new_b, best, atol=1e-4 * np.abs(best).max())
    np.testing.assert_allclose(np.linalg.norm(new_a, axis=0), np.linalg.norm(new_b, axis=1), rtol=1e-5)  # balanced
    assert energy == pytest.approx((s_ref[:2] ** 2).sum() / (s_ref**2).sum(), rel=1e-4)
    np.testing.assert_allclose(s, s_ref[:6], rtol=1e-4)


def test_directions_from_svd_slices_one_decomposition_at_any_rank():
    rng = np.random.default_rng(5)
    u = np.linalg.qr(rng.normal(size=(40, 8)))[0].astype("float32")
    s = np.array([8, 4, 2, 1, 0.5, 0.25, 0.1, 0.0], "float32")
    for rank in (1, 3, 8):
        new_a, energy = directions_from_svd(u, s, rank, norm=2.0)
        assert new_a.dtype == np.float32 and new_a.shape == (40, rank)
        assert np.linalg.norm(new_a) == pytest.approx(2.0, rel=1e-5)
        np.testing.assert_allclose(new_a, u[:, :rank] * (2.0 / math.sqrt(rank)), rtol=1e-6)
        assert energy == pytest.approx(float((s[:rank] ** 2).sum() / (s**2).sum()), rel=1e-6)
    assert math.isnan(directions_from_svd(u, np.zeros(8), 2, norm=1.0)[1])  # a zero delta keeps nothing
