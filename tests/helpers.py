"""Small models and data shared by the tests."""

import keras
import numpy as np
from keras import ops

import keras_hrp

BACKEND = keras.backend.backend()
# jit_compile settings worth covering on this backend (torch.compile is
# covered once, in its own test, for its compile time).
JIT_MODES = [False, True] if BACKEND != "torch" else [False]


def regression_data(n=256, d_in=32, d_out=16, seed=0):
    """A linear target whose update from zero has a decaying spectrum."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)).astype("float32")
    u, _ = np.linalg.qr(rng.normal(size=(d_in, d_in)))
    v, _ = np.linalg.qr(rng.normal(size=(d_out, d_out)))
    s = 2.0 ** -np.arange(min(d_in, d_out))
    w = (u[:, : len(s)] * s) @ v[:, : len(s)].T
    y = (x @ w).astype("float32")
    return x, y


def hrp_mlp(rank=4, preheat_rank=12, variant="classic", lora_alpha=None, d_in=32, d_out=16):
    """HRPDense -> BatchNorm -> HRPDense, with a trainable plain head."""
    inputs = keras.Input((d_in,))
    h = keras_hrp.HRPDense(
        24, rank=rank, preheat_rank=preheat_rank, variant=variant,
        lora_alpha=lora_alpha, name="hrp_1",
    )(inputs)
    h = keras.layers.BatchNormalization(name="norm")(h)
    h = keras_hrp.HRPDense(
        24, rank=rank, preheat_rank=preheat_rank, variant=variant,
        lora_alpha=lora_alpha, activation="tanh", name="hrp_2",
    )(h)
    outputs = keras.layers.Dense(d_out, name="head")(h)
    return keras.Model(inputs, outputs, name="hrp_mlp")


def numpy_of(x):
    return ops.convert_to_numpy(x)


def principal_angle_cos(u, w):
    """Smallest cosine of the principal angles between span(u) and span(w)."""
    qu, _ = np.linalg.qr(u)
    qw, _ = np.linalg.qr(w)
    return np.linalg.svd(qu.T @ qw, compute_uv=False).min()
