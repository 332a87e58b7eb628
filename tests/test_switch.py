import gc
import os
import warnings
import weakref

import keras
import numpy as np
import pytest

import keras_hrp
from keras_hrp import internals
from keras_hrp import lora
from tests.helpers import BACKEND
from tests.helpers import bert_classifier
from tests.helpers import REDUCED_POLICIES
from tests.helpers import dtype_policy
from tests.helpers import JIT_MODES
from tests.helpers import hrp_mlp
from tests.helpers import numpy_of
from tests.helpers import principal_angle_cos
from tests.helpers import regression_data


def _compiled(jit_compile=False, variant="classic", lr=0.01, **kwargs):
    model = hrp_mlp(variant=variant, **kwargs)
    model.compile(keras.optimizers.Adam(lr), "mse", jit_compile=jit_compile)
    return model


def _deltas(model):
    return {
        layer.path: np.matmul(*(numpy_of(m) for m in lora.factor_matrices(layer)))
        * lora.lora_scale(layer)
        for layer in keras_hrp.hrp_layers(model)
    }


@pytest.mark.parametrize("jit_compile", JIT_MODES)
def test_switch_invariants(jit_compile):
    x, y = regression_data()
    model = _compiled(jit_compile)
    before = model.predict(x, verbose=0)
    snapshot = keras_hrp.WeightSnapshot(model)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)  # preheat
    assert not np.allclose(model.predict(x, verbose=0), before)
    deltas = _deltas(model)

    report = keras_hrp.switch_to_main(model, snapshot)

    np.testing.assert_allclose(model.predict(x, verbose=0), before, rtol=1e-6, atol=1e-6)
    for layer in keras_hrp.hrp_layers(model):
        a, b = (numpy_of(v) for v in lora.lora_factors(layer))
        assert layer.hrp_phase == "main" and layer.lora_rank == 4
        assert a.shape == (internals.base_weight(layer).shape[0], 4) and b.shape == (4, 24)
        np.testing.assert_array_equal(b, 0.0)
        u, s, _ = np.linalg.svd(deltas[layer.path])
        assert principal_angle_cos(a, u[:, :4]) > 0.999
        np.testing.assert_allclose(np.linalg.norm(a), np.sqrt(2 * 4), rtol=1e-5)
        entry = report[layer.path]
        np.testing.assert_allclose(entry.singular_values, s[:12], rtol=1e-3, atol=1e-6)
        assert entry.energy == pytest.approx((s[:4] ** 2).sum() / (s**2).sum(), rel=1e-3)
        assert (entry.from_rank, entry.to_rank, entry.fallback) == (12, 4, None)
    shapes = [tuple(v.shape) for v in model.trainable_variables + model.optimizer.variables]
    assert not [s for s in shapes if 12 in s]  # no rank-R variable left anywhere
    assert int(numpy_of(model.optimizer.iterations)) == 0

    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    assert history.history["loss"][-1] < 0.8 * history.history["loss"][0]


def test_scale_is_the_same_in_both_phases():
    model = _compiled(lora_alpha=8.0)  # rank 4: scale 2
    layer = model.get_layer("hrp_1")
    assert lora.lora_scale(layer) == 2.0 and layer.lora_alpha == 24.0  # 2 * R
    x, y = regression_data()
    model.fit(x, y, epochs=1, verbose=0)
    keras_hrp.switch_to_main(model)
    assert lora.lora_scale(layer) == 2.0 and layer.lora_alpha == 8.0
    layer.lora_kernel_b.assign(np.ones((4, 24), "float32"))
    expected = numpy_of(internals.base_weight(layer)) + 2.0 * numpy_of(layer.lora_kernel_a) @ np.ones((4, 24))
    np.testing.assert_allclose(numpy_of(layer.kernel), expected, atol=1e-5)


def test_asymmetric_keeps_a_fixed_in_both_phases():
    x, y = regression_data()
    model = _compiled(variant="asymmetric")
    layer = model.get_layer("hrp_1")
    a0 = numpy_of(layer.lora_kernel_a)
    model.fit(x, y, epochs=2, verbose=0)
    np.testing.assert_array_equal(numpy_of(layer.lora_kernel_a), a0)
    keras_hrp.switch_to_main(model)
    a1 = numpy_of(layer.lora_kernel_a)
    assert a1.shape == (32, 4) and not layer.lora_kernel_a.trainable
    # The kept directions lie in span(A0): the delta's column space.
    residual = a1 - a0 @ np.linalg.lstsq(a0, a1, rcond=None)[0]
    assert np.abs(residual).max() < 1e-4
    model.fit(x, y, epochs=2, verbose=0)
    np.testing.assert_array_equal(numpy_of(layer.lora_kernel_a), a1)
    assert np.abs(numpy_of(layer.lora_kernel_b)).max() > 0


def test_snapshot_skips_frozen_weights():
    inputs = keras.Input((32,))
    frozen = keras.layers.Dense(256, name="frozen_big")
    h = frozen(inputs)
    h = keras_hrp.HRPDense(24, rank=2, preheat_rank=8, name="hrp")(h)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(h))
    frozen.trainable = False
    snapshot = keras_hrp.WeightSnapshot(model)
    # hrp bias (24) + head kernel and bias (24*4 + 4); no frozen kernel, no
    # HRP base kernel, no adapter.
    assert len(snapshot) == 3
    assert snapshot.nbytes == (24 + 24 * 4 + 4) * 4


def test_without_snapshot_other_weights_keep_their_training():
    x, y = regression_data()
    model = _compiled()
    head0 = numpy_of(model.get_layer("head").kernel)
    model.fit(x, y, epochs=1, verbose=0)
    trained = numpy_of(model.get_layer("head").kernel)
    assert not np.allclose(trained, head0)
    keras_hrp.switch_to_main(model, snapshot=None)
    np.testing.assert_array_equal(numpy_of(model.get_layer("head").kernel), trained)


def test_non_finite_delta_falls_back_and_training_goes_on():
    x, y = regression_data()
    model = _compiled()
    model.get_layer("hrp_1").lora_kernel_b.assign(np.ones((12, 24), "float32"))
    bad = model.get_layer("hrp_2")
    bad.lora_kernel_b.assign(np.full((12, 24), np.nan, "float32"))
    with pytest.warns(UserWarning, match="'hrp_2'.*falls back.*non-finite"):
        report = keras_hrp.switch_to_main(model, keras_hrp.WeightSnapshot(model))
    assert report.fallbacks == {bad.path: "non-finite preheated adapter"}
    assert report[model.get_layer("hrp_1").path].fallback is None
    a = numpy_of(bad.lora_kernel_a)
    assert a.shape == (24, 4) and np.all(np.isfinite(a)) and np.abs(a).max() > 0
    history = model.fit(x, y, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_zero_delta_falls_back():
    model = _compiled()
    with pytest.warns(UserWarning, match="preheated delta is zero"):
        report = keras_hrp.switch_to_main(model)
    assert len(report.fallbacks) == 2


def test_failed_svd_falls_back_on_that_layer_only(monkeypatch):
    from keras_hrp import switch

    model = _compiled()
    for name in ("hrp_1", "hrp_2"):
        model.get_layer(name).lora_kernel_b.assign(np.ones((12, 24), "float32"))
    svd = switch._compiled_svd()
    calls = []

    def failing_once(a, b):
        calls.append(a.shape)
        if len(calls) == 2:
            raise np.linalg.LinAlgError("SVD did not converge")
        return svd(a, b)

    monkeypatch.setattr(switch, "_compiled_svd", lambda: failing_once)
    with pytest.warns(UserWarning, match="'hrp_2'.*falls back.*SVD failed: SVD did not converge"):
        report = keras_hrp.switch_to_main(model)
    assert len(calls) == 2  # one decomposition per layer
    assert report.fallbacks == {model.get_layer("hrp_2").path: "SVD failed: SVD did not converge"}
    assert report[model.get_layer("hrp_1").path].to_rank == 4 and np.isnan(report[model.get_layer("hrp_2").path].energy)
    assert numpy_of(model.get_layer("hrp_2").lora_kernel_a).shape == (24, 4)


def test_switch_errors_without_preheating_layers():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)], name="plain")
    with pytest.raises(ValueError, match="'plain'.*no HRP layer.*phases=\\[\\]"):
        keras_hrp.switch_to_main(model)


def _sequential_hrp():
    return keras.Sequential(
        [keras.Input((32,)), keras_hrp.HRPDense(24, rank=4, preheat_rank=12, name="hrp_1"),
         keras.layers.Dense(16)]
    )


@pytest.mark.skipif(BACKEND != "torch", reason="torch's ParameterDict registry only")
@pytest.mark.parametrize("make", [hrp_mlp, _sequential_hrp], ids=["functional", "sequential"])
def test_torch_registry_holds_only_the_new_adapters(make):
    x, y = regression_data(n=64)
    model = make()
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    model.get_layer("hrp_1").lora_kernel_b.assign(np.ones((12, 24), "float32"))
    keras_hrp.switch_to_main(model)
    layer = model.get_layer("hrp_1")
    params = dict(model.named_parameters())
    assert not [name for name, p in params.items() if 12 in tuple(p.shape)]
    assert any(p is layer.lora_kernel_b.value for p in params.values())
    norms = []  # with learning rate 0, a gradient that is not zeroed grows
    for _ in range(3):
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
        norms.append(float(layer.lora_kernel_b.value.grad.norm()))
    assert norms[0] > 0
    np.testing.assert_allclose(norms, norms[0], rtol=1e-5)


def test_switch_warns_nothing_for_healthy_layers():
    x, y = regression_data()
    model = _compiled()
    model.fit(x, y, epochs=1, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        keras_hrp.switch_to_main(model)


def test_fresh_optimizer_keeps_type_and_hyperparameters():
    x, y = regression_data()
    model = hrp_mlp()
    inner = keras.optimizers.AdamW(learning_rate=0.003, weight_decay=0.01, beta_1=0.8)
    model.compile(keras.optimizers.LossScaleOptimizer(inner), "mse")
    model.fit(x, y, epochs=1, verbose=0)
    keras_hrp.switch_to_main(model)
    fresh = model.optimizer
    assert isinstance(fresh, keras.optimizers.LossScaleOptimizer)
    assert isinstance(fresh.inner_optimizer, keras.optimizers.AdamW)
    assert fresh.inner_optimizer.beta_1 == 0.8 and fresh.inner_optimizer.weight_decay == 0.01
    assert int(numpy_of(fresh.iterations)) == 0
    assert not [v for v in fresh.variables if 12 in tuple(v.shape)]
    history = model.fit(x, y, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize("setup", ["plain", "loss_scale", "mixed_float16"])
def test_switch_releases_the_old_optimizer_and_adapters(setup):
    x, y = regression_data(n=64)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16" if setup == "mixed_float16" else policy)
    try:
        model = hrp_mlp()
    finally:
        keras.config.set_dtype_policy(policy)
    optimizer = keras.optimizers.Adam(0.01)
    model.compile(keras.optimizers.LossScaleOptimizer(optimizer) if setup == "loss_scale" else optimizer, "mse")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    old = [weakref.ref(model.optimizer), *(weakref.ref(v) for v in lora.lora_factors(model.get_layer("hrp_1")))]
    del optimizer
    keras_hrp.switch_to_main(model)
    gc.collect()
    # Keras' saved compile() arguments held the old optimizer, its slots and the rank-R adapters.
    assert [ref() for ref in old] == [None, None, None]
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.parametrize("jit_compile", JIT_MODES)
def test_truncated_delta_keeps_the_best_rank_r_part_of_the_preheat(jit_compile):
    x, y = regression_data()
    model = _compiled(jit_compile)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    deltas = _deltas(model)
    report = keras_hrp.switch_to_main(model, init="truncated_delta")
    for layer in keras_hrp.hrp_layers(model):
        u, s, vt = np.linalg.svd(deltas[layer.path])
        best = (u[:, :4] * s[:4]) @ vt[:4]
        np.testing.assert_allclose(_deltas(model)[layer.path], best, atol=1e-5 * s[0])
        a, b = (numpy_of(v) for v in lora.lora_factors(layer))
        np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-4)
        assert report[layer.path].fallback is None
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_warmup_ramps_the_fresh_learning_rate():
    x, y = regression_data(n=64)
    model = _compiled(lr=0.01)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    keras_hrp.switch_to_main(model, warmup_steps=4)
    assert float(numpy_of(model.optimizer.learning_rate)) == pytest.approx(0.0025)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # 2 steps
    assert float(numpy_of(model.optimizer.learning_rate)) == pytest.approx(0.0075)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert float(numpy_of(model.optimizer.learning_rate)) == pytest.approx(0.01)


def test_warmup_wraps_a_schedule_inside_a_loss_scale_optimizer(tmp_path):
    x, y = regression_data(n=64)
    model = hrp_mlp()
    decay = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=1, decay_rate=0.5)
    model.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(decay)), "mse")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    keras_hrp.switch_to_main(model, warmup_steps=2)
    assert float(numpy_of(model.optimizer.learning_rate)) == pytest.approx(0.005)  # 0.01 * 1/2
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert float(numpy_of(model.optimizer.learning_rate)) == pytest.approx(0.0025)  # 0.01 / 4
    path = os.path.join(tmp_path, "warm.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def test_switch_option_errors():
    model = _compiled()
    with pytest.raises(ValueError, match="switch_to_main.*`init`.*init='svd'"):
        keras_hrp.switch_to_main(model, init="svd")
    with pytest.raises(ValueError, match="switch_to_main.*warmup_steps=-1"):
        keras_hrp.switch_to_main(model, warmup_steps=-1)
    assert keras_hrp.hrp_layers(model, phase="preheat")  # nothing switched


@pytest.mark.parametrize("kind", ["dense", "hub"])
@pytest.mark.parametrize("policy", REDUCED_POLICIES)
def test_adapters_stay_float32_and_keep_training_under_reduced_precision(policy, kind):
    """keras-hub #2629: bfloat16 adapters stopped updating once Adam's second
    moment underflowed. Every adapter keras-hrp creates is float32, with
    float32 slots, before and after the switch, and still trains after it."""
    with dtype_policy(policy):
        if kind == "hub":
            pytest.importorskip("keras_hub", reason="needs the [hub] extra (keras-hub)")
            model, x, y, loss = bert_classifier(dropout=0.0)
            keras_hrp.enable_hrp(model, rank=2, preheat_rank=6)
        else:
            (x, y), model, loss = regression_data(n=64), hrp_mlp(rank=2, preheat_rank=8), "mse"
    model.compile(keras.optimizers.Adam(1e-3), loss=loss)

    def factors():
        return [v for layer in keras_hrp.hrp_layers(model) for v in lora.lora_factors(layer)]

    def assert_float32():
        assert {v.dtype for v in factors()} == {"float32"}, policy
        slots = [v for v in model.optimizer.variables if "lora_kernel" in v.path]  # Adam's, by name
        assert slots and {v.dtype for v in slots} == {"float32"}

    def assert_trains(fit):
        start = [numpy_of(v) for v in factors()]
        fit()
        assert_float32()
        moved = [np.abs(numpy_of(v) - s).max() for v, s in zip(factors(), start)]
        # Every B updates, and A somewhere (on the toy tasks the query's A
        # gradient is ~1e-13 after the switch, in float32 too).
        assert min(moved[1::2]) > 1e-5 and max(moved[0::2]) > 1e-5, moved

    assert {v.dtype for v in factors()} == {"float32"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fit ended after 4 preheat updates"
        assert_trains(lambda: keras.Model.fit(model, x, y, batch_size=16, epochs=1, verbose=0,
                                              callbacks=[keras_hrp.HRPCallback(100, verbose=0)]))
    assert not keras_hrp.switch_to_main(model).fallbacks  # the preheat trained
    assert_trains(lambda: keras.Model.fit(model, x, y, batch_size=16, epochs=2, verbose=0))
