import keras
import numpy as np
import pytest

import keras_hrp
from keras_hrp import lora
from tests.adapter_writer import probe_tokens
from tests.adapter_writer import tiny_model
from tests.helpers import logits_loss
from tests.helpers import numpy_of
from tests.helpers import principal_angle_cos

METHODS = ["keras", "gaussian", "pissa", "milora", "olora", "lora_ga", "oracle"]


def _batches(n=2):
    rng = np.random.default_rng(1)
    return [(rng.integers(0, 100, size=(8, 12)).astype("int32"),
             rng.integers(0, 3, size=(8,)).astype("int32")) for _ in range(n)]


def _options(method, model):
    if method == "lora_ga":
        return {"data": _batches(), "loss": keras.losses.SparseCategoricalCrossentropy(True)}
    if method == "oracle":
        rng = np.random.default_rng(2)
        return {"targets": {p: rng.normal(size=lora.weight_matrix_shape(layer))
                            for p, layer in keras_hrp.adapters.lora_layers(model).items()}}
    return {}


def _lora_model():
    model = tiny_model()
    for layer in (model.get_layer("embed"), model.get_layer("ffn"),
                  model.get_layer("mha")._query_dense):
        layer.enable_lora(3, lora_alpha=1.5)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_output_and_merged_weights_unchanged(method):
    model = _lora_model()
    tokens = probe_tokens()
    before = model.predict(tokens, verbose=0)
    merged = {p: numpy_of(l.embeddings if hasattr(l, "lora_embeddings_a") else l.kernel)
              for p, l in keras_hrp.adapters.lora_layers(model).items()}
    paths = keras_hrp.initialize_lora(model, method, **_options(method, model))
    assert sorted(paths) == ["embed", "ffn", "mha/query"]
    np.testing.assert_allclose(model.predict(tokens, verbose=0), before, rtol=1e-4, atol=1e-5)
    for path, layer in keras_hrp.adapters.lora_layers(model).items():
        now = numpy_of(layer.embeddings if hasattr(layer, "lora_embeddings_a") else layer.kernel)
        np.testing.assert_allclose(now, merged[path], atol=1e-4)  # base + delta == W
        a, b = (numpy_of(v) for v in lora.lora_factors(layer))
        assert np.abs(a).max() > 0
        if method in ("keras", "gaussian", "oracle"):
            assert not np.any(b)
        else:
            assert np.abs(b).max() > 0


def test_pissa_on_einsum_multi_axis_kernel():
    model = _lora_model()
    query = model.get_layer("mha")._query_dense
    w = numpy_of(query._kernel).reshape(-1, 8)
    keras_hrp.initialize_lora([query], "pissa")
    a = numpy_of(query.lora_kernel_a)
    assert a.shape == (32, 2, 3)
    u, _, _ = np.linalg.svd(w, full_matrices=False)
    q_a, _ = np.linalg.qr(a.reshape(-1, 3))
    np.testing.assert_allclose(np.linalg.svd(q_a.T @ u[:, :3], compute_uv=False), 1.0, atol=1e-4)


def test_pissa_model_trains():
    model = _lora_model()
    keras_hrp.initialize_lora(model, "pissa")
    x = np.random.default_rng(0).integers(0, 100, size=(64, 12)).astype("int32")
    model.compile(keras.optimizers.Adam(3e-3), logits_loss())
    history = model.fit(x, x[:, 0] % 3, batch_size=16, epochs=4, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_lora_ga_follows_the_gradient_of_the_frozen_weight():
    model = _lora_model()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(True))
    ffn = model.get_layer("ffn")
    data = _batches(3)
    (grad,) = keras_hrp.gradients.weight_gradients(
        model, [ffn._kernel], data, model.loss
    )
    keras_hrp.initialize_lora(model, "lora_ga", data=data)  # compiled loss
    u, _, vt = np.linalg.svd(grad)
    a, b = numpy_of(ffn.lora_kernel_a), numpy_of(ffn.lora_kernel_b)
    assert principal_angle_cos(a, u[:, :3]) > 0.999
    assert principal_angle_cos(b.T, vt[3:6].T) > 0.999


def test_weight_gradients_match_the_analytic_gradient():
    rng = np.random.default_rng(0)
    x, y = (rng.normal(size=(16, 6)).astype("float32") for _ in range(2))
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6, use_bias=False)])
    layer = model.layers[0]
    layer.enable_lora(2)  # the kernel is frozen now
    w = numpy_of(layer.kernel)
    (grad,) = keras_hrp.gradients.weight_gradients(
        model, [layer._kernel], [(x, y)], keras.losses.MeanSquaredError()
    )
    np.testing.assert_allclose(grad, 2 * x.T @ (x @ w - y) / y.size, rtol=1e-4, atol=1e-5)
    assert not layer._kernel.trainable


def test_oracle_takes_the_target_directions():
    model = _lora_model()
    ffn = model.get_layer("ffn")
    target = np.random.default_rng(3).normal(size=(32, 32))
    keras_hrp.initialize_lora([ffn], "oracle", targets={"ffn": target})
    a = numpy_of(ffn.lora_kernel_a)
    u, _, _ = np.linalg.svd(target)
    assert principal_angle_cos(a, u[:, :3]) > 0.999
    np.testing.assert_allclose(np.linalg.norm(a), np.sqrt(2 * 3), rtol=1e-4)  # he_uniform


def test_errors():
    with pytest.raises(ValueError, match="initialize_lora: `method` must be one of.*method='hrp'"):
        keras_hrp.initialize_lora(_lora_model(), "hrp")
    model = _lora_model()
    with pytest.raises(ValueError, match="'lora_ga' needs the model.*data=None"):
        keras_hrp.initialize_lora(model, "lora_ga")
    with pytest.raises(ValueError, match="one loss.*loss=None"):
        keras_hrp.initialize_lora(model, "lora_ga", data=_batches())
    with pytest.raises(ValueError, match=r"targets\['embed'\].*keys=None"):
        keras_hrp.initialize_lora(model, "oracle")
    dense = keras.layers.Dense(4, name="q8")
    dense.build((None, 8))
    dense.enable_lora(2)
    dense.quantize("int8")
    with pytest.raises(ValueError, match="'q8' is quantized.*quantization_mode='int8'"):
        keras_hrp.initialize_lora([dense], "pissa")


def _eva_model():
    model = tiny_model()
    model.get_layer("ffn").enable_lora(3)
    model.get_layer("mha")._query_dense.enable_lora(3)  # per head: A is (32, 2, 3)
    return model


def test_eva_takes_the_inputs_principal_directions_in_every_head():
    model = _eva_model()
    data = [b[0] for b in _batches(3)]
    before = model.predict(probe_tokens(), verbose=0)
    keras_hrp.initialize_lora(model, "eva", data=data)
    np.testing.assert_allclose(model.predict(probe_tokens(), verbose=0), before, rtol=1e-5, atol=1e-6)
    mha = model.get_layer("mha")
    embedded = np.concatenate([numpy_of(model.get_layer("embed")(x)) for x in data]).reshape(-1, 32)
    query_a = numpy_of(mha._query_dense.lora_kernel_a)
    assert query_a.shape == (32, 2, 3)
    np.testing.assert_array_equal(query_a[:, 0], query_a[:, 1])  # the same directions in each head
    top = np.linalg.svd(embedded, full_matrices=False)[2][:3].T
    assert principal_angle_cos(query_a[:, 0], top) > 1 - 1e-4
    np.testing.assert_allclose(query_a[:, 0].T @ query_a[:, 0], np.eye(3), atol=1e-5)
    assert not np.any(numpy_of(mha._query_dense.lora_kernel_b))
    ffn_a = numpy_of(model.get_layer("ffn").lora_kernel_a)
    assert ffn_a.shape == (32, 3) and np.all(np.abs(ffn_a).max(axis=0) == ffn_a.max(axis=0))  # signs fixed


def test_eva_on_a_multi_axis_input():
    x = keras.Input((5, 2, 4))
    layer = keras.layers.EinsumDense("abcd,cde->abe", output_shape=(None, 6), name="proj")
    model = keras.Model(x, layer(x))
    layer.enable_lora(2)
    data = [np.random.default_rng(i).normal(size=(3, 5, 2, 4)).astype("float32") for i in range(2)]
    keras_hrp.initialize_lora(model, "eva", data=data)
    flat = np.concatenate(data).reshape(-1, 8)  # the contracted (c, d) axes, in the kernel's order
    a = numpy_of(layer.lora_kernel_a).reshape(8, 2)
    assert principal_angle_cos(a, np.linalg.svd(flat, full_matrices=False)[2][:2].T) > 1 - 1e-4


def test_eva_errors():
    model = _eva_model()
    with pytest.raises(ValueError, match="initialize_lora: method 'eva' needs `data`.*data=None"):
        keras_hrp.initialize_lora(model, "eva")
    with pytest.raises(ValueError, match="'eva' needs the model.*model_or_layers='list'"):
        keras_hrp.initialize_lora([model.get_layer("ffn")], "eva", data=[probe_tokens()])
    model.get_layer("embed").enable_lora(2)
    with pytest.raises(ValueError, match="'embed' is an Embedding.*layer='Embedding'"):
        keras_hrp.initialize_lora(model, "eva", data=[probe_tokens()])


@pytest.mark.parametrize("method", ["pissa", "olora", "lora_ga", "eva"])
def test_full_factorization_layers(method):
    """Standard LoRA on the query's whole (hidden, heads * head_dim) matrix."""
    model = tiny_model()
    keras_hrp.enable_hrp(model, rank=3, target_layer_names=["query", "ffn"], factorization="full")
    query = model.get_layer("mha")._query_dense
    w = numpy_of(query._kernel).reshape(32, 16)  # (hidden, heads, head_dim): A's axes lead
    tokens = probe_tokens()
    before, merged = model.predict(tokens, verbose=0), numpy_of(query.kernel)
    options = {"data": [b[0] for b in _batches()]} if method == "eva" else _options(method, model)
    keras_hrp.initialize_lora(model, method, **options)
    np.testing.assert_allclose(model.predict(tokens, verbose=0), before, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(numpy_of(query.kernel), merged, atol=1e-4)
    a = numpy_of(query.lora_kernel_a)
    assert a.shape == (32, 3) and query.lora_kernel_b.shape == (3, 16)
    if method == "pissa":
        u = np.linalg.svd(w, full_matrices=False)[0][:, :3]
        assert principal_angle_cos(a, u) > 1 - 1e-4


@pytest.mark.parametrize("given, match", [
    ("model", "no layer has LoRA enabled: nothing to initialize.*Received: model_or_layers="),
    ("layers", "every layer needs LoRA enabled first. Received: layers=\\['input_layer'"),
])
def test_a_model_without_lora_layers_is_an_error(given, match):
    model = tiny_model()
    target = model if given == "model" else list(model.layers)
    before = [numpy_of(v) for v in model.weights]
    with pytest.raises(ValueError, match="initialize_lora: " + match):
        keras_hrp.initialize_lora(target, "pissa")
    assert all(np.array_equal(numpy_of(v), b) for v, b in zip(model.weights, before))
