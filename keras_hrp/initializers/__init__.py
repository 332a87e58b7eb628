"""Initialization strategies for LoRA factors: pure functions of tensors."""

from keras_hrp.initializers.hrp import expected_norm
from keras_hrp.initializers.hrp import preheated_a
