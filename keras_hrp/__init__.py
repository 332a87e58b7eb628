"""keras-hrp: High-Rank Preheating initialization for Keras 3 LoRA."""

from keras_hrp import checkpoints
from keras_hrp import gradients
from keras_hrp.adapters import load_adapters
from keras_hrp.adapters import revive_adapters
from keras_hrp.adapters import save_adapters
from keras_hrp.callbacks import HRPCallback
from keras_hrp.checkpoints import load_model
from keras_hrp.hub import enable_hrp
from keras_hrp.initialize import initialize_lora
from keras_hrp.layers import HRPDense
from keras_hrp.linalg import randomized_svd
from keras_hrp.linalg import svd_of_product
from keras_hrp.linalg import truncated_svd
from keras_hrp.peft_export import export_peft
from keras_hrp.peft_import import import_peft
from keras_hrp.state import HRPState
from keras_hrp.state import hrp_layers
from keras_hrp.switch import SwitchReport
from keras_hrp.switch import WeightSnapshot
from keras_hrp.switch import switch_to_main

__version__ = "0.1.0"
