"""`export_peft`: a model's LoRA adapters as a PEFT adapter directory.

Per layer, `keras_hrp.peft_mapping` converts the factors; `lora_alpha`
carries the scale (`scale * rank`), per layer where ranks differ
(`rank_pattern` / `alpha_pattern`). An init that moved part of the frozen
weight into the adapter (PiSSA, MiLoRA, OLoRA, LoRA-GA) exports against the
original weight: the moved part joins the adapter as a second, negated
pair (rank `r + r0`), as PEFT's own conversion of such adapters does.
"""

import json
import os
import warnings
from collections import Counter

import keras
import numpy as np
from keras import ops

from keras_hrp import internals
from keras_hrp import lora
from keras_hrp import peft_files
from keras_hrp import peft_mapping
from keras_hrp import settings
from keras_hrp.adapters import lora_layers
from keras_hrp.state import hrp_layers

OWNER = "export_peft"
PREFIX = peft_files.PREFIX


def _numpy(variable):
    return ops.convert_to_numpy(variable).astype("float32")


def _pair(layer, a, b):
    """PEFT's `(lora_A, lora_B)` of Keras factors `(a, b)` of `layer`."""
    if isinstance(layer, keras.layers.Embedding):
        return a.T, b.T
    a_axes, b_axes = lora.factor_axes(layer)
    contracted = peft_mapping.contracted_axes(getattr(layer, "equation", None))
    return peft_mapping.peft_pair(a, b, lora.kernel_shape(layer), list(a_axes), list(b_axes), contracted)


def _in_out(layer, kernel):
    """A kernel as the `(in, out)` matrix PEFT's pairs multiply to (transposed)."""
    if isinstance(layer, keras.layers.Embedding):
        return kernel
    contracted = list(peft_mapping.contracted_axes(getattr(layer, "equation", None)))
    outputs = [i for i in range(kernel.ndim) if i not in contracted]
    rows = int(np.prod([kernel.shape[i] for i in contracted]))
    return np.transpose(kernel, contracted + outputs).reshape(rows, -1)


def _moved_pair(layer, original):
    """The pair of `frozen - original` (divided by the layer's scale): with
    it the adapter applies to the original weight. `None` where nothing moved."""
    if original is not None:
        moved = _in_out(layer, _numpy(internals.base_weight(layer))) - _in_out(layer, original)
        u, s, vt = np.linalg.svd(moved, full_matrices=False)
        k = int(np.sum(s > s[0] * 1e-6)) if s.size and s[0] > 0 else 0
        if k == 0:
            return None
        return (u[:, :k] * s[:k]).T / lora.lora_scale(layer), vt[:k].T
    if getattr(layer, "hrp_moved_factors", None) is None:
        return None
    a0, b0 = layer.hrp_moved_factors
    return _pair(layer, a0, -b0)


def _layer_tensors(layer, module, original=None):
    """PEFT's tensors for one LoRA layer, and its rank there."""
    lora_a, lora_b = _pair(layer, *(_numpy(v) for v in lora.lora_factors(layer)))
    moved = _moved_pair(layer, original)
    if moved is not None:
        lora_a, lora_b = np.concatenate([lora_a, moved[0]]), np.concatenate([lora_b, moved[1]], axis=1)
    if isinstance(layer, keras.layers.Embedding):
        return {f"{module}.lora_embedding_A": lora_a, f"{module}.lora_embedding_B": lora_b}, lora_a.shape[0]
    tensors = {f"{module}.lora_A.weight": lora_a, f"{module}.lora_B.weight": lora_b}
    bias = getattr(layer, "bias", None)
    if bias is not None and bias.trainable:
        tensors[f"{module}.base_layer.bias"] = _numpy(bias).reshape(-1)
    return tensors, lora_a.shape[0]


def _head_tensors(layer, module):
    """A trained Dense layer (a task's head) as a PEFT `modules_to_save` entry."""
    tensors = {f"{module}.weight": _numpy(layer.kernel).T}
    if layer.bias is not None:
        tensors[f"{module}.bias"] = _numpy(layer.bias)
    return tensors


def _plan(model, table):
    """`(adapters, heads, problems)`: module names of the LoRA layers and of
    the other trained layers, and every layer the export cannot carry."""
    adapters, heads, problems = {}, {}, []
    lora_paths = lora_layers(model)
    for path, layer in lora_paths.items():
        module = peft_mapping.module_name(table, path)
        if module is None:
            problems.append(f"{path}: no transformers module for this layer")
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


def _originals(base_model, table, adapters):
    """The original frozen weight of each adapted layer, from `base_model`
    (matched by transformers module); problems where it has none."""
    if base_model is None:
        return {}, []
    found = {}
    for layer in internals.all_layers(base_model, include_self=False):
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding)):
            module = peft_mapping.module_name(table, layer.path)
            if module is not None:
                found[module] = layer
    originals, problems = {}, []
    for path, (layer, module) in adapters.items():
        base = found.get(module)
        if base is None or tuple(base.variables[0].shape) != tuple(internals.base_weight(layer).shape):
            problems.append(f"{path}: `base_model` has no layer of the same shape for {module}")
        else:
            weight = internals.base_weight(base) if getattr(base, "lora_enabled", False) else base.variables[0]
            originals[path] = _numpy(weight)
    return originals, problems


def exported_kind(model):
    """`"backbone"` for a KerasHub backbone, `"task"` for a KerasHub task,
    `None` for another model (named as the task class)."""
    names = {cls.__name__ for cls in type(model).__mro__}
    return "backbone" if "Backbone" in names else "task" if "Task" in names else None


def _refuse_preheating(model, allow_preheating):
    """A preheating layer's adapter is the probe at rank `R`, not the
    fine-tune: refused, or exported with a warning when asked."""
    preheating = sorted(layer.path for layer in hrp_layers(model, phase="preheat"))
    if not preheating:
        return
    ranks = sorted({layer.lora_rank for layer in hrp_layers(model, phase="preheat")})
    message = (f"{len(preheating)} HRP layers of model '{model.name}' are still in their "
               f"preheat phase (rank {', '.join(map(str, ranks))}, not their main rank): "
               f"{', '.join(preheating)}")
    if not allow_preheating:
        settings.fail(OWNER, message + ". Switch first (HRPCallback, switch_to_main), or pass "
                      "allow_preheating=True to export the preheat's adapter",
                      allow_preheating=allow_preheating)
    warnings.warn(f"{OWNER}: {message}; exporting the preheat's adapter as asked.", stacklevel=3)


def export_peft(model, directory, base_model_name_or_path=None, family="bert", base_model=None,
                allow_preheating=False):
    """Writes `model`'s LoRA adapters as a PEFT LoRA adapter in `directory`.

    `adapter_model.safetensors` and `adapter_config.json`, as PEFT's
    `save_pretrained` writes them, for the transformers counterpart of a
    KerasHub model (`family`: see `keras_hrp.peft_mapping.FAMILIES`).
    Layer paths map to module names; per-head adapters export as standard
    LoRA of rank `heads * r`; per-layer ranks go to `rank_pattern` /
    `alpha_pattern`; trained biases of the adapted layers to
    `bias="lora_only"`; a trained head (a task's `logits`) to
    `modules_to_save`. Names and `task_type` follow what is exported
    (`keras_hrp.peft_mapping.TARGETS`): a BERT backbone attaches to the bare
    `BertModel` (`AutoModel`, names `encoder.layer.…`, `FEATURE_EXTRACTION`),
    a `BertTextClassifier` to `BertForSequenceClassification` (`bert.…`,
    `SEQ_CLS`), a Gemma or Llama backbone or CausalLM to `*ForCausalLM`
    (`CAUSAL_LM`). Anything it cannot carry is one error listing every
    layer, and nothing is written. HRP layers still preheating are refused
    (see `allow_preheating`).

    Layers whose init moved part of the pretrained weight into the adapter
    (`initialize_lora` with PiSSA, MiLoRA, OLoRA, LoRA-GA) export against
    the pretrained weight: in the process that ran the init, from its
    record; in any process, given `base_model` (the pretrained model, which
    the export compares each frozen weight with). Without either, a model
    loaded from a file in a new process exports against its current frozen
    weights, which the export cannot tell from pretrained ones.

    Args:
        model: a Keras model with LoRA layers (`enable_hrp`, `enable_lora`).
        directory: the folder to write (created if needed).
        base_model_name_or_path: recorded in the config for PEFT's
            `from_pretrained` (the transformers base model).
        family: the architecture's mapping table.
        base_model: optional; the same architecture with the pretrained
            weights (see above).
        allow_preheating: export HRP layers still in their preheat phase
            (their rank-`R` probe), with a warning; refused by default.

    Returns:
        The config written, as a dict.

    Example:

    >>> classifier = keras_hub.models.TextClassifier.from_preset(path, num_classes=2)
    >>> _ = keras_hrp.enable_hrp(classifier, rank=4)
    >>> config = keras_hrp.export_peft(classifier, "movies-peft", "google/bert_uncased_L-2_H-128_A-2")
    >>> config["r"], config["task_type"]  # per-head rank 4 in 2 heads: standard rank 8
    (8, 'SEQ_CLS')
    """
    if not isinstance(model, keras.Model):
        settings.fail(OWNER, "`model` must be a Keras model", error=TypeError, model=model)
    family = settings.choice(OWNER, "family", family, tuple(peft_mapping.FAMILIES))
    _refuse_preheating(model, settings.boolean(OWNER, "allow_preheating", allow_preheating))
    directory = settings.path(OWNER, "directory", directory)
    table = peft_mapping.FAMILIES[family]
    kind = exported_kind(model)
    adapters, heads, problems = _plan(model, table)
    if base_model is not None and not isinstance(base_model, keras.Model):
        settings.fail(OWNER, "`base_model` must be a Keras model", error=TypeError, base_model=base_model)
    originals, missing = _originals(base_model, table, adapters)
    problems += missing
    if not adapters and not problems:
        settings.fail(OWNER, f"model '{model.name}' has no LoRA layer", model=model.name)
    if problems:
        settings.fail(OWNER, f"model '{model.name}' cannot be exported as it is "
                      f"({len(problems)} layers):\n  " + "\n  ".join(problems), family=family)
    bare = kind == "backbone"
    adapters = {p: (layer, peft_mapping.exported_name(family, m, bare)) for p, (layer, m) in adapters.items()}
    heads = {p: (layer, peft_mapping.exported_name(family, m, bare)) for p, (layer, m) in heads.items()}
    tensors, ranks, alphas, biased = {}, {}, {}, False
    for path, (layer, module) in adapters.items():
        layer_tensors, rank = _layer_tensors(layer, module, originals.get(path))
        biased = biased or any(name.endswith(".bias") for name in layer_tensors)
        tensors.update(layer_tensors)
        ranks[module], alphas[module] = rank, lora.lora_scale(layer) * rank
    for layer, module in heads.values():
        tensors.update(_head_tensors(layer, module))
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(a for m, a in alphas.items() if ranks[m] == rank).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": peft_mapping.TARGETS[family, kind or "task"][1],
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "fan_in_fan_out": False,
        "target_modules": sorted(ranks), "bias": "lora_only" if biased else "none",
        "modules_to_save": sorted(module for _, module in heads.values()) or None,
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
        "init_lora_weights": True, "inference_mode": True, "use_dora": False, "use_rslora": False,
    }
    os.makedirs(directory, exist_ok=True)
    peft_files.write_atomic(os.path.join(directory, peft_files.WEIGHTS),
                            peft_files.safetensors_bytes({PREFIX + name: value for name, value in tensors.items()}))
    peft_files.write_atomic(os.path.join(directory, peft_files.CONFIG), json.dumps(config, indent=2).encode())
    return config
