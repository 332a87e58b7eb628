"""`import_peft`: a PEFT LoRA adapter directory into a KerasHub model.

The reverse of `export_peft`: each PEFT module maps, by the family's table,
to a Keras layer, which gets a standard LoRA adapter (an EinsumDense the
'full' factorization) at the module's rank and scale; trained biases and
`modules_to_save` heads load into their layers. Everything is checked
before anything changes; the adapters then load as `load_adapters` loads
its own files.
"""

import json
import math
import os
import re

import keras
import numpy as np

from keras_hrp import adapters
from keras_hrp import hub
from keras_hrp import internals
from keras_hrp import lora
from keras_hrp import peft_files
from keras_hrp import peft_mapping
from keras_hrp import settings
from keras_hrp.state import HRPState

OWNER = "import_peft"
LINEAR = (keras.layers.Dense, keras.layers.EinsumDense)
_PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
          "base_layer.bias": "bias", "bias": "bias", "weight": "weight"}


def _read_config(directory):
    path = os.path.join(directory, peft_files.CONFIG)
    if not os.path.exists(path):
        settings.fail(OWNER, f"no {peft_files.CONFIG} in the directory", directory=directory)
    with open(path) as stream:
        config = json.load(stream)
    unsupported = {"peft_type": config.get("peft_type") != "LORA", "use_dora": bool(config.get("use_dora")),
                   "fan_in_fan_out": bool(config.get("fan_in_fan_out")), "lora_bias": bool(config.get("lora_bias"))}
    for key, bad in unsupported.items():
        if bad:
            settings.fail(OWNER, f"only plain LoRA adapters import ({key} is not supported)", **{key: config.get(key)})
    if not os.path.exists(os.path.join(directory, peft_files.WEIGHTS)):
        settings.fail(OWNER, f"no {peft_files.WEIGHTS} in the directory (a torch pickle "
                      "`adapter_model.bin` is not read: save with safe_serialization=True)", directory=directory)
    return config


def _pattern(patterns, module, default):
    """PEFT's per-module override: a key equal to the module or matching
    (as a regular expression) its dotted suffix."""
    for key, value in (patterns or {}).items():
        if key == module or re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default


def _split(name):
    """`(module, part)` of a tensor name under PEFT's prefix, or `None`."""
    if not name.startswith(peft_files.PREFIX):
        return None
    name = name[len(peft_files.PREFIX):]
    for suffix, part in _PARTS.items():
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], part
    return None


def _layers_by_module(model, table):
    found = {}
    for layer in internals.all_layers(model, include_self=False):
        if isinstance(layer, LINEAR + (keras.layers.Embedding,)):
            module = peft_mapping.module_name(table, layer.path)
            if module is not None:
                found[module] = layer
    return found


def _keras_factors(layer, lora_a, lora_b):
    """Keras `(A, B)` of a PEFT pair for `layer` (standard factorization)."""
    if isinstance(layer, keras.layers.Embedding):
        return lora_a.T, lora_b.T
    a_axes, b_axes = lora.factor_axes(layer, "full")
    contracted = peft_mapping.contracted_axes(getattr(layer, "equation", None))
    return peft_mapping.keras_pair(lora_a, lora_b, lora.kernel_shape(layer), a_axes, b_axes, contracted)


def _adapter_item(layer, module, parts, config, problems):
    """One `adapters.check_plan` item for a PEFT LoRA module, or `None`."""
    lora_a, lora_b = parts.get("A"), parts.get("B")
    if lora_a is None or lora_b is None:
        problems.append(f"{module}: lora_A and lora_B are not both in the file")
        return None
    rank = lora_a.shape[0]
    m, n = lora.weight_matrix_shape(layer, "full")
    if lora_a.shape != (rank, m) or lora_b.shape != (n, rank):
        problems.append(f"{module} -> {layer.path}: lora_A {lora_a.shape}, lora_B {lora_b.shape}; "
                        f"the layer needs ({rank}, {m}) and ({n}, {rank})")
        return None
    alpha = _pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    a, b = _keras_factors(layer, lora_a, lora_b)
    factorization = "full"  # a Dense / Embedding adapter is the same in both
    if layer.lora_enabled and not isinstance(layer, keras.layers.EinsumDense):
        factorization = lora.factorization_of(layer)
    state = HRPState(rank=rank, phase="main", scale=scale, factorization=factorization)
    extras = {}
    if "bias" in parts:
        if getattr(layer, "bias", None) is None or parts["bias"].size != math.prod(layer.bias.shape):
            problems.append(f"{module} -> {layer.path}: a bias of {parts['bias'].size} values does not fit")
        else:
            extras["bias"] = parts["bias"].reshape(tuple(layer.bias.shape))
    entry = {"path": layer.path, "rank": rank, "lora_alpha": scale * rank, "extras": sorted(extras),
             "state": state.to_dict()}
    return entry, a, b, extras


def _head_item(layer, module, parts, problems):
    """`(layer, [(variable, value)])` of a `modules_to_save` module."""
    if not isinstance(layer, keras.layers.Dense) or "weight" not in parts:
        problems.append(f"{module} -> {layer.path}: a saved module imports into a Dense layer only")
        return None
    values = [(layer.kernel, parts["weight"].T)]
    if "bias" in parts and layer.bias is not None:
        values.append((layer.bias, parts["bias"]))
    bad = [f"{v.name} {tuple(v.shape)} != {value.shape}" for v, value in values
           if tuple(v.shape) != value.shape]
    if bad or ("bias" in parts) != (layer.bias is not None):
        problems.append(f"{module} -> {layer.path}: does not fit ({', '.join(bad) or 'bias'})")
        return None
    return layer, values


def _plan(model, config, tensors, family):
    """`(items, heads, problems)`: every module of the file, placed."""
    grouped, problems = {}, []
    for name, value in tensors.items():
        split = _split(name)
        if split is None:
            problems.append(f"{name}: not a PEFT LoRA tensor name")
            continue
        grouped.setdefault(split[0], {})[split[1]] = value
    layers = _layers_by_module(model, peft_mapping.FAMILIES[family])
    saved = {peft_mapping.table_name(family, m) for m in config.get("modules_to_save") or ()}
    items, heads = [], []
    for module, parts in sorted(grouped.items()):
        module = peft_mapping.table_name(family, module)  # a bare model's names too
        layer = layers.get(module)
        if layer is None:
            problems.append(f"{module}: no layer of model '{model.name}' maps to this module")
        elif "A" in parts or "B" in parts:
            item = _adapter_item(layer, module, parts, config, problems)
            items += [item] if item else []
        elif module in saved or "weight" in parts:
            head = _head_item(layer, module, parts, problems)
            heads += [head] if head else []
        elif set(parts) == {"bias"}:
            problems.append(f"{module}: a trained bias on a layer without an adapter is not imported")
    if not items and not problems:
        problems.append("the file has no LoRA module")
    return items, heads, problems


def import_peft(model, directory, family="bert"):
    """Loads a PEFT LoRA adapter directory into a KerasHub model.

    Reads `adapter_config.json` and `adapter_model.safetensors` (as PEFT's
    `save_pretrained` writes them; no torch needed) and maps each module to
    the model's layer by the family's table (`keras_hrp.peft_mapping`),
    named as the task class names it (`bert.encoder.…`) or as the bare
    model does (`encoder.…`, what a backbone's export writes). Each adapted layer gets standard LoRA (an EinsumDense the 'full'
    factorization) at the module's rank (`rank_pattern`) and scale
    (`lora_alpha / r`, `alpha_pattern`, `use_rslora`); trained biases
    (`bias="lora_only"` / `"all"`) and `modules_to_save` (a classifier
    head) load too. A model without LoRA is prepared as `enable_hrp` does
    (frozen but for the adapters and a task's head); a model with adapters
    must have them on the same layers, factored the standard way.

    Everything is checked first: on any mismatch one `ValueError` lists
    every unmapped or ill-fitting module, and the model is unchanged.

    Args:
        model: a built KerasHub model (`Backbone` or `Task`) with the
            adapter's base weights.
        directory: a PEFT adapter directory.
        family: the architecture's mapping table.

    Returns:
        The paths of the layers that took an adapter.

    Example:

    >>> trained = keras_hub.models.TextClassifier.from_preset(path, num_classes=2)
    >>> _ = keras_hrp.enable_hrp(trained, rank=4)
    >>> _ = keras_hrp.export_peft(trained, "movies-peft")  # or any PEFT adapter directory
    >>> classifier = keras_hub.models.TextClassifier.from_preset(path, num_classes=2)
    >>> len(keras_hrp.import_peft(classifier, "movies-peft"))  # q and v of 2 blocks
    4
    """
    if not isinstance(model, keras.Model):
        settings.fail(OWNER, "`model` must be a Keras model", error=TypeError, model=model)
    family = settings.choice(OWNER, "family", family, tuple(peft_mapping.FAMILIES))
    directory = settings.path(OWNER, "directory", directory)
    config = _read_config(directory)
    tensors = peft_files.read_safetensors(os.path.join(directory, peft_files.WEIGHTS))
    items, heads, problems = _plan(model, config, tensors, family)
    more, _ = adapters.check_plan(model, items, OWNER)
    problems += more
    if problems:
        settings.fail(OWNER, f"'{directory}' does not fit model '{model.name}' ({len(problems)} problems):\n  "
                      + "\n  ".join(problems), directory=directory)
    if not adapters.lora_layers(model):
        hub.enable_hrp(model, rank=items[0][0]["rank"], factorization="full",
                       target_layer_names=[re.escape(entry["path"]) for entry, *_ in items])
    _, plan = adapters.check_plan(model, items, OWNER)
    adapters.apply_plan(model, plan)
    for _, values in heads:
        for variable, value in values:
            variable.assign(value.astype(variable.dtype))
    return [entry["path"] for entry, *_ in items]
