import keras
import numpy as np
import pytest

from keras_hrp import internals
from keras_hrp import lora
from keras_hrp.state import HRPState
from tests.helpers import BACKEND
from tests.helpers import numpy_of


def _dense():
    layer = keras.layers.Dense(12)
    layer.build((None, 20))
    layer.enable_lora(6, lora_alpha=3.0)
    return layer, (20, 12)


def _einsum():
    layer = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 4, 5))
    layer.build((None, 3, 20))
    layer.enable_lora(6, lora_alpha=3.0)
    return layer, (20 * 4, 5)


def _embedding():
    layer = keras.layers.Embedding(50, 12)
    layer.build((None,))
    layer.enable_lora(6, lora_alpha=3.0)
    return layer, (50, 12)


def _weight(layer):
    return numpy_of(layer.embeddings if hasattr(layer, "lora_embeddings_a") else layer.kernel)


def _base(layer):
    return numpy_of(internals.base_weight(layer))


@pytest.mark.parametrize("make", [_dense, _einsum, _embedding], ids=["dense", "einsum", "embedding"])
def test_replace_factors_resizes_for_real(make):
    layer, (m, n) = make()
    a_old, b_old = lora.lora_factors(layer)
    paths = (a_old.path, b_old.path)
    a_shape_old = tuple(a_old.shape)
    count = len(layer.weights)
    assert lora.lora_scale(layer) == 0.5
    a_mat, b_mat = lora.factor_matrices(layer)
    assert tuple(a_mat.shape) == (m, 6) and tuple(b_mat.shape) == (6, n)

    rng = np.random.default_rng(0)
    new_a = rng.normal(size=(m, 2)).astype("float32")
    new_b = rng.normal(size=(2, n)).astype("float32")
    lora.replace_factors(layer, new_a, new_b, trainable_a=False)

    a, b = lora.lora_factors(layer)
    assert tuple(a.shape) == a_shape_old[:-1] + (2,) and tuple(b.shape) == (2, n)
    assert (a.path, b.path) == paths
    assert layer.lora_rank == 2 and lora.lora_scale(layer) == 0.5
    assert not a.trainable and b.trainable
    assert len(layer.weights) == count
    tracked = [id(v) for v in layer.weights]
    assert id(a) in tracked and id(b) in tracked
    assert all(id(v) not in tracked for v in (a_old, b_old))
    assert all(v.shape[-1] != 6 and v.shape[0] != 6 for v in layer.weights if "lora" in v.path)
    expected = _base(layer) + 0.5 * (new_a @ new_b).reshape(_base(layer).shape)
    np.testing.assert_allclose(_weight(layer), expected, atol=1e-5)


def test_max_useful_rank_is_last_axis_for_einsum():
    layer, _ = _einsum()
    assert lora.max_useful_rank(layer) == 5
    dense, _ = _dense()
    assert lora.max_useful_rank(dense) == 12


def test_lora_factors_error_names_layer():
    layer = keras.layers.Dense(3, name="plain")
    layer.build((None, 4))
    with pytest.raises(ValueError, match="'plain'.*lora_enabled=False"):
        lora.lora_factors(layer)


@pytest.mark.skipif(BACKEND != "torch", reason="ParameterDict registry exists only on torch")
def test_replace_factors_updates_layer_torch_params():
    layer, (m, n) = _dense()
    lora.replace_factors(layer, np.ones((m, 2), "float32"), np.ones((2, n), "float32"))
    assert layer.torch_params[layer.lora_kernel_a.path] is layer.lora_kernel_a.value


def test_factor_axes_and_layouts():
    layer = keras.layers.EinsumDense("btd,ndh->btnh", (5, 3, 4))  # Gemma's query: (heads, hidden, head_dim)
    layer.build((None, 5, 12))
    assert lora.factor_axes(layer) == ((0, 1), (2,))  # Keras' per-head layout
    assert lora.weight_matrix_shape(layer) == (36, 4) and lora.a_shape_at_rank(layer, 2) == (3, 12, 2)
    layer.hrp_state = HRPState(rank=2, phase="main", factorization="full")
    assert lora.factor_axes(layer) == ((1,), (0, 2))
    assert lora.weight_matrix_shape(layer) == (12, 12) and lora.max_useful_rank(layer) == 12
    assert lora.a_shape_at_rank(layer, 2) == (12, 2) and lora.b_shape_at_rank(layer, 2) == (2, 12)
    kernel = np.arange(3 * 12 * 4, dtype="float32").reshape(3, 12, 4)
    matrix = lora.to_matrix(layer, kernel)
    np.testing.assert_array_equal(matrix[5], kernel[:, 5, :].reshape(-1))  # row: one hidden unit
    np.testing.assert_array_equal(lora.to_kernel(layer, matrix), kernel)
    dense = keras.layers.Dense(6)
    dense.build((None, 4))
    dense.hrp_state = HRPState(rank=2, phase="main", factorization="full")
    assert lora.factor_axes(dense) == ((0,), (1,))  # a Dense is the same either way
