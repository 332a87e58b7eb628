"""HRP under keras.distribution (JAX; run with 4 virtual CPU devices)."""

import keras
import numpy as np
import pytest

import keras_hrp
from tests.helpers import BACKEND
from tests.helpers import hrp_mlp
from tests.helpers import numpy_of
from tests.helpers import regression_data

if BACKEND != "jax":
    pytest.skip("keras.distribution runs on the JAX backend only", allow_module_level=True)

import jax  # noqa: E402

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 4,
    reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=4 (make test sets it)",
)


@pytest.fixture
def data_parallel():
    distribution = keras.distribution.DataParallel(devices=jax.devices()[:4])
    keras.distribution.set_distribution(distribution)
    yield distribution
    keras.distribution.set_distribution(None)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_data_parallel_switch(data_parallel, jit_compile):
    x, y = regression_data()
    model = hrp_mlp()
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=jit_compile)
    hrp = keras_hrp.HRPCallback(4, verbose=0)
    model.fit(x, y, batch_size=32, epochs=1, callbacks=[hrp], verbose=0)
    assert hrp.switch_step == 4
    layer = model.get_layer("hrp_1")
    a = layer.lora_kernel_a
    assert tuple(a.shape) == (32, 4)
    assert len(a.value.sharding.device_set) == 4  # replicated on all devices
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert np.abs(numpy_of(layer.lora_kernel_b)).max() > 0


def test_data_parallel_output_unchanged_at_switch(data_parallel):
    x, y = regression_data()
    model = hrp_mlp()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    before = model.predict(x, verbose=0)
    snapshot = keras_hrp.WeightSnapshot(model)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    keras_hrp.switch_to_main(model, snapshot)
    np.testing.assert_allclose(model.predict(x, verbose=0), before, rtol=1e-5, atol=1e-5)
