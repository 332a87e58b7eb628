import os

import keras
import numpy as np
import pytest

import keras_hrp
from keras_hrp import HRPDense
from keras_hrp import internals
from tests.helpers import numpy_of


def _built(input_dim=10, **kwargs):
    layer = HRPDense(8, **kwargs)
    layer.build((None, input_dim))
    return layer


def test_without_rank_it_is_dense():
    x = np.random.default_rng(0).normal(size=(5, 10)).astype("float32")
    layer, dense = _built(activation="relu"), keras.layers.Dense(8, activation="relu")
    dense.build((None, 10))
    dense.set_weights(layer.get_weights())
    np.testing.assert_allclose(numpy_of(layer(x)), numpy_of(dense(x)), atol=1e-6)
    assert layer.hrp_phase is None and not layer.lora_enabled
    assert len(layer.weights) == 2


def test_preheat_build_and_scale():
    layer = _built(rank=2, preheat_rank=6, lora_alpha=4.0)
    assert layer.hrp_phase == "preheat" and layer.lora_rank == 6
    assert tuple(layer.lora_kernel_a.shape) == (10, 6)
    assert layer.lora_alpha / layer.lora_rank == pytest.approx(2.0)  # alpha / rank
    layer.lora_kernel_b.assign(np.ones((6, 8), "float32"))
    expected = numpy_of(internals.base_weight(layer)) + 2.0 * numpy_of(layer.lora_kernel_a) @ np.ones((6, 8))
    np.testing.assert_allclose(numpy_of(layer.kernel), expected, atol=1e-5)


def test_rank_only_is_plain_lora_in_main_phase():
    layer = _built(rank=3)
    assert layer.hrp_phase == "main" and layer.lora_rank == 3 and layer.lora_alpha == 3


def test_asymmetric_freezes_a():
    layer = _built(rank=2, preheat_rank=4, variant="asymmetric")
    assert not layer.lora_kernel_a.trainable and layer.lora_kernel_b.trainable
    assert [v.path.split("/")[-1] for v in layer.trainable_weights] == ["bias", "lora_kernel_b"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "'bad'.*`rank`.*Received: rank=0"),
        (dict(rank=2.5), "Received: rank=2.5"),
        (dict(rank=4, preheat_rank=4), "larger than `rank`.*preheat_rank=4, rank=4"),
        (dict(rank=4, preheat_rank=2), "preheat_rank=2"),
        (dict(rank=2, variant="sym"), "'bad'.*`variant`.*variant='sym'"),
        (dict(preheat_rank=8), "needs `rank`.*preheat_rank=8"),
        (dict(rank=2, lora_rank=2), "rank=2, lora_rank=2"),
    ],
)
def test_init_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HRPDense(8, name="bad", **kwargs)


def test_ranks_above_layer_size_fail_at_build():
    layer = HRPDense(8, rank=2, preheat_rank=9, name="small")
    with pytest.raises(ValueError, match=r"'small'.*min\(input_dim, units\) = 8.*preheat_rank=9"):
        layer.build((None, 20))


@pytest.mark.parametrize("phase", ["preheat", "main"])
def test_config_round_trip(phase):
    layer = HRPDense(
        8, rank=2, preheat_rank=6, lora_alpha=5.0, variant="asymmetric",
        activation="gelu", hrp_phase=phase, name="x",
    )
    config = layer.get_config()
    assert {k: config[k] for k in ("rank", "preheat_rank", "lora_alpha", "variant", "hrp_phase")} == {
        "rank": 2, "preheat_rank": 6, "lora_alpha": 5.0, "variant": "asymmetric", "hrp_phase": phase,
    }
    assert "lora_rank" not in config
    clone = HRPDense.from_config(config)
    clone.build((None, 10))
    assert clone.hrp_phase == phase and clone.lora_rank == (6 if phase == "preheat" else 2)
    assert clone.get_config() == config
    assert keras.layers.deserialize(keras.layers.serialize(clone)).get_config() == config


def _trained_layer_model(tmp_path):
    model = keras.Sequential([keras.Input((10,)), HRPDense(8, rank=2, preheat_rank=4)])
    model.layers[0].lora_kernel_b.assign(np.full((4, 8), 0.3, "float32"))
    return model


def test_weights_round_trip_keeps_the_adapter(tmp_path):
    model = _trained_layer_model(tmp_path)
    path = os.path.join(tmp_path, "m.weights.h5")
    model.save_weights(path)
    other = keras.Sequential([keras.Input((10,)), HRPDense(8, rank=2, preheat_rank=4)])
    other.load_weights(path)
    mine, theirs = model.layers[0], other.layers[0]
    np.testing.assert_array_equal(numpy_of(internals.base_weight(mine)), numpy_of(internals.base_weight(theirs)))
    for name in ("lora_kernel_a", "lora_kernel_b", "bias"):
        np.testing.assert_array_equal(numpy_of(getattr(mine, name)), numpy_of(getattr(theirs, name)))


def test_loading_merged_dense_weights_leaves_a_trainable_adapter():
    x = np.random.default_rng(0).normal(size=(4, 10)).astype("float32")
    dense = keras.layers.Dense(8)
    dense.build((None, 10))
    store = {}
    dense.save_own_variables(store)
    layer = _built(rank=2, preheat_rank=4)
    layer.load_own_variables(store)
    np.testing.assert_allclose(numpy_of(layer(x)), numpy_of(dense(x)), atol=1e-5)
    assert np.abs(numpy_of(layer.lora_kernel_a)).max() > 0  # so B gets gradients
    np.testing.assert_array_equal(numpy_of(layer.lora_kernel_b), 0.0)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_base_with_hrp_adapter_trains_and_switches(mode):
    x = np.random.default_rng(0).normal(size=(64, 16)).astype("float32")
    y = np.random.default_rng(1).normal(size=(64, 8)).astype("float32")
    model = keras.Sequential([keras.Input((16,)), HRPDense(8, rank=2, preheat_rank=6)])
    model.quantize(mode)
    layer = model.layers[0]
    assert layer.quantization_mode == mode and layer.lora_rank == 6
    model.compile(keras.optimizers.Adam(0.01), "mse")
    before = model.predict(x, verbose=0)
    model.fit(x, y, epochs=2, verbose=0, callbacks=[keras_hrp.HRPCallback(2, verbose=0)])
    assert layer.hrp_phase == "main" and tuple(layer.lora_kernel_a.shape) == (16, 2)
    assert layer.quantization_mode == mode
    b = numpy_of(layer.lora_kernel_b)
    assert np.abs(b).max() > 0  # trained after the switch
    assert not np.allclose(model.predict(x, verbose=0), before)


def test_main_phase_weights_load_into_a_preheating_layer(tmp_path):
    x = np.random.default_rng(0).normal(size=(4, 10)).astype("float32")
    model = keras.Sequential([keras.Input((10,)), HRPDense(8, rank=2, preheat_rank=4, name="h")])
    keras_hrp.switch_to_main(model)
    layer = model.layers[0]
    layer.lora_kernel_b.assign(np.full((2, 8), 0.3, "float32"))
    layer.hrp_state.preheat_updates = 7
    path = os.path.join(tmp_path, "main.weights.h5")
    model.save_weights(path)  # a plain save: HRPDense keeps its own format
    fresh = keras.Sequential([keras.Input((10,)), HRPDense(8, rank=2, preheat_rank=4, name="h")])
    assert fresh.layers[0].lora_rank == 4
    fresh.load_weights(path)
    state = fresh.layers[0].hrp_state
    assert state.phase == "main" and fresh.layers[0].lora_rank == 2 and state.preheat_updates == 7
    np.testing.assert_array_equal(numpy_of(fresh.layers[0].lora_kernel_b), numpy_of(layer.lora_kernel_b))
    np.testing.assert_allclose(fresh.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    other = keras.Sequential([keras.Input((10,)), HRPDense(8, rank=3, preheat_rank=4, name="h")])
    with pytest.raises(ValueError, match="'h'.*saved HRP state does not match.*\\(3, 4, 'classic'\\)"):
        other.load_weights(path)
