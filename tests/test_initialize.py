import keras
import numpy as np
import pytest

import keras_hrp
from keras_hrp import lora
from tests.adapter_writer import probe_tokens
from tests.adapter_writer import tiny_model
from tests.helpers import numpy_of

METHODS = ["keras", "gaussian", "pissa", "milora", "olora"]


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
    paths = keras_hrp.initialize_lora(model, method)
    assert sorted(paths) == ["embed", "ffn", "mha/query"]
    np.testing.assert_allclose(model.predict(tokens, verbose=0), before, rtol=1e-4, atol=1e-5)
    for path, layer in keras_hrp.adapters.lora_layers(model).items():
        now = numpy_of(layer.embeddings if hasattr(layer, "lora_embeddings_a") else layer.kernel)
        np.testing.assert_allclose(now, merged[path], atol=1e-4)  # base + delta == W
        a, b = (numpy_of(v) for v in lora.lora_factors(layer))
        assert np.abs(a).max() > 0
        if method in ("keras", "gaussian"):
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
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    history = model.fit(x, x[:, 0] % 3, batch_size=16, epochs=4, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_errors():
    with pytest.raises(ValueError, match="unknown `method`.*method='hrp'"):
        keras_hrp.initialize_lora(_lora_model(), "hrp")
    dense = keras.layers.Dense(4, name="q8")
    dense.build((None, 8))
    dense.enable_lora(2)
    dense.quantize("int8")
    with pytest.raises(ValueError, match="'q8' is quantized.*quantization_mode='int8'"):
        keras_hrp.initialize_lora([dense], "pissa")
