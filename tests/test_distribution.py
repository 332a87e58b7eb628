"""HRP under distribution: keras.distribution (JAX), tf.distribute, torch DDP.

The JAX tests need 4 virtual CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=4`, as `make test` runs
this module); TensorFlow and torch each train in fresh processes.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_hrp
from keras_hrp import lora
from tests.helpers import BACKEND
from tests.helpers import hrp_mlp
from tests.helpers import numpy_of
from tests.helpers import regression_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jax_devices():
    if BACKEND != "jax":
        return 0
    import jax

    return len(jax.devices())


needs_jax_devices = pytest.mark.skipif(
    _jax_devices() < 4,
    reason="keras.distribution on the JAX backend with 4 virtual CPU devices "
    "(XLA_FLAGS=--xla_force_host_platform_device_count=4; make test sets it)",
)


def _worker(mode, tmp_path):
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.distributed_worker", mode, str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture
def data_parallel():
    import jax

    distribution = keras.distribution.DataParallel(devices=jax.devices()[:4])
    keras.distribution.set_distribution(distribution)
    yield distribution
    keras.distribution.set_distribution(None)


@needs_jax_devices
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


@needs_jax_devices
def test_data_parallel_output_unchanged_at_switch(data_parallel):
    x, y = regression_data()
    model = hrp_mlp()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    before = model.predict(x, verbose=0)
    snapshot = keras_hrp.WeightSnapshot(model)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    keras_hrp.switch_to_main(model, snapshot)
    np.testing.assert_allclose(model.predict(x, verbose=0), before, rtol=1e-5, atol=1e-5)


def _specs(model):
    """Sharding spec of every adapter and of its optimizer slots, by path."""
    specs = {}
    slots = {v.name: v for v in getattr(model.optimizer, "variables", [])}
    for layer in keras_hrp.hrp_layers(model):
        for variable in lora.lora_factors(layer):
            specs[variable.path] = tuple(variable.value.sharding.spec)
            prefix = variable.path.replace("/", "_")
            for name, slot in slots.items():
                if name.startswith(prefix):
                    specs[name.replace(prefix, variable.path + ":")] = tuple(slot.value.sharding.spec)
    return specs


# (enable_hrp settings, layouts of A and B): Keras' per-head factors of
# (heads, hidden, head_dim) kernels, and the standard ones (A: hidden x r,
# B: r x heads * head_dim) with ranks chosen at the switch.
PARALLEL = {
    "per_head": ({"rank": 2, "rank_allocation": "uniform"}, ("model", None, None), (None, "model")),
    "full, rank auto": ({"rank": "auto", "rank_budget": 2 * 4 * 32, "factorization": "full"},
                        ("model", None), (None, "model")),
}


@needs_jax_devices
@pytest.mark.parametrize("setting", PARALLEL)
def test_model_parallel_keeps_adapter_and_slot_layouts_across_the_switch(setting):
    keras_hub = pytest.importorskip("keras_hub", reason="needs the [hub] extra (keras-hub)")
    import jax

    options, a_layout, b_layout = PARALLEL[setting]
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"), jax.devices()[:4])
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    layout_map["decoder_block.*attention.*(query|value).lora_kernel_a"] = a_layout
    layout_map["decoder_block.*attention.*(query|value).lora_kernel_b"] = b_layout
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    keras.distribution.set_distribution(distribution)
    try:
        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=64, num_layers=2, num_query_heads=2, num_key_value_heads=2,
            hidden_dim=16, intermediate_dim=32, head_dim=8,
        )
        task = keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
        layers = keras_hrp.enable_hrp(task, preheat_rank=6, **options)
        rng = np.random.default_rng(0)
        x = {"token_ids": rng.integers(1, 64, size=(32, 8)).astype("int32"),
             "padding_mask": np.ones((32, 8), "int32")}
        y = np.roll(x["token_ids"], -1, axis=1)
        task.compile(optimizer=keras.optimizers.Adam(3e-3),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        seen = {}

        class Layouts(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if batch == 0:
                    seen["preheat"] = _specs(self.model)

        hrp = keras_hrp.HRPCallback(2, verbose=0)
        keras.Model.fit(task, x, y, batch_size=8, epochs=1, verbose=0, callbacks=[Layouts(), hrp])
        after = _specs(task)
    finally:
        keras.distribution.set_distribution(None)
    assert hrp.switch_step == 2 and not hrp.report.fallbacks
    if options["rank"] == "auto":  # 4 layers, each 16 + 16 parameters a rank
        assert sum(layer.lora_rank * 32 for layer in layers) <= options["rank_budget"]
        assert all(1 <= layer.lora_rank < 6 for layer in layers)
    else:
        assert all(layer.lora_rank == 2 for layer in layers)
    assert seen["preheat"] == after  # every adapter and slot keeps its layout
    assert any(":" in key for key in after)  # Adam's slots are in the comparison
    assert {spec for key, spec in after.items() if key.endswith("lora_kernel_a")} == {a_layout}
    assert {spec for key, spec in after.items() if key.endswith("lora_kernel_b")} == {b_layout}


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute is TensorFlow's")
def test_tf_mirrored_strategy_trains_across_the_switch(tmp_path):
    _worker("mirrored", tmp_path)
    with open(os.path.join(tmp_path, "mirrored.json")) as stream:
        report = json.load(stream)
    assert report["replicas"] == 2 and report["switch_step"] == 4 and report["ranks"] == [4, 4]
    assert report["adapters"] == ["MirroredVariable"] and report["slots"] == ["MirroredVariable"]
    assert report["slot_count"] == 8 and report["b_max"] > 0  # Adam: 2 slots x 4 adapters
    assert all(np.isfinite(report["loss"]))


@pytest.mark.skipif(BACKEND != "torch", reason="DistributedDataParallel is torch's")
def test_torch_ddp_replicas_agree_bit_for_bit(tmp_path):
    _worker("ddp", tmp_path)
    with np.load(os.path.join(tmp_path, "ddp_rank0.npz")) as zero, \
            np.load(os.path.join(tmp_path, "ddp_rank1.npz")) as one:
        assert sorted(zero.files) == sorted(one.files) and int(zero["fallbacks"]) == 0
        for key in zero.files:
            np.testing.assert_array_equal(zero[key], one[key], err_msg=key)
        for layer in ("hrp_1", "hrp_2"):
            assert zero[f"{layer}.A"].shape[1] == 4 and np.abs(zero[f"{layer}.B"]).max() > 0
            assert not np.array_equal(zero[f"{layer}.A"], zero[f"{layer}.switched_A"])  # trained on
