"""Initialization strategies for LoRA factors: pure functions of tensors."""

from keras_hrp.initializers.hrp import directions_from_svd
from keras_hrp.initializers.hrp import expected_norm
from keras_hrp.initializers.hrp import preheated_a
from keras_hrp.initializers.hrp import preheated_factors
from keras_hrp.initializers.hrp import truncated_from_svd
from keras_hrp.initializers.baselines import eva
from keras_hrp.initializers.baselines import gaussian
from keras_hrp.initializers.baselines import lora_ga
from keras_hrp.initializers.baselines import milora
from keras_hrp.initializers.baselines import olora
from keras_hrp.initializers.baselines import oracle
from keras_hrp.initializers.baselines import pissa
