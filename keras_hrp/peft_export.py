"""`export_peft`: a model's LoRA adapters as a PEFT adapter directory.

PEFT keeps a linear layer's update as `(lora_alpha / r) * lora_B @ lora_A`
on the torch weight `(out, in)`, the transpose of a Keras kernel. A Keras
adapter whose `A` has only contracted axes (`Dense`, the 'full'
factorization, attention outputs) maps to `lora_A = A^T`, `lora_B = B^T`. A
per-head adapter (`A (hidden, heads, r)`, `B (r, head_dim)`) is a standard
LoRA of rank `heads * r` with block structure: row `(h, k)` of `lora_A` is
head `h`'s `k`-th column of `A`, and `lora_B` holds `B^T` in head `h`'s
block. `lora_alpha` carries the scale (`scale * rank`), per layer where
ranks differ (`rank_pattern` / `alpha_pattern`).
"""

import json
import os
import tempfile
from collections import Counter

import keras
import numpy as np
from keras import ops

from keras_hrp import internals
from keras_hrp import lora
from keras_hrp import peft_mapping
from keras_hrp import settings
from keras_hrp.adapters import lora_layers

OWNER = "export_peft"
PREFIX = "base_model.model."


def _contracted(layer):
    """Kernel axes the input contracts, in the input's order."""
    if not isinstance(layer, keras.layers.EinsumDense):
        return (0,)
    inputs, kernel = layer.equation.split("->")[0].split(",")
    return tuple(kernel.index(c) for c in inputs if c in kernel)


def peft_pair(a, b, kernel_shape, a_axes, b_axes, contracted):
    """`(lora_A, lora_B)` of a Keras adapter `(A, B)` (pure, numpy).

    Args:
        a: `A`, shaped `[kernel_shape[i] for i in a_axes] + [r]`.
        b: `B`, shaped `(r, prod(kernel_shape[i] for i in b_axes))`.
        kernel_shape: the frozen weight's shape.
        a_axes, b_axes: the kernel axes on `A`'s and `B`'s side.
        contracted: the kernel axes the input contracts, in the input's order.

    Returns:
        `lora_A (heads * r, in)` and `lora_B (out, heads * r)`, `in` in
        `contracted`' order and `out` the other kernel axes in kernel order
        (a torch `Linear`'s layout); `heads` is the product of `A`'s
        output axes (1 but for per-head adapters).
    """
    r = b.shape[0]
    heads = [i for i in a_axes if i not in contracted]
    m = int(np.prod([kernel_shape[i] for i in contracted]))
    h = int(np.prod([kernel_shape[i] for i in heads]))
    order = [a_axes.index(i) for i in contracted] + [a_axes.index(i) for i in heads] + [len(a_axes)]
    a = np.transpose(np.asarray(a).reshape([kernel_shape[i] for i in a_axes] + [r]), order)
    lora_a = np.transpose(a.reshape(m, h, r), (1, 2, 0)).reshape(h * r, m)
    blocks = np.zeros((h, b.shape[1], h, r), b.dtype)
    for head in range(h):
        blocks[head, :, head, :] = np.asarray(b).T
    produced = heads + list(b_axes)  # the output axes as the blocks hold them
    out = sorted(produced)
    blocks = blocks.reshape([kernel_shape[i] for i in produced] + [h * r])
    lora_b = np.transpose(blocks, [produced.index(i) for i in out] + [len(produced)])
    return lora_a, lora_b.reshape(-1, h * r)


def _layer_tensors(layer, module):
    """PEFT's tensors for one LoRA layer, and its rank there."""
    a, b = (ops.convert_to_numpy(v).astype("float32") for v in lora.lora_factors(layer))
    if isinstance(layer, keras.layers.Embedding):
        return {f"{module}.lora_embedding_A": a.T, f"{module}.lora_embedding_B": b.T}, b.shape[0]
    a_axes, b_axes = lora.factor_axes(layer)
    lora_a, lora_b = peft_pair(a, b, lora.kernel_shape(layer), list(a_axes), list(b_axes), _contracted(layer))
    tensors = {f"{module}.lora_A.weight": lora_a, f"{module}.lora_B.weight": lora_b}
    bias = getattr(layer, "bias", None)
    if bias is not None and bias.trainable:
        tensors[f"{module}.base_layer.bias"] = ops.convert_to_numpy(bias).astype("float32").reshape(-1)
    return tensors, lora_a.shape[0]


def _head_tensors(layer, module):
    """A trained Dense layer (a task's head) as a PEFT `modules_to_save` entry."""
    tensors = {f"{module}.weight": ops.convert_to_numpy(layer.kernel).astype("float32").T}
    if layer.bias is not None:
        tensors[f"{module}.bias"] = ops.convert_to_numpy(layer.bias).astype("float32")
    return tensors


def _write_atomic(path, data):
    handle, temporary = tempfile.mkstemp(prefix=".keras_hrp_", dir=os.path.dirname(path))
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def safetensors_bytes(tensors):
    """`tensors` (name -> float32 array) in the safetensors format."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def _plan(model, table):
    """`(adapters, heads, problems)`: module names of the LoRA layers and of
    the other trained layers, and every layer the export cannot carry."""
    adapters, heads, problems = {}, {}, []
    lora_paths = lora_layers(model)
    for path, layer in lora_paths.items():
        module = peft_mapping.module_name(table, path)
        if module is None:
            problems.append(f"{path}: no transformers module for this layer")
        elif getattr(layer, "hrp_moved_base", None):
            problems.append(f"{path}: its init ({layer.hrp_moved_base}) moved part of the frozen weight into "
                            "the adapter; the export against the original base is not supported yet")
        elif layer.quantization_mode is not None:
            problems.append(f"{path}: quantized ({layer.quantization_mode})")
        else:
            adapters[path] = (layer, module)
    for layer in internals.all_layers(model, include_self=False):
        if layer.path in lora_paths or not any(v.trainable for v in internals.own_variables(layer)):
            continue
        if not layer.trainable:
            continue
        module = peft_mapping.module_name(table, layer.path)
        if module is None or not isinstance(layer, keras.layers.Dense):
            problems.append(f"{layer.path}: trained weights without a PEFT place "
                            f"({', '.join(v.name for v in internals.own_variables(layer))})")
        else:
            heads[layer.path] = (layer, module)
    return adapters, heads, problems


def export_peft(model, directory, base_model_name_or_path=None, family="bert"):
    """Writes `model`'s LoRA adapters as a PEFT LoRA adapter in `directory`.

    `adapter_model.safetensors` and `adapter_config.json`, as PEFT's
    `save_pretrained` writes them, for the transformers counterpart of a
    KerasHub model (`family`: see `keras_hrp.peft_mapping.FAMILIES`).
    Layer paths map to module names; per-head adapters export as standard
    LoRA of rank `heads * r`; per-layer ranks go to `rank_pattern` /
    `alpha_pattern`; trained biases of the adapted layers to
    `bias="lora_only"`; a trained head (a task's `logits`) to
    `modules_to_save`. Anything it cannot carry is one error listing every
    layer, and nothing is written.

    Args:
        model: a Keras model with LoRA layers (`enable_hrp`, `enable_lora`).
        directory: the folder to write (created if needed).
        base_model_name_or_path: recorded in the config for PEFT's
            `from_pretrained` (the transformers base model).
        family: the architecture's mapping table.

    Returns:
        The config written, as a dict.

    Example:

    >>> keras_hrp.export_peft(classifier, "movies-peft", "sentence-transformers/all-MiniLM-L6-v2")
    """
    if not isinstance(model, keras.Model):
        settings.fail(OWNER, "`model` must be a Keras model", error=TypeError, model=model)
    family = settings.choice(OWNER, "family", family, tuple(peft_mapping.FAMILIES))
    directory = settings.path(OWNER, "directory", directory)
    adapters, heads, problems = _plan(model, peft_mapping.FAMILIES[family])
    if not adapters and not problems:
        settings.fail(OWNER, f"model '{model.name}' has no LoRA layer", model=model.name)
    if problems:
        settings.fail(OWNER, f"model '{model.name}' cannot be exported as it is "
                      f"({len(problems)} layers):\n  " + "\n  ".join(problems), family=family)
    tensors, ranks, alphas, biased = {}, {}, {}, False
    for layer, module in adapters.values():
        layer_tensors, rank = _layer_tensors(layer, module)
        biased = biased or any(name.endswith(".bias") for name in layer_tensors)
        tensors.update(layer_tensors)
        ranks[module], alphas[module] = rank, lora.lora_scale(layer) * rank
    for layer, module in heads.values():
        tensors.update(_head_tensors(layer, module))
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(a for m, a in alphas.items() if ranks[m] == rank).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "fan_in_fan_out": False,
        "target_modules": sorted(ranks), "bias": "lora_only" if biased else "none",
        "modules_to_save": sorted(module for _, module in heads.values()) or None,
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
        "init_lora_weights": True, "inference_mode": True, "use_dora": False, "use_rslora": False,
    }
    os.makedirs(directory, exist_ok=True)
    _write_atomic(os.path.join(directory, "adapter_model.safetensors"),
                  safetensors_bytes({PREFIX + name: value for name, value in tensors.items()}))
    _write_atomic(os.path.join(directory, "adapter_config.json"), json.dumps(config, indent=2).encode())
    return config
