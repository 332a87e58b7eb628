"""Writes an adapter file on one backend, for tests on another.

    KERAS_BACKEND=jax python -m tests.adapter_writer OUT_DIR
"""

import os
import sys

import keras
import numpy as np

import keras_hrp


def tiny_model():
    """Embedding -> attention -> Dense head; same structure on every backend."""
    tokens = keras.Input((12,), dtype="int32")
    h = keras.layers.Embedding(100, 32, name="embed")(tokens)
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(h, h)
    h = keras.layers.Dense(32, activation="gelu", name="ffn")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(3, name="head")(h), name="tiny")


def probe_tokens():
    return np.random.default_rng(7).integers(0, 100, size=(4, 12)).astype("int32")


def write(out_dir):
    keras.utils.set_random_seed(3)
    model = tiny_model()
    model.save_weights(os.path.join(out_dir, "base.weights.h5"))
    keras_hrp.enable_hrp(model, rank=2, preheat_rank=6, target_layer_names=["query", "value", "ffn", "embed"])
    rng = np.random.default_rng(0)
    for layer in keras_hrp.hrp_layers(model):
        for variable in layer.trainable_weights:
            variable.assign(rng.normal(size=variable.shape).astype("float32") * 0.1)
    keras_hrp.save_adapters(model, os.path.join(out_dir, "adapters.npz"))
    np.save(os.path.join(out_dir, "outputs.npy"), model.predict(probe_tokens(), verbose=0))


if __name__ == "__main__":
    write(sys.argv[1])
