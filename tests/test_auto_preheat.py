"""`preheat_steps="auto"`: switching once the preheat's top subspaces settle."""

import json

import keras
import numpy as np
import pytest

import keras_hrp
from keras_hrp import auto_preheat
from keras_hrp import lora
from tests.helpers import JIT_MODES
from tests.helpers import hrp_mlp
from tests.helpers import numpy_of
from tests.helpers import principal_angle_cos
from tests.helpers import regression_data


def _fit(epochs=4, jit_compile=False, preheat_steps="auto", **callback_kwargs):
    x, y = regression_data()
    model = hrp_mlp(rank=2, preheat_rank=12)
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=jit_compile)
    before = model.predict(x, verbose=0)
    hrp = keras_hrp.HRPCallback(preheat_steps, verbose=0, **callback_kwargs)
    model.fit(x, y, batch_size=32, epochs=epochs, callbacks=[hrp], verbose=0)
    return model, hrp, before


def test_top_directions_are_the_deltas_top_left_singular_vectors():
    model = hrp_mlp(rank=2, preheat_rank=12)
    layer = model.get_layer("hrp_1")
    assert auto_preheat.top_directions(layer) is None  # B = 0: no delta yet
    a, b = (numpy_of(v) for v in lora.lora_factors(layer))
    b = np.random.default_rng(0).normal(size=b.shape).astype("float32")
    lora.lora_factors(layer)[1].assign(b)
    u = auto_preheat.top_directions(layer)
    expected = np.linalg.svd(a @ b)[0][:, :2]
    assert u.shape == (32, 2)
    assert principal_angle_cos(u, expected) > 1 - 1e-5


def test_tracker_is_stable_once_nothing_moves():
    model = hrp_mlp(rank=2, preheat_rank=12)
    for layer in keras_hrp.hrp_layers(model):
        b = lora.lora_factors(layer)[1]
        b.assign(np.random.default_rng(1).normal(size=b.shape).astype("float32"))
    tracker = auto_preheat.SubspaceTracker()
    assert not tracker.check(model, 10, stable_degrees=1.0)  # nothing to compare with yet
    assert tracker.check(model, 20, stable_degrees=1.0)
    assert tracker.checks[0].angle is None and tracker.checks[1].angle < 0.1
    layer = model.get_layer("hrp_2")
    b = lora.lora_factors(layer)[1]
    b.assign(np.random.default_rng(2).normal(size=b.shape).astype("float32"))
    assert not tracker.check(model, 30, stable_degrees=1.0) and tracker.checks[2].angle > 1.0
    header, arrays = tracker.to_arrays()
    copy = auto_preheat.SubspaceTracker.from_arrays(json.loads(json.dumps(header)), arrays)
    assert copy.checks == tracker.checks
    b.assign(np.random.default_rng(3).normal(size=b.shape).astype("float32"))
    assert not copy.check(model, 40, stable_degrees=1.0) and copy.checks[-1].angle > 1.0  # compared with step 30


@pytest.mark.parametrize("jit_compile", JIT_MODES)
def test_auto_preheat_switches_once_stable(jit_compile):
    model, hrp, before = _fit(jit_compile=jit_compile, check_every=4, stable_degrees=20.0, max_preheat_steps=100)
    assert hrp.report.reason.startswith("stable")
    angles = [check.angle for check in hrp.report.checks]
    assert angles[0] is None and angles[-1] < 20.0 and all(a >= 20.0 for a in angles[1:-1])
    assert hrp.switch_step % 4 == 0 and hrp.switch_step == hrp.report.checks[-1].step
    assert hrp.switch_step < hrp.max_preheat_steps
    assert all(layer.hrp_phase == "main" and layer.lora_rank == 2 for layer in keras_hrp.hrp_layers(model))


def test_auto_preheat_stops_at_its_limit():
    model, hrp, _ = _fit(check_every=2, stable_degrees=1e-6, max_preheat_steps=9)
    assert hrp.switch_step == 9
    assert hrp.report.reason.startswith("max_preheat_steps=9 reached")
    assert [check.step for check in hrp.report.checks] == [2, 4, 6, 8]


def test_auto_preheat_errors():
    with pytest.raises(ValueError, match="HRPCallback.*positive integer, 'auto' or None.*preheat_steps='soon'"):
        keras_hrp.HRPCallback("soon")
    with pytest.raises(ValueError, match="HRPCallback.*below 90.*stable_degrees=90"):
        keras_hrp.HRPCallback(stable_degrees=90)
    with pytest.raises(ValueError, match="HRPCallback.*check_every=0"):
        keras_hrp.HRPCallback(check_every=0)


def test_auto_preheat_limit_defaults_to_a_tenth_of_the_fit():
    model, hrp, _ = _fit(epochs=10, check_every=3, stable_degrees=1e-6)  # 10 epochs of 8 steps
    assert hrp.switch_step == 8
    assert hrp.report.reason.startswith("max_preheat_steps=8 reached")
    assert [check.step for check in hrp.report.checks] == [3, 6]


def test_default_preheat_is_a_fixed_tenth_of_the_fit():
    model, hrp, _ = _fit(epochs=10, preheat_steps=None)  # 10 epochs of 8 steps
    assert hrp.switch_step == 8 and hrp.report.reason == "preheat_steps=8 (a tenth of the fit)"
    assert hrp.report.checks == []  # no subspace checks: the length is fixed
    assert all(layer.hrp_phase == "main" for layer in keras_hrp.hrp_layers(model))


def test_default_preheat_without_a_known_length_warns_and_caps_at_100():
    x, y = regression_data()
    model = hrp_mlp(rank=2, preheat_rank=12)
    model.compile(keras.optimizers.Adam(0.01), "mse")

    def batches():  # a generator: the fit does not know its length
        for start in range(0, len(x), 32):
            yield x[start:start + 32], y[start:start + 32]

    hrp = keras_hrp.HRPCallback(verbose=0)
    with pytest.warns(UserWarning) as caught:
        model.fit(batches(), epochs=1, callbacks=[hrp], verbose=0)
    messages = [str(w.message) for w in caught]
    assert any("does not know its length" in m and "capped at 100" in m for m in messages)
    assert any("still at their preheating rank" in m and "100 (preheat_steps)" in m for m in messages)
    assert hrp.report is None and all(layer.hrp_phase == "preheat" for layer in keras_hrp.hrp_layers(model))


def test_short_runs_get_checks_by_default():
    model, hrp, _ = _fit(epochs=5, stable_degrees=1e-6)  # 40 updates: the cap is 4, a check each update
    assert hrp.switch_step == 4
    assert [check.step for check in hrp.report.checks] == [1, 2, 3, 4]
    assert all(check.angle is not None for check in hrp.report.checks[1:])
    assert hrp.report.reason.startswith("max_preheat_steps=4 reached before the subspaces were stable")
    assert f"{hrp.report.checks[-1].angle:.1f} degrees" in hrp.report.reason


def test_a_cap_before_two_checks_says_so():
    model, hrp, _ = _fit(check_every=5, max_preheat_steps=6)
    assert [check.step for check in hrp.report.checks] == [5]
    assert "after 1 check(s), too few to compare" in hrp.report.reason
    assert "check_every" in hrp.report.reason
