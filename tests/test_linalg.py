import numpy as np
import pytest

from keras_hrp import linalg
from keras_hrp import svd_of_product
from keras_hrp.linalg import randomized_svd
from keras_hrp.linalg import truncated_svd
from tests.helpers import numpy_of
from tests.helpers import principal_angle_cos


def _factors(m, k, n, seed=0, decay=0.7):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(m, k)) * decay ** np.arange(k)
    b = rng.normal(size=(k, n))
    return a.astype("float32"), b.astype("float32")


@pytest.mark.parametrize("m,k,n,rank", [(200, 16, 120, 5), (40, 8, 300, 8), (64, 64, 64, 10)])
def test_matches_dense_svd(m, k, n, rank):
    a, b = _factors(m, k, n)
    u, s, v = (numpy_of(t) for t in svd_of_product(a, b, rank))
    u_ref, s_ref, vt_ref = np.linalg.svd(a.astype("float64") @ b, full_matrices=False)
    assert u.shape == (m, rank) and s.shape == (rank,) and v.shape == (n, rank)
    np.testing.assert_allclose(s, s_ref[:rank], rtol=2e-4, atol=1e-4 * s_ref[0])
    assert np.all(np.diff(s) <= 0)
    assert principal_angle_cos(u, u_ref[:, :rank]) > 0.999
    assert principal_angle_cos(v, vt_ref[:rank].T) > 0.999
    np.testing.assert_allclose(u.T @ u, np.eye(rank), atol=1e-4)
    best = (u_ref[:, :rank] * s_ref[:rank]) @ vt_ref[:rank]
    np.testing.assert_allclose((u * s) @ v.T, best, atol=1e-3 * s_ref[0])


def test_rank_none_returns_all_triplets():
    a, b = _factors(50, 6, 30)
    _, s, _ = svd_of_product(a, b)
    np.testing.assert_allclose(
        numpy_of(s), np.linalg.svd(a @ b, compute_uv=False)[:6], rtol=1e-4
    )


def test_rank_deficient_product():
    a, b = _factors(60, 8, 40)
    a[:, 4:] = 0.0  # rank 4
    u, s, _ = (numpy_of(t) for t in svd_of_product(a, b, 6))
    assert np.all(s[4:] < 1e-4 * s[0])
    _, _, vt_a = np.linalg.svd((a @ b).T, full_matrices=False)
    assert principal_angle_cos(u[:, :4], vt_a[:4].T) > 0.999


@pytest.mark.parametrize(
    "a_shape,b_shape,rank,match",
    [
        ((10, 4), (4, 8), 0, "rank=0"),
        ((10, 4), (4, 8), 5, r"\[1, 4\].*rank=5"),
        ((10, 4), (3, 8), 2, "inner dimensions"),
        ((10, 4, 1), (4, 8), 2, "a.shape=\\(10, 4, 1\\)"),
    ],
)
def test_errors_name_argument_and_value(a_shape, b_shape, rank, match):
    with pytest.raises(ValueError, match=match):
        svd_of_product(np.ones(a_shape), np.ones(b_shape), rank)


def _decaying(m, n, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(m, min(m, n))))
    v, _ = np.linalg.qr(rng.normal(size=(n, min(m, n))))
    s = 0.7 ** np.arange(min(m, n))
    return ((u * s) @ v.T).astype("float32"), s


@pytest.mark.parametrize("method", ["randomized", "full", "auto"])
def test_truncated_svd_matches_the_dense_svd(method):
    w, s_true = _decaying(300, 200)
    u, s, v = (numpy_of(t) for t in truncated_svd(w, 6, method=method, seed=1))
    assert u.shape == (300, 6) and s.shape == (6,) and v.shape == (200, 6)
    np.testing.assert_allclose(s, s_true[:6], rtol=1e-3)
    u_true, _, vt_true = np.linalg.svd(w, full_matrices=False)
    assert principal_angle_cos(u, u_true[:, :6]) > 0.999
    assert principal_angle_cos(v, vt_true[:6].T) > 0.999


def test_randomized_svd_on_a_large_matrix():
    w, s_true = _decaying(1500, 1100)
    u, s, v = (numpy_of(t) for t in randomized_svd(w, 8, seed=0))
    np.testing.assert_allclose(s, s_true[:8], rtol=1e-3)
    np.testing.assert_allclose(u.T @ u, np.eye(8), atol=1e-4)


def test_truncated_svd_errors():
    with pytest.raises(ValueError, match="method='qr'"):
        truncated_svd(np.ones((4, 4)), 2, method="qr")
    with pytest.raises(ValueError, match=r"\[1, 4\].*rank=5"):
        truncated_svd(np.ones((4, 6)), 5)


def test_singular_vector_signs_are_fixed():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(40, 6)).astype("float32")
    b = rng.normal(size=(6, 30)).astype("float32")
    u, s, v = (numpy_of(t) for t in svd_of_product(a, b, rank=4))
    peak = np.abs(u).argmax(axis=0)
    assert np.all(u[peak, np.arange(4)] > 0)  # each column's largest entry is positive
    # the same product from other factors (and another QR sign pattern): same vectors
    u2, s2, v2 = (numpy_of(t) for t in svd_of_product(-a, -b, rank=4))
    np.testing.assert_allclose(u2, u, atol=1e-5)
    np.testing.assert_allclose(v2, v, atol=1e-5)
    again = svd_of_product(a, b, rank=4)
    for first, second in zip((u, s, v), again):
        np.testing.assert_array_equal(first, numpy_of(second))  # bit for bit
    for method in ("full", "randomized"):
        tu, _, _ = (numpy_of(t) for t in truncated_svd(a @ b, 4, method=method, seed=1))
        assert np.all(tu[np.abs(tu).argmax(axis=0), np.arange(4)] > 0)


def test_largest_principal_angle():
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 2)))[0]
    np.testing.assert_allclose(linalg.largest_principal_angle(basis, basis[:, ::-1]), 0.0, atol=0.1)
    theta = np.radians(30.0)
    e = np.eye(6)
    u = e[:, :2]
    w = np.stack([e[:, 0], np.cos(theta) * e[:, 1] + np.sin(theta) * e[:, 2]], axis=1)
    np.testing.assert_allclose(linalg.largest_principal_angle(u, w), 30.0, atol=1e-3)
    np.testing.assert_allclose(linalg.largest_principal_angle(u, e[:, 2:4]), 90.0, atol=1e-3)
    with pytest.raises(ValueError, match="bases differ in shape.*u.shape=\\(6, 2\\), w.shape=\\(6, 1\\)"):
        linalg.largest_principal_angle(u, e[:, :1])
