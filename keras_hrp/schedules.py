"""`LinearWarmup`: a learning rate that ramps up after the HRP switch."""

import keras
from keras import ops

from keras_hrp import settings


@keras.saving.register_keras_serializable(package="keras_hrp")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Scales a learning rate (or schedule) by `min(1, (step + 1) / warmup_steps)`.

    Args:
        learning_rate: a float or a `LearningRateSchedule`.
        warmup_steps: steps to reach the full learning rate.

    Example:

    >>> schedule = LinearWarmup(1e-3, warmup_steps=10)
    >>> round(float(schedule(0)), 8)  # 1e-4 on the first step (float32)
    0.0001
    """

    def __init__(self, learning_rate, warmup_steps):
        self.learning_rate = learning_rate
        self.warmup_steps = settings.integer("LinearWarmup", "warmup_steps", warmup_steps, minimum=1)

    def __call__(self, step):
        base = self.learning_rate
        if isinstance(base, keras.optimizers.schedules.LearningRateSchedule):
            base = base(step)
        ramp = ops.minimum(1.0, (ops.cast(step, "float32") + 1.0) / self.warmup_steps)
        return base * ramp

    def get_config(self):
        learning_rate = self.learning_rate
        if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            learning_rate = keras.optimizers.schedules.serialize(learning_rate)
        return {"learning_rate": learning_rate, "warmup_steps": self.warmup_steps}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["learning_rate"], dict):
            config["learning_rate"] = keras.optimizers.schedules.deserialize(
                config["learning_rate"]
            )
        return cls(**config)
