"""Adapter files: everything a fine-tune trained, keyed by layer path.

One `.npz` file (no pickle, written atomically) holds, for each LoRA layer,
`A`, `B`, the rank, Keras' `lora_alpha`, the layer's other trainable
weights (the biases that KerasHub-style LoRA trains) and its `HRPState`;
then every other weight training changes outside the frozen layers (a
task's new head, a trained pooler or norm, normalization statistics) and
each layer's trainable flag. Paths, not layer indices, identify layers, so
a file cannot load into the wrong layers; their positions (see
`keras_hrp.paths`) let it load into a model whose auto-generated names
differ. It loads on any backend.
"""

import os

import keras
from keras import ops

from keras_hrp import checkpoints
from keras_hrp import files
from keras_hrp import internals
from keras_hrp import lora
from keras_hrp import paths
from keras_hrp import settings
from keras_hrp import fast_lora
from keras_hrp.state import HRPState
from keras_hrp.state import layer_state
from keras_hrp.switch import changing_variables
from keras_hrp.switch import rebuild_training_state

KIND = "adapters"
VERSION = 3
VERSIONS = (1, 2, 3)


def lora_layers(model):
    """The layers of `model` (itself included) with a Keras LoRA adapter, by path."""
    return {
        layer.path: layer
        for layer in internals.all_layers(model)
        if getattr(layer, "lora_enabled", False)
    }


def _extras(layer):
    """Trainable weights of a LoRA layer other than its factors."""
    factors = [id(v) for v in lora.lora_factors(layer)]
    return {v.name: v for v in layer.trainable_weights if id(v) not in factors}


def _check_model(owner, model):
    if not isinstance(model, keras.layers.Layer):
        settings.fail(owner, "`model` must be a Keras model or layer", error=TypeError, model=model)


def save_adapters(model, path):
    """Saves every LoRA adapter of `model` to `path`, exactly that path.

    The file is written to a temporary file and renamed, so an interrupted
    save never leaves a half-written file at `path`.

    Args:
        model: a Keras model with LoRA layers (`enable_hrp`, `HRPDense`,
            `enable_lora`, ...).
        path: the file to write (any name; `.npz` is customary).

    Example:

    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="proj")], name="net")
    >>> _ = keras_hrp.enable_hrp(model, rank=2, target_layer_names=["proj"])
    >>> keras_hrp.save_adapters(model, "proj.adapters.npz")
    >>> keras_hrp.load_adapters(model, "proj.adapters.npz")  # any backend, into the same set-up
    """
    owner = "save_adapters"
    _check_model(owner, model)
    path = settings.path(owner, "path", path)
    layers = lora_layers(model)
    if not layers:
        settings.fail(owner, f"model '{model.name}' has no LoRA layer", model=model.name)
    arrays, entries = {}, []
    others = _trained_outside_adapters(model, layers)
    for i, variable in enumerate(others):
        arrays[f"weight{i}"] = ops.convert_to_numpy(variable)
    for i, (layer_path, layer) in enumerate(layers.items()):
        a, b = lora.lora_factors(layer)
        extras = _extras(layer)
        state = layer_state(layer)
        entries.append({
            "path": layer_path,
            "rank": int(layer.lora_rank),
            "lora_alpha": float(layer.lora_alpha),
            "extras": sorted(extras),
            "state": None if state is None else state.to_dict(),
        })
        arrays[f"layer{i}.A"] = ops.convert_to_numpy(a)
        arrays[f"layer{i}.B"] = ops.convert_to_numpy(b)
        for j, name in enumerate(sorted(extras)):
            arrays[f"layer{i}.extra{j}"] = ops.convert_to_numpy(extras[name])
    trainable = {layer.path: bool(layer.trainable) for layer in internals.all_layers(model)}
    header = {
        "layers": entries,
        "weights": [variable.path for variable in others],
        "trainable": trainable,
        "positions": paths.of(model, [*trainable, *(v.path for v in others)]),
    }
    files.write(path, KIND, VERSION, header, arrays)


def _trained_outside_adapters(model, layers):
    """What training changes outside the LoRA layers: heads, trained
    norms and poolers, their statistics (never a frozen weight)."""
    owned = {id(v) for layer in layers.values() for v in internals.own_variables(layer)}
    return [v for v in changing_variables(model) if id(v) not in owned]


def _read(path, owner):
    """`(header, items, weights)`: the file's header, its layers as
    `[(entry, A, B, {extra name: value})]` and its other weights by path."""
    if not os.path.exists(path) and os.path.exists(path + ".npz"):
        path += ".npz"  # written by keras-hrp 0.1, which let numpy add `.npz`
    header, arrays = files.read(path, KIND, VERSIONS, owner)
    try:
        if header.get("format") == 1:
            return header, [
                (
                    {"path": p, "state": None, **info},
                    arrays[f"{p}::A"], arrays[f"{p}::B"],
                    {name: arrays[f"{p}::{name}"] for name in info["extras"]},
                )
                for p, info in header["layers"].items()
            ], {}
        items = [
            (
                entry, arrays[f"layer{i}.A"], arrays[f"layer{i}.B"],
                {name: arrays[f"layer{i}.extra{j}"] for j, name in enumerate(entry["extras"])},
            )
            for i, entry in enumerate(header["layers"])
        ]
        weights = {p: arrays[f"weight{i}"] for i, p in enumerate(header.get("weights", []))}
        return header, items, weights
    except (KeyError, TypeError, AttributeError) as error:
        settings.fail(owner, f"damaged adapter file ({type(error).__name__}: {error})", path=path)


def _target_state(layer, entry, owner):
    """`(state, problem)`: the `HRPState` a layer takes from the file
    (`None` for plain LoRA), or why it cannot."""
    where = f"{owner}, layer '{entry['path']}'"
    if entry["state"] is not None:
        return HRPState.from_dict(entry["state"], where), None
    current = layer_state(layer)
    if current is None:
        return None, None
    rank = entry["rank"]
    if rank not in (current.rank, current.preheat_rank):
        return None, (
            f"file rank {rank} is neither the layer's main rank {current.rank} "
            "nor its preheat rank"
        )
    phase = "main" if rank == current.rank else "preheat"
    return HRPState(**{**current.to_dict(), "phase": phase}), None


def check_plan(model, items, owner, resolve=None):
    """`(problems, plan)`: every mismatch, and per layer what to load
    (`resolve`: a `paths.Resolver` for the file's paths)."""
    resolve = resolve or paths.Resolver(model, {})
    layers = {layer.path: layer for layer in internals.all_layers(model)}
    problems, plan = [], []
    for entry, a, b, extras in items:
        layer_path, rank = entry["path"], entry["rank"]
        layer = layers.get(resolve(layer_path))
        if layer is None:
            problems.append(f"{layer_path}: no such layer in the model ({resolve.why(layer_path)})")
            continue
        if not hasattr(layer, "enable_lora"):
            problems.append(f"{layer_path}: the model's '{layer.path}' "
                            f"({type(layer).__name__}) cannot carry LoRA")
            continue
        state, problem = _target_state(layer, entry, owner)
        if problem:
            problems.append(f"{layer_path}: {problem}")
            continue
        if layer.lora_enabled and layer.lora_rank != rank and layer_state(layer) is None:
            problems.append(
                f"{layer_path}: file rank {rank}, layer rank {layer.lora_rank} (a plain LoRA "
                "layer keeps its rank; load into a layer without LoRA, or an HRP layer, to "
                "take the file's)"
            )
            continue
        factorization = "per_head" if state is None else state.factorization
        problem = lora.load_problem(layer, a.shape, b.shape, rank, factorization)
        if problem:
            problems.append(f"{layer_path}: {problem}")
            continue
        weights = {v.name: v for v in layer.weights}
        for name, value in extras.items():
            if name not in weights or tuple(weights[name].shape) != value.shape:
                problems.append(f"{layer_path}: weight '{name}' {value.shape} does not fit")
        plan.append((layer, entry, state, a, b, extras))
    covered = {layer.path for layer, *_ in plan} | {resolve(entry["path"]) for entry, *_ in items}
    for layer_path in sorted(set(lora_layers(model)) - covered):
        problems.append(f"{layer_path}: LoRA layer of the model missing from the file")
    return problems, plan


def load_adapters(model, path):
    """Loads adapters saved by `save_adapters` into `model`, by layer path.

    Layers without LoRA get it, at the file's rank and alpha. HRP layers
    (`enable_hrp`, `HRPDense`) take the file's rank and HRP state: a model
    set up as in training (still preheating) comes out in its main phase,
    so a later `HRPCallback` does not preheat again. If the model's
    optimizer is built it is rebuilt for the new variables. Everything is
    checked before anything is written: on any mismatch (missing paths,
    ranks or shapes), a `ValueError` lists all of them and the model is
    left unchanged.

    Args:
        model: a built Keras model with the same architecture.
        path: a file written by `save_adapters`.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((16,)), keras_hrp.HRPDense(8, rank=2, preheat_rank=8, name="proj")])
    >>> keras_hrp.save_adapters(model, "proj.adapters.npz")
    >>> fresh = keras.Sequential([
    ...     keras.Input((16,)), keras_hrp.HRPDense(8, rank=2, preheat_rank=8, name="proj")])
    >>> keras_hrp.load_adapters(fresh, "proj.adapters.npz")
    >>> fresh.layers[0].hrp_phase  # a preheating file: a later HRPCallback preheats on
    'preheat'
    """
    owner = "load_adapters"
    _check_model(owner, model)
    path = settings.path(owner, "path", path)
    header, items, weights = _read(path, owner)
    resolve = paths.Resolver(model, header.get("positions"))
    problems, plan = check_plan(model, items, owner, resolve)
    variables = {v.path: v for v in model.weights}
    targets = []
    for saved_path, value in weights.items():
        variable = variables.get(resolve(saved_path))
        if variable is None:
            problems.append(f"{saved_path}: trained weight with no place in the model "
                            f"({resolve.why(saved_path)})")
        elif tuple(variable.shape) != value.shape:
            problems.append(f"{saved_path}: trained weight {value.shape}, the model's "
                            f"'{variable.path}' {tuple(variable.shape)}")
        else:
            targets.append((variable, value))
    if problems:
        settings.fail(
            owner,
            f"'{path}' does not fit model '{model.name}' ({len(problems)} mismatches):\n  "
            + "\n  ".join(problems),
            path=path,
        )
    refrozen = paths.set_trainable(model, header.get("trainable"), resolve)
    for variable, value in targets:
        variable.assign(value)
    apply_plan(model, plan, retrain=refrozen)


def apply_plan(model, plan, retrain=False):
    """Writes a checked plan (see `check_plan`) into `model`: layers without
    LoRA get it, others take the plan's rank; the optimizer is rebuilt if
    built and the trainable variables changed (`retrain`: they did before)."""
    resized = []
    with internals.distribution_scope(model):
        for layer, entry, state, a, b, extras in plan:
            rank = entry["rank"]
            if not layer.lora_enabled:
                if state is not None:
                    layer.hrp_state = state  # first: it says how to factor the adapter
                lora.enable_adapter(
                    layer, rank, entry["lora_alpha"] / rank,
                    trainable_a=state is None or state.variant != "asymmetric",
                )
                fast_lora.use_fast_lora(layer)
                resized.append(layer)
            elif layer.lora_rank != rank:
                lora.resize(layer, rank)
                resized.append(layer)
            layer.lora_alpha = entry["lora_alpha"]
            if state is not None:
                layer.hrp_state = state
                checkpoints.guard(layer)
            a_var, b_var = lora.lora_factors(layer)
            a_var.assign(a)
            b_var.assign(b)
            weights = {v.name: v for v in layer.weights}
            for name, value in extras.items():
                weights[name].assign(value)
    if resized:
        internals.retrack_torch_params(
            model, [v for layer in resized for v in lora.lora_factors(layer)]
        )
    if resized or retrain:
        if getattr(getattr(model, "optimizer", None), "built", False):
            rebuild_training_state(model)
        else:
            internals.drop_compiled_functions(model)


def revive_adapters(model):
    """Re-draws `A` of every all-zero LoRA adapter; the output is unchanged.

    Keras' `load_own_variables` (used by `load_model` and `load_weights`)
    sets `A = B = 0` on LoRA layers, after which both gradients are zero
    forever. With `B = 0`, a fresh he_uniform `A` changes no output and lets
    the adapter train again. Layers prepared by `enable_hrp` do this by
    themselves on `load_weights`; call it after `keras.saving.load_model`
    of a model with stock LoRA layers.

    Args:
        model: a Keras model or layer.

    Returns:
        The paths of the revived layers.

    Example:

    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="proj")], name="net")
    >>> model.get_layer("proj").enable_lora(2)
    >>> _ = model.get_layer("proj").lora_kernel_a.assign(np.zeros((16, 2)))  # as Keras' load leaves it
    >>> keras_hrp.revive_adapters(model)
    ['net/proj']
    """
    return [path for path, layer in lora_layers(model).items() if lora.revive(layer)]
