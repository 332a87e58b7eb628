"""Adapter files: every LoRA layer's factors, keyed by layer path.

One `.npz` file (no pickle) holds, for each LoRA layer, `A`, `B`, the rank,
Keras' `lora_alpha`, and the layer's other trainable weights (the biases that
KerasHub-style LoRA trains). Paths, not layer indices, identify layers, so a
file cannot load into the wrong layers; it loads on any backend.
"""

import json

import keras
import numpy as np
from keras import ops

from keras_hrp import lora

_META = "__keras_hrp_adapters__"
FORMAT_VERSION = 1


def _layers_by_path(model):
    return {
        layer.path: layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
    }


def lora_layers(model):
    """The layers of `model` (itself included) with a Keras LoRA adapter, by path."""
    return {
        path: layer
        for path, layer in _layers_by_path(model).items()
        if getattr(layer, "lora_enabled", False)
    }


def _extras(layer):
    """Trainable weights of a LoRA layer other than its factors."""
    factors = [id(v) for v in lora.lora_factors(layer)]
    return {v.name: v for v in layer.trainable_weights if id(v) not in factors}


def save_adapters(model, path):
    """Saves every LoRA adapter of `model` to `path` (a `.npz` file).

    Args:
        model: a Keras model with LoRA layers (`enable_hrp`, `HRPDense`,
            `enable_lora`, ...).
        path: file path; `.npz` is appended by numpy if missing.

    Example:

    >>> keras_hrp.save_adapters(backbone, "movie.adapters.npz")
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            f"save_adapters: model '{model.name}' has no LoRA layer. "
            f"Received: model={model.name}"
        )
    arrays, meta = {}, {"format": FORMAT_VERSION, "layers": {}}
    for layer_path, layer in layers.items():
        a, b = lora.lora_factors(layer)
        extras = _extras(layer)
        meta["layers"][layer_path] = {
            "rank": int(layer.lora_rank),
            "lora_alpha": float(layer.lora_alpha),
            "extras": sorted(extras),
        }
        arrays[f"{layer_path}::A"] = ops.convert_to_numpy(a)
        arrays[f"{layer_path}::B"] = ops.convert_to_numpy(b)
        for name, variable in extras.items():
            arrays[f"{layer_path}::{name}"] = ops.convert_to_numpy(variable)
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def _read(path):
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    if _META not in arrays:
        raise ValueError(f"load_adapters: not a keras-hrp adapter file. Received: path={path!r}")
    return json.loads(arrays.pop(_META).tobytes().decode()), arrays


def _expected_a_shape(layer, rank):
    m, _ = lora.weight_matrix_shape(layer)
    if isinstance(layer, keras.layers.EinsumDense):
        return tuple(layer.kernel.shape[:-1]) + (rank,)
    return (m, rank)


def _mismatches(model, meta, arrays):
    layers = lora_layers(model)
    everything = _layers_by_path(model)
    problems = []
    for layer_path, info in meta["layers"].items():
        layer = everything.get(layer_path)
        if layer is None or not hasattr(layer, "enable_lora"):
            problems.append(f"{layer_path}: no such LoRA-capable layer in the model")
            continue
        rank = info["rank"]
        if layer.lora_enabled and layer.lora_rank != rank:
            problems.append(f"{layer_path}: file rank {rank}, layer rank {layer.lora_rank}")
            continue
        a = arrays[f"{layer_path}::A"]
        b = arrays[f"{layer_path}::B"]
        want_a = _expected_a_shape(layer, rank)
        want_b = (rank, lora.weight_matrix_shape(layer)[1])
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(
                f"{layer_path}: file A{tuple(a.shape)} B{tuple(b.shape)}, "
                f"layer needs A{want_a} B{want_b}"
            )
        weights = {v.name: v for v in layer.weights}
        for name in info["extras"]:
            value = arrays[f"{layer_path}::{name}"]
            if name not in weights or tuple(weights[name].shape) != value.shape:
                problems.append(f"{layer_path}: weight '{name}' {value.shape} does not fit")
    for layer_path in sorted(set(layers) - set(meta["layers"])):
        problems.append(f"{layer_path}: LoRA layer of the model missing from the file")
    return problems


def load_adapters(model, path):
    """Loads adapters saved by `save_adapters` into `model`, by layer path.

    Layers without LoRA get it, at the file's rank and alpha. Everything is
    checked before anything is written: on any mismatch (missing paths,
    ranks or shapes), a `ValueError` lists all of them and the model is left
    unchanged.

    Args:
        model: a built Keras model with the same architecture.
        path: a file written by `save_adapters`.
    """
    meta, arrays = _read(path)
    problems = _mismatches(model, meta, arrays)
    if problems:
        raise ValueError(
            f"load_adapters: '{path}' does not fit model '{model.name}' "
            f"({len(problems)} mismatches):\n  " + "\n  ".join(problems)
        )
    everything = _layers_by_path(model)
    for layer_path, info in meta["layers"].items():
        layer = everything[layer_path]
        if not layer.lora_enabled:
            layer.enable_lora(info["rank"], lora_alpha=info["lora_alpha"])
        layer.lora_alpha = info["lora_alpha"]
        a, b = lora.lora_factors(layer)
        a.assign(arrays[f"{layer_path}::A"])
        b.assign(arrays[f"{layer_path}::B"])
        weights = {v.name: v for v in layer.weights}
        for name in info["extras"]:
            weights[name].assign(arrays[f"{layer_path}::{name}"])


def revive_adapters(model):
    """Re-draws `A` of every all-zero LoRA adapter; the output is unchanged.

    Keras' `load_own_variables` (used by `load_model` and `load_weights`)
    sets `A = B = 0` on LoRA layers, after which both gradients are zero
    forever. With `B = 0`, a fresh he_uniform `A` changes no output and lets
    the adapter train again. Layers prepared by `enable_hrp` do this by
    themselves on `load_weights`; call it after `keras.saving.load_model`.

    Args:
        model: a Keras model or layer.

    Returns:
        The paths of the revived layers.
    """
    revived = []
    for layer_path, layer in lora_layers(model).items():
        a, b = lora.lora_factors(layer)
        if not np.any(ops.convert_to_numpy(a)) and not np.any(ops.convert_to_numpy(b)):
            initializer = keras.initializers.get(lora.DEFAULT_A_INITIALIZER)  # new seed
            a.assign(initializer(tuple(a.shape), dtype="float32"))
            revived.append(layer_path)
    return revived
