import numpy as np
import pytest

from keras_hrp.initializers import baselines
from tests.helpers import numpy_of


def _w(m=30, n=20, seed=0):
    return np.random.default_rng(seed).normal(size=(m, n)).astype("float32")


@pytest.mark.parametrize("method", ["pissa", "milora", "olora", "gaussian"])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_reconstruction_keeps_the_weight(method, scale):
    w = _w()
    a, b, residual = (None if t is None else numpy_of(t) for t in getattr(baselines, method)(w, 4, scale=scale))
    assert a.shape == (30, 4) and b.shape == (4, 20)
    total = (w if residual is None else residual) + scale * a @ b
    np.testing.assert_allclose(total, w, atol=1e-4)


def test_pissa_and_milora_take_the_top_and_bottom_triplets():
    w = _w()
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    a, b, _ = (numpy_of(t) for t in baselines.pissa(w, 3, scale=0.5))
    np.testing.assert_allclose(0.5 * a @ b, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-4)
    a, b, _ = (numpy_of(t) for t in baselines.milora(w, 3))
    np.testing.assert_allclose(a @ b, (u[:, -3:] * s[-3:]) @ vt[-3:], atol=1e-4)


def test_olora_a_is_orthonormal():
    a, _, _ = (numpy_of(t) for t in baselines.olora(_w(), 5))
    np.testing.assert_allclose(a.T @ a, np.eye(5), atol=1e-5)


def test_rank_error():
    with pytest.raises(ValueError, match=r"\[1, 20\].*rank=21"):
        baselines.pissa(_w(), 21)
