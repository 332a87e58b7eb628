import numpy as np
import pytest

from keras_hrp.initializers import baselines
from tests.helpers import numpy_of
from tests.helpers import principal_angle_cos


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


@pytest.mark.parametrize("svd", ["full", "randomized"])
def test_lora_ga_factors_and_residual(svd):
    w, grad = _w(), _w(seed=1)
    a, b, residual = (numpy_of(t) for t in baselines.lora_ga(w, grad, 4, scale=0.5, svd=svd))
    np.testing.assert_allclose(residual + 0.5 * a @ b, w, atol=1e-4)
    u, _, vt = np.linalg.svd(grad)
    c = 20 ** 0.25 / 4.0  # n^(1/4) / sqrt(gamma=16)
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), c, rtol=1e-4)
    if svd == "full":  # randomized is approximate on a flat spectrum
        assert principal_angle_cos(a, u[:, :4]) > 0.999
        assert principal_angle_cos(b.T, vt[4:8].T) > 0.999


def test_lora_ga_errors():
    with pytest.raises(ValueError, match=r"2 \* rank <= 20.*rank=11"):
        baselines.lora_ga(_w(), _w(), 11)
    with pytest.raises(ValueError, match=r"grad.shape=\(20, 30\)"):
        baselines.lora_ga(_w(), _w().T, 2)


def test_oracle_errors():
    with pytest.raises(ValueError, match=r"target.shape=\(3, 3\)"):
        baselines.oracle(_w(), np.ones((3, 3)), 2, norm=1.0)


def test_eva_is_the_grams_top_eigenvectors():
    x = np.random.default_rng(0).normal(size=(50, 6)) * np.array([5.0, 4.0, 3.0, 0.5, 0.2, 0.1])
    a = numpy_of(baselines.eva(x.T @ x, 2))
    top = np.linalg.eigh(x.T @ x)[1][:, ::-1][:, :2]
    np.testing.assert_allclose(np.abs(a), np.abs(top), atol=1e-4)
    np.testing.assert_allclose(a.T @ a, np.eye(2), atol=1e-5)
    assert np.all(a[np.abs(a).argmax(axis=0), [0, 1]] > 0)
    with pytest.raises(ValueError, match="eva: needs a square Gram matrix. Received: gram.shape=\\(6, 5\\)"):
        baselines.eva(np.ones((6, 5)), 2)
