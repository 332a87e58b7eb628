import keras
import numpy as np
import pytest

from keras_hrp.schedules import LinearWarmup
from tests.helpers import numpy_of


def test_ramp_then_constant():
    schedule = LinearWarmup(0.1, warmup_steps=4)
    values = [float(numpy_of(schedule(step))) for step in range(6)]
    np.testing.assert_allclose(values, [0.025, 0.05, 0.075, 0.1, 0.1, 0.1], rtol=1e-6)


def test_wraps_a_schedule_and_round_trips():
    decay = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=1, decay_rate=0.5)
    schedule = LinearWarmup(decay, warmup_steps=2)
    assert float(numpy_of(schedule(1))) == pytest.approx(0.5)
    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert isinstance(restored, LinearWarmup)
    assert float(numpy_of(restored(0))) == pytest.approx(0.5 * 1.0)
    assert float(numpy_of(restored(3))) == pytest.approx(0.125)


def test_error():
    with pytest.raises(ValueError, match="LinearWarmup.*warmup_steps=0"):
        LinearWarmup(0.1, 0)
