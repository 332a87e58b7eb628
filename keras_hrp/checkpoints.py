"""Checkpoints that resume an HRP run exactly, beside Keras' own files.

Keras writes a LoRA layer's kernel merged with its adapter (`W + s A @ B`);
loading such a file writes that sum into the frozen weight and zeroes the
adapter. keras-hrp leaves Keras' files as Keras writes them (a stock Keras
or KerasHub model still loads them) and keeps what exact resume needs in
its own state file beside them, `<path>.hrp.npz`: each HRP layer's state
and factors, a checksum of the merged kernel Keras wrote, the roll-back
snapshot, a fingerprint of the Keras file it belongs with and, beside a
`.keras` file, the frozen weights themselves.

A save writes Keras' file to a temporary name first, then moves the old
state file aside (`<path>.hrp.npz.prev`), writes the new one and renames
the Keras file into place: a process killed at any point leaves a pair
that loads (the load takes the state file whose fingerprint matches), and
the next save in that folder removes the temporaries it left.

`attach(model)` makes `model.save_weights`, `model.save` and
`model.load_weights` (what `BackupAndRestore` and `ModelCheckpoint` call)
write and read that file; `enable_hrp` and `HRPCallback` attach the models
they are given. Loading with a state file keeps the frozen weights in
memory bit for bit, resizes adapters to the saved ranks (the optimizer is
rebuilt first, so its saved slots load), and restores the layers' phases,
the preheat's progress and the roll-back snapshot.
"""

import json
import os
import secrets
import warnings
import zlib

import keras
import numpy as np
from keras import ops

from keras_hrp import files
from keras_hrp import internals
from keras_hrp import lora
from keras_hrp import paths
from keras_hrp import settings
from keras_hrp import fast_lora
from keras_hrp.auto_preheat import SubspaceTracker
from keras_hrp.layers import HRPDense
from keras_hrp.state import HRPState
from keras_hrp.state import hrp_layers
from keras_hrp.state import layer_state
from keras_hrp.state import run_state
from keras_hrp.switch import WeightSnapshot
from keras_hrp.switch import learning_rate_config
from keras_hrp.switch import rebuild_training_state

SUFFIX = ".hrp.npz"
PREVIOUS = ".prev"  # the last save's state file while a save replaces the pair
KIND = "checkpoint"
VERSION = 1

# id(layer) -> its entry, while a load with a state file runs.
_LOADING = {}
# One list per `load_weights` without a state file that runs: the paths of
# the HRP layers whose frozen weight the load changed.
_STOCK_LOADS = []


def state_path(filepath):
    """Where keras-hrp keeps its state beside a Keras file."""
    return os.fspath(filepath) + SUFFIX


def _previous_path(filepath):
    return state_path(filepath) + PREVIOUS


def attach(model):
    """Makes `model`'s save / load methods carry keras-hrp's state file.

    Wraps `save_weights`, `save` and `load_weights` of `model` and of every
    model nested in it (this instance only), and guards its HRP layers'
    frozen weights. Idempotent.
    """
    for owner in internals.all_layers(model):
        if isinstance(owner, keras.Model):
            internals.wrap_method(owner, "save_weights", _saving(owner, with_base=False))
            internals.wrap_method(owner, "save", _saving(owner, with_base=True))
            internals.wrap_method(owner, "load_weights", _loading(owner))
    for layer in hrp_layers(model):
        guard(layer)


def guard(layer):
    """Keeps a stock HRP layer's frozen weight through Keras' `load_own_variables`.

    Keras writes the saved (merged) kernel into the frozen weight and zeroes
    the adapter. During a load with a state file the frozen weight is put
    back exactly; without one, `A` is re-drawn so the adapter can train, and
    a warning says when the merge changed a run's frozen weight.
    """
    if not _merges_on_save(layer):
        return

    def wrapper(original):
        def load_own_variables(store):
            entry = _LOADING.get(id(layer))
            if entry is None:
                before = _base_checksum(layer)
                original(store)
                _after_stock_load(layer, before)
                return
            kept = [(v, ops.convert_to_numpy(v)) for v in lora.frozen_variables(layer)]
            original(store)
            _restore_base(layer, entry, kept)

        return load_own_variables

    internals.wrap_method(layer, "load_own_variables", wrapper)


def _base_checksum(layer):
    if layer_state(layer) is None:
        return None
    return _checksum(ops.convert_to_numpy(internals.base_weight(layer)))


def _after_stock_load(layer, before):
    """After Keras loaded `layer` from a file without a state file: `A`
    re-drawn so the adapter trains, and a warning where the frozen weight
    changed (the file's merged kernel may hold an adapter's delta)."""
    if getattr(layer, "lora_enabled", False):
        lora.revive(layer)
    if before is None or _base_checksum(layer) == before:
        return
    if _STOCK_LOADS:
        _STOCK_LOADS[-1].append(layer.path)  # one warning for the model's load
    else:
        warnings.warn(_stock_load_message(f"Layer '{layer.path}' (HRP)", [layer.path], "its file"),
                      stacklevel=4)


def _stock_load_message(what, changed, source):
    shown = ", ".join(f"'{path}'" for path in changed[:4]) + (", ..." if len(changed) > 4 else "")
    return (
        f"{what} was loaded from {source} without keras-hrp's state file, and the load "
        f"changed the frozen weights of {len(changed)} HRP layer(s) ({shown}). Keras stores a "
        "LoRA layer's kernel merged with its adapter: if the file was saved from a LoRA or "
        "HRP model, the frozen weights now include that adapter's delta and the adapters "
        "start again (A random, B = 0). Keep the state file it was saved with "
        f"('<path>{SUFFIX}', written by saves through the model given to enable_hrp / "
        "HRPCallback) beside the file; if it holds other pretrained weights, nothing is lost."
    )


def _merged(layer):
    """The merged kernel as a load puts it into the frozen variable.

    Keras writes `layer.kernel` (in the compute dtype under a mixed policy,
    e.g. bfloat16) and loading casts it to the variable's dtype: the
    checksum must be of that value, not of the float32 sum.
    """
    merged = layer.embeddings if isinstance(layer, keras.layers.Embedding) else layer.kernel
    base = internals.base_weight(layer)
    return ops.convert_to_numpy(ops.cast(merged, base.dtype))


def _merged_dtype(layer):
    merged = layer.embeddings if isinstance(layer, keras.layers.Embedding) else layer.kernel
    return keras.backend.standardize_dtype(merged.dtype)


def _checksum(array):
    return zlib.crc32(np.ascontiguousarray(array).tobytes())


def _restore_base(layer, entry, kept):
    """After Keras' load: the frozen weights back, bit for bit, then checks.

    The file's merged kernel must be the one the state file describes
    (checksum); if the model's frozen weight plus the saved delta does not
    give it, the model holds other weights than the run was trained from,
    and the base is taken from the file instead.
    """
    base = internals.base_weight(layer)
    merged = ops.convert_to_numpy(base)  # what Keras loaded: W + s A B
    for variable, value in kept:
        variable.assign(value)
    if entry["merged_crc"] is None or entry["frozen"]:
        return  # quantized (no float merge to check), or the state file holds the base
    if _checksum(merged) != entry["merged_crc"]:
        entry["problem"] = "its state was written by another save than the Keras file"
        return
    a, b = entry["A"], entry["B"]
    delta = entry["scale"] * (a.reshape(-1, b.shape[0]).astype("float64") @ b.astype("float64"))
    delta = lora.to_kernel(layer, delta)
    expected = dict((id(v), value) for v, value in kept)[id(base)].astype("float64") + delta
    written = np.dtype(keras.backend.standardize_dtype(entry["merged_dtype"] or merged.dtype)
                       .replace("bfloat16", "float16"))  # only its width matters here
    tolerance = 1e-4 if written.itemsize >= 4 else 3e-2
    if np.abs(merged - expected).max() <= tolerance * (1.0 + np.abs(expected).max()):
        return
    base.assign((merged.astype("float64") - delta).astype(merged.dtype))
    warnings.warn(
        f"Layer '{layer.path}': the model's frozen weight is not the one this checkpoint "
        "was trained from; it is taken from the file's merged kernel minus the saved "
        "adapter (exact to float rounding). Load the pretrained weights first for a "
        "bit-exact base.",
        stacklevel=4,
    )


def _filepath(args, kwargs):
    return kwargs["filepath"] if "filepath" in kwargs else args[0]


def _saving(model, with_base):
    def make(original):
        def save(*args, **kwargs):
            filepath = os.fspath(_filepath(args, kwargs))
            if not hrp_layers(model) or not _through_temporary(args, kwargs, filepath):
                result = original(*args, **kwargs)
                write_state(model, filepath, with_base=with_base)
                return result
            return _save_pair(model, original, args, kwargs, filepath, with_base)

        return save

    return make


def _through_temporary(args, kwargs, filepath):
    """Whether the save can go through a temporary file: a local file that
    may be overwritten (Keras asks before overwriting without `overwrite`;
    `zipped=False` writes a folder)."""
    overwrite = kwargs.get("overwrite", args[1] if len(args) > 1 else True)
    return ("://" not in filepath and kwargs.get("zipped", True) is not False
            and (overwrite or not os.path.exists(filepath)))


def _save_pair(model, original, args, kwargs, filepath, with_base):
    """Keras' file and the state file, replaced so a kill keeps a pair that loads."""
    folder = os.path.dirname(os.path.abspath(filepath))
    os.makedirs(folder, exist_ok=True)
    files.remove_strays(folder)
    name = f"{files.temporary_prefix()}{secrets.token_hex(4)}_{os.path.basename(filepath)}"
    temporary = os.path.join(folder, name)  # same suffix: Keras picks the format by it
    sidecar, previous = state_path(filepath), _previous_path(filepath)
    try:
        if "filepath" in kwargs:
            result = original(*args, **{**kwargs, "filepath": temporary})
        else:
            result = original(temporary, *args[1:], **kwargs)
        header, arrays = _state(model, with_base, files.fingerprint(temporary))
        if _belongs(sidecar, filepath):
            os.replace(sidecar, previous)  # on disk: the old Keras file and its state
        files.write(sidecar, KIND, VERSION, header, arrays)
        os.replace(temporary, filepath)  # on disk: the new pair
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    if os.path.exists(previous):
        os.remove(previous)
    return result


def _belongs(state_file, filepath):
    """Whether `state_file` exists and was written with the Keras file at
    `filepath` (or before fingerprints, with whatever is there)."""
    if not os.path.exists(state_file) or not os.path.exists(filepath):
        return False
    header = files.read_header(state_file)
    if header is None:
        return False
    saved = header.get("keras_file")
    return saved is None or not os.path.isfile(filepath) or files.matches(saved, filepath)


def _loading(model):
    def make(original):
        def load_weights(*args, **kwargs):
            filepath = os.fspath(_filepath(args, kwargs))
            owner = f"load_weights of model '{model.name}'"
            found = _state_file(filepath, owner)
            if found is None:
                changed = []
                _STOCK_LOADS.append(changed)
                try:
                    result = original(*args, **kwargs)
                finally:
                    _STOCK_LOADS.remove(changed)
                if changed:
                    warnings.warn(_stock_load_message(f"Model '{model.name}'", changed, f"'{filepath}'"),
                                  stacklevel=2)
                return result
            sidecar, header, arrays = found
            resolve = paths.Resolver(model, header.get("positions"))
            entries = _entries(model, header, arrays, sidecar, owner, resolve)
            _prepare(model, header, entries, resolve)
            _LOADING.update((id(entry["layer"]), entry) for entry in entries)
            try:
                result = original(*args, **kwargs)
            finally:
                for entry in entries:
                    _LOADING.pop(id(entry["layer"]), None)
            _apply(model, header, arrays, entries, sidecar, owner, resolve)
            return result

        return load_weights

    return make


def _state_file(filepath, owner):
    """`(path, header, arrays)` of the state file written with the Keras
    file at `filepath` (the current one, or the previous one a killed save
    left), `None` where there is none, or an error where neither fits."""
    candidates = [path for path in (state_path(filepath), _previous_path(filepath)) if os.path.exists(path)]
    if not candidates:
        return None
    if not os.path.exists(filepath):
        return None  # Keras says the file is missing
    for path in candidates:
        if len(candidates) == 1 or _belongs(path, filepath):
            header, arrays = files.read(path, KIND, (VERSION,), owner)
            saved = header.get("keras_file")
            if saved is None or not os.path.isfile(filepath) or files.matches(saved, filepath):
                return path, header, arrays
    settings.fail(
        owner,
        f"the state file '{candidates[0]}' was not written with '{filepath}' (the Keras file "
        "changed since: `keras.saving.save_model` and the saves of a model keras-hrp does not "
        "attach write the Keras file alone). Save again through the model given to enable_hrp "
        "/ HRPCallback, or remove the state file to load the Keras file as stock Keras does "
        "(a LoRA layer's adapter then folds into its frozen weight)",
        path=filepath,
    )


def write_state(model, filepath, with_base=False):
    """Writes keras-hrp's state for `model` beside the Keras file `filepath`.

    Args:
        model: the model just saved.
        filepath: the Keras file (`.weights.h5`, `.keras`, ...), already
            written: the state file records its fingerprint.
        with_base: also store the frozen weights under the adapters, so
            `keras_hrp.load_model` restores them exactly without the
            pretrained model (used beside `.keras` files).
    """
    sidecar = state_path(filepath)
    if not hrp_layers(model):
        for stale in (sidecar, _previous_path(filepath)):
            if os.path.exists(stale):
                os.remove(stale)  # a stale state must not meet a new file
        return
    header, arrays = _state(model, with_base, files.fingerprint(filepath))
    files.write(sidecar, KIND, VERSION, header, arrays)
    if os.path.exists(_previous_path(filepath)):
        os.remove(_previous_path(filepath))


def _state(model, with_base, keras_file):
    """`(header, arrays)` of `model`'s state file; `keras_file` is the
    fingerprint of the Keras file it goes with."""
    layers = hrp_layers(model)
    run = run_state(model)
    run.count_updates(model)
    arrays, entries = {}, []
    for i, layer in enumerate(layers):
        a, b = lora.lora_factors(layer)
        arrays[f"layer{i}.A"] = ops.convert_to_numpy(a)
        arrays[f"layer{i}.B"] = ops.convert_to_numpy(b)
        merges = _merges_on_save(layer)
        frozen = lora.frozen_variables(layer) if with_base and merges else []
        for j, variable in enumerate(frozen):
            arrays[f"layer{i}.frozen{j}"] = ops.convert_to_numpy(variable)
        entries.append({
            "path": layer.path,
            "state": layer.hrp_state.to_dict(),
            "lora_alpha": float(layer.lora_alpha),
            "merged_crc": (
                _checksum(_merged(layer))
                if merges and layer.quantization_mode is None else None
            ),
            "merged_dtype": _merged_dtype(layer) if merges else None,
            "frozen": [variable.name for variable in frozen],
        })
    snapshot = run.snapshot.to_arrays() if run.snapshot is not None else {}
    for i, value in enumerate(snapshot.values()):
        arrays[f"snapshot{i}"] = value
    tracker = None
    if run.tracker is not None:
        tracker, tracked = run.tracker.to_arrays()
        arrays.update(tracked)
    trainable = {layer.path: bool(layer.trainable) for layer in internals.all_layers(model)}
    header = {
        "positions": paths.of(model, [*trainable, *snapshot]),
        "tracker": tracker,
        "layers": entries,
        "snapshot": list(snapshot) if run.snapshot is not None else None,
        "iterations": run.counted_iterations,
        "learning_rate": (  # the switch's warm-up is not in the compiled optimizer
            None if getattr(model, "optimizer", None) is None
            else learning_rate_config(model.optimizer)
        ),
        "trainable": trainable,
        "keras_file": keras_file,
    }
    return header, arrays


def _merges_on_save(layer):
    """Whether Keras saves this layer's kernel merged (HRPDense saves it apart)."""
    return hasattr(layer, "enable_lora") and not isinstance(layer, HRPDense)


def _entries(model, header, arrays, sidecar, owner, resolve):
    """The file's layers matched to `model`'s, or one error listing every mismatch."""
    try:
        return _match(model, header, arrays, sidecar, owner, resolve)
    except (KeyError, TypeError, AttributeError) as error:
        settings.fail(owner, f"damaged state file ({type(error).__name__}: {error})", path=sidecar)


def _match(model, header, arrays, sidecar, owner, resolve):
    layers = {layer.path: layer for layer in internals.all_layers(model)}
    entries, problems = [], []
    for i, saved in enumerate(header["layers"]):
        layer = layers.get(resolve(saved["path"]))
        if layer is None:
            problems.append(f"{saved['path']}: no such layer ({resolve.why(saved['path'])})")
            continue
        if not hasattr(layer, "enable_lora"):
            problems.append(f"{saved['path']}: the model's '{layer.path}' "
                            f"({type(layer).__name__}) cannot carry LoRA")
            continue
        state = HRPState.from_dict(saved["state"], f"{owner}, layer '{saved['path']}'")
        a, b = arrays[f"layer{i}.A"], arrays[f"layer{i}.B"]
        problem = lora.load_problem(layer, a.shape, b.shape, state.current_rank, state.factorization)
        if problem:
            problems.append(f"{saved['path']}: {problem}")
            continue
        frozen = {name: arrays[f"layer{i}.frozen{j}"] for j, name in enumerate(saved["frozen"])}
        entries.append({
            "layer": layer, "state": state, "A": a, "B": b, "frozen": frozen,
            "scale": state.scale, "lora_alpha": saved["lora_alpha"],
            "merged_crc": saved["merged_crc"], "merged_dtype": saved.get("merged_dtype"),
            "problem": None,
        })
    missing = sorted(
        layer.path for layer in hrp_layers(model) if layer.path not in {e["layer"].path for e in entries}
    )
    problems += [f"{path}: HRP layer of the model missing from the state file" for path in missing]
    if problems:
        settings.fail(
            owner,
            f"'{sidecar}' does not fit model '{model.name}' ({len(problems)} mismatches):\n  "
            + "\n  ".join(problems),
            path=sidecar,
        )
    return entries


def _prepare(model, header, entries, resolve):
    """Gives every saved layer its saved rank, and the model a built
    optimizer for them, before Keras loads the file."""
    fresh = [entry for entry in entries if not entry["layer"].lora_enabled]
    if fresh:  # a model not set up for HRP: freeze as it was saved, first
        paths.set_trainable(model, header["trainable"], resolve)
    changed = bool(fresh)
    with internals.distribution_scope(model):
        for entry in entries:
            layer, state = entry["layer"], entry["state"]
            layer.hrp_state = state  # first: it says how the adapter is factored
            if not layer.lora_enabled:
                lora.enable_adapter(
                    layer, state.current_rank, state.scale,
                    trainable_a=state.variant != "asymmetric",
                )
                fast_lora.use_fast_lora(layer)
                guard(layer)
            elif tuple(lora.lora_factors(layer)[0].shape) != lora.a_shape_at_rank(layer, state.current_rank):
                lora.resize(layer, state.current_rank)  # another rank or factorization
                changed = True
    if changed:
        internals.retrack_torch_params(
            model, [v for entry in entries for v in lora.lora_factors(entry["layer"])]
        )
    optimizer = getattr(model, "optimizer", None)
    saved_rate = header.get("learning_rate")
    other_rate = (
        optimizer is not None and saved_rate is not None
        and not _same_rate(saved_rate, learning_rate_config(optimizer))
    )
    if changed or other_rate or (optimizer is not None and not optimizer.built):
        # Built for the saved variables, so Keras loads the saved slots (as
        # BackupAndRestore does): exact resume needs the optimizer's state,
        # and its learning rate as the run had it (a warm-up since the switch).
        rebuild_training_state(model, learning_rate=saved_rate if other_rate else None)


def _same_rate(saved, current):
    """Floats live in a variable the weights file restores; schedules must match."""
    if isinstance(saved, dict) or isinstance(current, dict):
        return saved == json.loads(json.dumps(current))  # as the header holds it
    return True


def _apply(model, header, arrays, entries, sidecar, owner, resolve):
    """After Keras' load: factors, states, frozen weights, snapshot, step count."""
    stale = [entry["layer"].path for entry in entries if entry["problem"]]
    if stale:
        settings.fail(
            owner,
            "the state file was written by another save than the Keras file "
            "(merged kernels differ); the frozen weights are kept, the other weights "
            "are the Keras file's",
            path=sidecar, layers=stale,
        )
    for entry in entries:
        layer = entry["layer"]
        a, b = lora.lora_factors(layer)
        a.assign(entry["A"])
        b.assign(entry["B"])
        layer.lora_alpha = entry["lora_alpha"]
        layer.hrp_state = entry["state"]
        variables = {v.name: v for v in lora.frozen_variables(layer)}
        for name, value in entry["frozen"].items():
            variables[name].assign(value)
    run = run_state(model)
    tracker = header.get("tracker")
    try:
        run.tracker = None if tracker is None else SubspaceTracker.from_arrays(tracker, arrays, resolve)
    except (KeyError, TypeError, ValueError) as error:
        settings.fail(owner, f"damaged state file ({type(error).__name__}: {error})", path=sidecar)
    saved = header.get("snapshot")
    run.snapshot = None if saved is None else WeightSnapshot.from_arrays(
        model, {resolve(path): arrays[f"snapshot{i}"] for i, path in enumerate(saved)}, owner
    )
    optimizer = getattr(model, "optimizer", None)
    run.recount_from(optimizer)
    if header.get("iterations") is not None and run.counted_iterations is not None:
        if run.counted_iterations != header["iterations"]:
            settings.fail(
                owner,
                f"the state file was written at optimizer step {header['iterations']}, the "
                f"weights file at step {run.counted_iterations}: they come from different saves",
                path=sidecar,
            )


def load_model(filepath, custom_objects=None, compile=True, safe_mode=True):
    """`keras.saving.load_model`, with the LoRA and HRP state keras-hrp saved.

    KerasHub rebuilds a model from its config without LoRA and with its
    backbone trainable. With the state file keras-hrp wrote beside a
    `.keras` file (`model.save` on a model given to `enable_hrp` or
    `HRPCallback`), this puts back every HRP layer's adapter, phase and
    rank, the frozen weights under them (exactly, from the state file) and
    the trainable flags, then reloads the file's weights and optimizer
    state into the model so set up.

    Args:
        filepath: a `.keras` file.
        custom_objects: as in `keras.saving.load_model`.
        compile: as in `keras.saving.load_model`.
        safe_mode: as in `keras.saving.load_model`.

    Returns:
        The model, attached (its saves keep writing the state file).

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((16,)), keras_hrp.HRPDense(8, rank=2, preheat_rank=8)])
    >>> model.save("run.keras")  # HRPDense keeps its phase; enable_hrp layers too
    >>> keras_hrp.load_model("run.keras").layers[0].hrp_phase
    'preheat'
    """
    filepath = settings.path("load_model", "filepath", filepath)
    model = keras.saving.load_model(
        filepath, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode
    )
    if any(os.path.exists(path) for path in (state_path(filepath), _previous_path(filepath))):
        attach(model)
        model.load_weights(filepath)
    return model
