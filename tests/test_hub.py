import os
from collections import Counter

import keras
import numpy as np
import pytest

import keras_hrp
from keras_hrp import internals
from keras_hrp import lora
from tests.helpers import JIT_MODES
from tests.helpers import logits_loss
from tests.helpers import numpy_of
from tests.helpers import principal_angle_cos


def _attention_model():
    tokens = keras.Input((12,), dtype="int32")
    h = keras.layers.Embedding(100, 32, name="embed")(tokens)
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(h, h)
    h = keras.layers.LayerNormalization(name="norm")(h)
    h = keras.layers.Dense(32, activation="gelu", name="ffn")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(3, name="head")(h), name="tiny")


def _data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 100, size=(n, 12)).astype("int32")
    return x, (x[:, 0] % 3).astype("int32")


def test_targets_freezing_and_ranks():
    model = _attention_model()
    with pytest.warns(UserWarning, match="'mha/query' can use LoRA rank 8 at most.*rank 8 instead of 16"):
        layers = keras_hrp.enable_hrp(model, rank=2, preheat_rank=16, target_layer_names=["query", "value", "ffn", "embed"])
    paths = sorted(layer.path for layer in layers)
    assert paths == ["embed", "ffn", "mha/query", "mha/value"]
    ranks = {layer.path: layer.lora_rank for layer in layers}
    assert ranks == {"embed": 16, "ffn": 16, "mha/query": 8, "mha/value": 8}
    assert tuple(model.get_layer("mha").query_dense.lora_kernel_a.shape) == (32, 2, 8)
    trainable = sorted(v.path for v in model.trainable_variables)
    assert trainable == sorted(
        ["embed/lora_embeddings_a", "embed/lora_embeddings_b", "ffn/bias", "ffn/lora_kernel_a",
         "ffn/lora_kernel_b", "mha/query/bias", "mha/query/lora_kernel_a", "mha/query/lora_kernel_b",
         "mha/value/bias", "mha/value/lora_kernel_a", "mha/value/lora_kernel_b"]
    )


def test_default_targets_are_keras_hub_ones():
    model = _attention_model()
    with pytest.warns(UserWarning, match="can use LoRA rank 8"):
        layers = keras_hrp.enable_hrp(model, rank=2, preheat_rank=16)
    assert sorted(layer.path for layer in layers) == ["mha/query", "mha/value"]


def test_regex_over_paths():
    model = _attention_model()
    layers = keras_hrp.enable_hrp(model, rank=2, preheat_rank=4, target_layer_names=["mha/(key|value)"])
    assert sorted(layer.path for layer in layers) == ["mha/key", "mha/value"]


@pytest.mark.parametrize("jit_compile", JIT_MODES)
def test_switch_on_einsum_and_embedding(jit_compile):
    x, y = _data()
    model = _attention_model()
    keras_hrp.enable_hrp(model, rank=2, preheat_rank=6, target_layer_names=["query", "value", "embed"],
                         rank_allocation="uniform")
    model.get_layer("head").trainable = True
    model.compile(keras.optimizers.Adam(2e-3), logits_loss(), jit_compile=jit_compile)
    before = model.predict(x, verbose=0)
    snapshot = keras_hrp.WeightSnapshot(model)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    deltas = {}
    for layer in keras_hrp.hrp_layers(model):
        a, b = (numpy_of(m) for m in lora.factor_matrices(layer))
        deltas[layer.path] = a @ b
    report = keras_hrp.switch_to_main(model, snapshot)
    np.testing.assert_allclose(model.predict(x, verbose=0), before, rtol=1e-5, atol=1e-6)
    assert not report.fallbacks
    for layer in keras_hrp.hrp_layers(model):
        a_var, b_var = lora.lora_factors(layer)
        assert layer.lora_rank == 2 and b_var.shape[0] == 2
        np.testing.assert_array_equal(numpy_of(b_var), 0.0)
        a = numpy_of(a_var).reshape(-1, 2)
        u, _, _ = np.linalg.svd(deltas[layer.path], full_matrices=False)
        assert principal_angle_cos(a, u[:, :2]) > 0.999
    adapters = [tuple(v.shape) for v in model.trainable_variables if "lora" in v.path]
    assert all(2 in (s[0], s[-1]) for s in adapters) and not [s for s in adapters if 6 in s]
    trainable = Counter(tuple(v.shape) for v in model.trainable_variables)
    slots = Counter(tuple(v.shape) for v in model.optimizer.variables if len(v.shape))
    assert slots == trainable + trainable  # Adam: two slots per variable, nothing else
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_callback_manages_enable_hrp_layers():
    x, y = _data()
    model = _attention_model()
    keras_hrp.enable_hrp(model, rank=2, preheat_rank=6, target_layer_names=["query", "value"])
    model.compile("adam", logits_loss())
    hrp = keras_hrp.HRPCallback(3, verbose=0)
    model.fit(x, y, batch_size=32, epochs=1, callbacks=[hrp], verbose=0)
    assert set(hrp.report) == {"mha/query", "mha/value"} and hrp.switch_step == 3


def test_errors():
    model = _attention_model()
    with pytest.raises(ValueError, match="enable_hrp: .*matches no .* has \\[.*'mha/query'.*target_layer_names=\\['nope'\\]"):
        keras_hrp.enable_hrp(model, 2, 4, target_layer_names=["nope"])
    with pytest.raises(ValueError, match="enable_hrp: `preheat_rank` must be an integer larger.*preheat_rank=2, rank=2"):
        keras_hrp.enable_hrp(model, 2, 2)
    with pytest.raises(ValueError, match="'mha/(query|value)' has LoRA rank at most 8.*rank=8"):
        keras_hrp.enable_hrp(model, 8, 16)
    model.get_layer("ffn").enable_lora(2)
    with pytest.raises(ValueError, match="already have LoRA.*layers=\\['ffn'\\]"):
        keras_hrp.enable_hrp(model, 2, 4, target_layer_names=["ffn"])
    keras_hrp.enable_hrp(model, 2, 4, target_layer_names=["query"])
    with pytest.raises(ValueError, match="already has HRP layers.*'mha/query'"):
        keras_hrp.enable_hrp(model, 2, 4, target_layer_names=["value"])


def _switched_attention_model():
    x, y = _data()
    model = _attention_model()
    keras_hrp.enable_hrp(model, rank=2, preheat_rank=6, target_layer_names=["query", "value", "ffn"])
    model.compile("adam", logits_loss())
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[keras_hrp.HRPCallback(2, verbose=0)])
    model.get_layer("ffn").lora_kernel_b.assign(np.full((2, 32), 0.1, "float32"))
    return model, x


def test_load_weights_keeps_base_and_adapters(tmp_path):
    model, x = _switched_attention_model()
    layers = keras_hrp.hrp_layers(model)
    bases = [numpy_of(internals.base_weight(layer)) for layer in layers]
    factors = [[numpy_of(v) for v in lora.lora_factors(layer)] for layer in layers]
    before = model.predict(x, verbose=0)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)  # Keras stores merged kernels; keras-hrp its state beside
    assert os.path.exists(path + ".hrp.npz")
    model.load_weights(path)
    np.testing.assert_allclose(model.predict(x, verbose=0), before, rtol=1e-5, atol=1e-6)
    for layer, base, (a, b) in zip(layers, bases, factors):
        np.testing.assert_array_equal(numpy_of(internals.base_weight(layer)), base)
        np.testing.assert_array_equal(numpy_of(lora.lora_factors(layer)[1]), b)


def test_load_weights_without_state_file_merges_and_says_so(tmp_path):
    model, x = _switched_attention_model()
    before = model.predict(x, verbose=0)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    os.remove(path + ".hrp.npz")
    with pytest.warns(UserWarning, match="without keras-hrp's state file, and the load changed the frozen weights of .*now include"):
        model.load_weights(path)
    np.testing.assert_allclose(model.predict(x, verbose=0), before, rtol=1e-5, atol=1e-6)
    for layer in keras_hrp.hrp_layers(model):
        a, b = (numpy_of(v) for v in lora.lora_factors(layer))
        assert np.abs(a).max() > 0 and not np.any(b)  # B gets gradients again


@pytest.mark.parametrize("jit_compile", JIT_MODES)
def test_full_factorization_preheats_above_head_dim_and_switches(jit_compile):
    x, y = _data()
    model = _attention_model()  # 2 heads of 8: per head, query's rank stops at 8
    layers = keras_hrp.enable_hrp(model, rank=2, preheat_rank=12, factorization="full")
    query = model.get_layer("mha").query_dense
    assert {layer.hrp_state.factorization for layer in layers} == {"full"} and query.lora_rank == 12
    assert tuple(query.lora_kernel_a.shape) == (32, 12) and tuple(query.lora_kernel_b.shape) == (12, 16)
    model.get_layer("head").trainable = True
    model.compile(keras.optimizers.Adam(2e-3), logits_loss(), jit_compile=jit_compile)
    before = model.predict(x, verbose=0)
    snapshot = keras_hrp.WeightSnapshot(model)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    deltas = {}
    for layer in layers:
        a, b = (numpy_of(m) for m in lora.factor_matrices(layer))
        deltas[layer.path] = a @ b
        merged = numpy_of(internals.base_weight(layer)) + lora.to_kernel(layer, a @ b)
        np.testing.assert_allclose(numpy_of(layer.kernel), merged, rtol=1e-5, atol=1e-6)
    report = keras_hrp.switch_to_main(model, snapshot)
    np.testing.assert_allclose(model.predict(x, verbose=0), before, rtol=1e-5, atol=1e-6)
    assert not report.fallbacks and report["mha/query"].from_rank == 12
    for layer in layers:
        a, b = (numpy_of(v) for v in lora.lora_factors(layer))
        assert a.shape == (32, 2) and b.shape == (2, 16) and not np.any(b)
        u, _, _ = np.linalg.svd(deltas[layer.path], full_matrices=False)
        assert principal_angle_cos(a, u[:, :2]) > 0.999
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_full_factorization_weights_round_trip(tmp_path):
    x, y = _data()
    model = _attention_model()
    base = [numpy_of(v) for v in model.weights]
    keras_hrp.enable_hrp(model, rank=2, preheat_rank=12, factorization="full", rank_allocation="uniform")
    model.compile("adam", logits_loss())
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[keras_hrp.HRPCallback(2, verbose=0)])
    before = model.predict(x, verbose=0)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    fresh = _attention_model()
    fresh.set_weights(base)
    keras_hrp.enable_hrp(fresh, rank=2, preheat_rank=12, factorization="full", rank_allocation="uniform")
    fresh.compile("adam", logits_loss())
    fresh.load_weights(path)
    query = fresh.get_layer("mha").query_dense
    assert query.hrp_state.phase == "main" and tuple(query.lora_kernel_a.shape) == (32, 2)
    np.testing.assert_allclose(fresh.predict(x, verbose=0), before, rtol=1e-5, atol=1e-6)
    frozen = {layer.path: numpy_of(internals.base_weight(layer)) for layer in keras_hrp.hrp_layers(model)}
    for layer in keras_hrp.hrp_layers(fresh):  # the frozen weights, exactly
        np.testing.assert_array_equal(numpy_of(internals.base_weight(layer)), frozen[layer.path])
    other = _attention_model()
    keras_hrp.enable_hrp(other, rank=2, preheat_rank=8)  # per head
    other.compile("adam", logits_loss())
    with pytest.raises(ValueError, match="mha/query: saved with factorization 'full', the layer uses 'per_head'"):
        other.load_weights(path)


def test_full_factorization_errors():
    model = _attention_model()
    with pytest.raises(ValueError, match="enable_hrp: `factorization` must be one of .*factorization='heads'"):
        keras_hrp.enable_hrp(model, 2, 4, factorization="heads")
    with pytest.raises(ValueError, match="'mha/(query|value)' has LoRA rank at most 16.*rank=16"):
        keras_hrp.enable_hrp(model, 16, 20, factorization="full")
    model.get_layer("mha").query_dense.quantize("int8")
    with pytest.raises(ValueError, match="'mha/query' is quantized; factorization 'full'.*quantization_mode='int8'"):
        keras_hrp.enable_hrp(model, 2, 4, factorization="full")


def test_auto_rank_spends_the_budget_where_the_spectrum_is_flat(tmp_path):
    x, _ = _data()
    model = _attention_model()
    targets = ["query", "value", "ffn"]
    probe = keras_hrp.enable_hrp(_attention_model(), 2, 8, target_layer_names=targets, factorization="full")
    per_rank = sum(sum(lora.weight_matrix_shape(layer)) for layer in probe)
    budget = int(2.5 * per_rank)  # not a whole rank on every layer
    layers = keras_hrp.enable_hrp(model, rank="auto", preheat_rank=8, target_layer_names=targets,
                                  factorization="full", rank_budget=budget)
    assert all(layer.hrp_state.rank == 2 and layer.hrp_state.rank_budget == budget for layer in layers)
    base_output = model.predict(x, verbose=0)  # B = 0
    rng = np.random.default_rng(0)
    for layer in layers:  # a preheated delta of rank 1 on the query, flat ones elsewhere
        a, b = lora.lora_factors(layer)
        b_value = rng.normal(size=b.shape).astype("float32")
        if layer.name == "query":
            b_value[1:] = 0.0
        b.assign(b_value)
    report = keras_hrp.switch_to_main(model)
    ranks = {layer.name: layer.lora_rank for layer in layers}
    assert ranks["query"] == 1 and ranks["value"] + ranks["ffn"] > 5  # the query's share went to them
    assert {path: item.to_rank for path, item in report.items()} == {layer.path: layer.lora_rank for layer in layers}
    spent = sum(layer.lora_rank * sum(lora.weight_matrix_shape(layer)) for layer in layers)
    most = max(sum(lora.weight_matrix_shape(layer)) for layer in layers)
    assert budget - most < spent <= budget and all(layer.hrp_state.rank == layer.lora_rank for layer in layers)
    np.testing.assert_allclose(model.predict(x, verbose=0), base_output, rtol=1e-5, atol=1e-6)  # B = 0 again
    path = str(tmp_path / "auto.npz")
    keras_hrp.save_adapters(model, path)
    fresh = _attention_model()
    keras_hrp.load_adapters(fresh, path)
    assert {layer.name: layer.lora_rank for layer in keras_hrp.hrp_layers(fresh)} == ranks


def _switched_ranks(**kwargs):
    """Ranks after a switch from a rank-1 preheated query and flat value / ffn deltas."""
    keras.utils.set_random_seed(0)
    model = _attention_model()
    layers = keras_hrp.enable_hrp(model, preheat_rank=8, target_layer_names=["query", "value", "ffn"],
                                  factorization="full", **kwargs)
    rng = np.random.default_rng(0)
    for layer in layers:
        b = lora.lora_factors(layer)[1]
        b_value = rng.normal(size=b.shape).astype("float32")
        if layer.name == "query":
            b_value[1:] = 0.0
        b.assign(b_value)
    keras_hrp.switch_to_main(model)
    return {layer.name: layer.lora_rank for layer in layers}, layers


def test_by_default_rank_r_parameters_are_spread_like_auto_with_that_budget():
    spread, layers = _switched_ranks(rank=2)
    assert all(layer.hrp_state.auto_rank and layer.hrp_state.rank_budget is None for layer in layers)
    per_rank = sum(sum(lora.weight_matrix_shape(layer)) for layer in layers)
    auto, _ = _switched_ranks(rank="auto", rank_budget=2 * per_rank)
    assert spread == auto and spread["query"] == 1 and spread["value"] + spread["ffn"] > 4
    uniform, layers = _switched_ranks(rank=2, rank_allocation="uniform")
    assert uniform == {"query": 2, "value": 2, "ffn": 2} and not any(l.hrp_state.auto_rank for l in layers)
    plain = keras_hrp.enable_hrp(_attention_model(), 2)  # no preheat: no spectrum to spread by
    assert all(layer.lora_rank == 2 and not layer.hrp_state.auto_rank for layer in plain)


@pytest.mark.parametrize("kwargs,message", [
    ({"rank": 2, "preheat_rank": 8, "rank_allocation": "even"},
     "enable_hrp: `rank_allocation` must be one of \\('spectrum', 'uniform'\\).*rank_allocation='even'"),
    ({"rank": "auto", "preheat_rank": 8, "rank_budget": 10**6, "rank_allocation": "uniform"},
     '`rank="auto"` spreads ranks: it cannot be `rank_allocation="uniform"`.*rank_allocation=\'uniform\''),
    ({"rank": "auto", "rank_budget": 10**6}, '`rank="auto"` chooses ranks from a preheat.*preheat_rank=None'),
    ({"rank": "auto", "preheat_rank": 8}, '`rank="auto"` needs `rank_budget`.*rank_budget=None'),
    ({"rank": "auto", "preheat_rank": 8, "rank_budget": 10}, "cover rank 1 on every target layer.*rank_budget=10"),
    ({"rank": "auto", "preheat_rank": 4, "rank_budget": 10**6}, "pays rank .* `preheat_rank` must be larger"),
    ({"rank": "auto", "preheat_rank": 8, "rank_budget": 2.5}, "`rank_budget` must be an integer.*rank_budget=2.5"),
    ({"rank": 2, "preheat_rank": 8, "rank_budget": 1000}, '`rank_budget` is for `rank="auto"`.*rank=2'),
    ({"rank": "Auto", "preheat_rank": 8}, "`rank` must be an integer.*rank='Auto'"),
])
def test_auto_rank_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_hrp.enable_hrp(_attention_model(), **kwargs)
