"""Loss gradients of chosen (possibly frozen) weights, on every backend.

LoRA-GA needs the gradient of the full frozen weight, which no Keras
training step computes. Each backend gets its own few lines: `jax.grad`
through `stateless_call`, a TensorFlow `GradientTape`, torch autograd.
"""

import keras
import numpy as np
from keras import ops


def _jax_gradients(model, weights, x, y, loss):
    import jax

    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]
    slots = []
    for weight in weights:
        for group, variables in ((0, model.trainable_variables),
                                 (1, model.non_trainable_variables)):
            index = next((i for i, v in enumerate(variables) if v is weight), None)
            if index is not None:
                slots.append((group, index))
                break

    def loss_of(values):
        lists = [list(trainable), list(frozen)]
        for (group, index), value in zip(slots, values):
            lists[group][index] = value
        y_pred, _ = model.stateless_call(lists[0], lists[1], x, training=False)
        return loss(y, y_pred)

    return jax.grad(loss_of)([w.value for w in weights])


def _tensorflow_gradients(model, weights, x, y, loss):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch([w.value for w in weights])
        value = loss(y, model(x, training=False))
    grads = tape.gradient(value, [w.value for w in weights])
    return [None if g is None else tf.convert_to_tensor(g) for g in grads]  # dense


def _torch_gradients(model, weights, x, y, loss):
    import torch

    values = [w.value for w in weights]
    flags = [v.requires_grad for v in values]
    try:
        for v in values:
            v.requires_grad_(True)
        with torch.enable_grad():
            value = loss(ops.convert_to_tensor(y), model(x, training=False))
            return torch.autograd.grad(value, values, allow_unused=True)
    finally:
        for v, flag in zip(values, flags):
            v.requires_grad_(flag)


_BACKENDS = {
    "jax": _jax_gradients,
    "tensorflow": _tensorflow_gradients,
    "torch": _torch_gradients,
}


def weight_gradients(model, weights, batches, loss):
    """Mean loss gradient of each variable in `weights` over `batches`.

    Works for frozen variables too (e.g. a kernel under a LoRA adapter). The
    model runs in inference mode (no dropout), so the estimate depends only
    on the data.

    Args:
        model: a built Keras model.
        weights: variables of `model`.
        batches: an iterable of `(x, y)` batches.
        loss: `loss(y_true, y_pred) -> scalar`, e.g. a `keras.losses.Loss`.

    Returns:
        A list of numpy arrays, one per weight, of the weights' shapes.
    """
    backend = keras.backend.backend()
    if backend not in _BACKENDS:
        raise ValueError(
            f"weight_gradients: backend {backend!r} is not supported. "
            f"Received: KERAS_BACKEND={backend!r}"
        )
    total, count = None, 0
    for x, y in batches:
        grads = _BACKENDS[backend](model, weights, x, y, loss)
        grads = [
            np.zeros(w.shape, "float32") if g is None
            else ops.convert_to_numpy(ops.cast(g, "float32"))
            for w, g in zip(weights, grads)
        ]
        total = grads if total is None else [t + g for t, g in zip(total, grads)]
        count += 1
    if count == 0:
        raise ValueError("weight_gradients: `batches` is empty. Received: 0 batches")
    return [t / count for t in total]
