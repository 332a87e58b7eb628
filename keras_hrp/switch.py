"""The model-wide HRP switch: preheat rank R -> rank r.

`WeightSnapshot` records, before preheating, what training may change;
`switch_to_main` re-initializes every preheated layer from its delta, rolls
the rest back, and rebuilds the optimizer and the compiled functions.
"""

import dataclasses
import functools
import gc
import time
import warnings

import keras
import numpy as np
from keras import ops

from keras_hrp import internals
from keras_hrp import lora
from keras_hrp import settings
from keras_hrp import spectra
from keras_hrp.initializers import directions_from_svd
from keras_hrp.initializers import expected_norm
from keras_hrp.initializers import truncated_from_svd
from keras_hrp.linalg import svd_of_product
from keras_hrp.rank_allocation import allocate_ranks
from keras_hrp.schedules import LinearWarmup
from keras_hrp.state import hrp_layers
from keras_hrp.state import layer_state
from keras_hrp.state import run_state


def _is_adapter(layer, variable):
    return layer_state(layer) is not None and layer.lora_enabled and any(
        variable is factor for factor in lora.lora_factors(layer)
    )


def changing_variables(model):
    """Variables training may change, minus HRP adapters and frozen weights."""
    variables = []
    for layer in internals.all_layers(model):
        if not layer.trainable:
            continue
        frozen_base = getattr(layer, "lora_enabled", False)
        for variable in internals.own_variables(layer):
            if _is_adapter(layer, variable):
                continue
            if frozen_base and not variable.trainable:
                continue  # the frozen kernel (and scales) under a LoRA adapter
            variables.append(variable)
    return variables


class WeightSnapshot:
    """Host copy of the weights that preheating may change, for roll back.

    Holds the trainable variables (except the HRP adapters) and the state of
    trainable layers updated without gradients (e.g. normalization
    statistics). Frozen weights are not copied, so a frozen backbone does not
    double in memory.

    Args:
        model: a built Keras model.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((16,)), keras_hrp.HRPDense(8, rank=2, preheat_rank=8, name="proj")])
    >>> snapshot = keras_hrp.WeightSnapshot(model)  # before the preheat
    >>> len(snapshot.to_arrays())  # the bias: the frozen kernel is not copied
    1
    """

    def __init__(self, model):
        variables = changing_variables(model)
        self._entries = [(v, ops.convert_to_numpy(v)) for v in variables]

    @classmethod
    def from_arrays(cls, model, arrays, owner="WeightSnapshot"):
        """Rebuilds a snapshot of `model` from `to_arrays()`' output."""
        variables = {v.path: v for v in changing_variables(model)}
        missing = [
            path for path, value in arrays.items()
            if path not in variables or tuple(variables[path].shape) != value.shape
        ]
        if missing:
            settings.fail(
                owner,
                f"the roll-back snapshot does not fit model '{model.name}' "
                "(no such variable, or another shape)",
                variables=missing,
            )
        snapshot = cls.__new__(cls)
        snapshot._entries = [(variables[path], value) for path, value in arrays.items()]
        return snapshot

    def to_arrays(self):
        """`{variable path: value}`, for keras-hrp's checkpoint state files."""
        return {variable.path: value for variable, value in self._entries}

    @property
    def nbytes(self):
        return sum(value.nbytes for _, value in self._entries)

    def __len__(self):
        return len(self._entries)

    def restore(self):
        for variable, value in self._entries:
            variable.assign(value)


@dataclasses.dataclass
class LayerSwitch:
    """What the switch did to one layer."""

    singular_values: np.ndarray
    energy: float
    from_rank: int
    to_rank: int
    fallback: str | None = None


class SwitchReport(dict):
    """Per layer path, a `LayerSwitch`; `seconds` is the switch's wall time,
    `reason` why the preheat ended and `checks` an automatic preheat's
    checks (`keras_hrp.auto_preheat.Check`).

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((16,)), keras_hrp.HRPDense(8, rank=2, preheat_rank=8, name="proj")])
    >>> model.compile("adam", "mse")
    >>> _ = model.fit(np.ones((32, 16)), np.zeros((32, 8)), verbose=0)
    >>> report = keras_hrp.switch_to_main(model)
    >>> [item.to_rank for item in report.values()], report.fallbacks
    ([2], {})
    """

    seconds = 0.0
    reason = ""
    checks = ()

    @property
    def fallbacks(self):
        return {path: item.fallback for path, item in self.items() if item.fallback}

    def plot(self, path):
        """Writes a PNG of each layer's preheated spectrum and the energy
        kept (see `keras_hrp.spectra.plot_spectra`); returns `path`."""
        return spectra.plot_spectra(self, path)

    def summary(self):
        lines = [f"{'layer':40s} {'R->r':>7s} {'energy kept':>11s}  note"]
        for path, item in self.items():
            ranks = f"{item.from_rank}->{item.to_rank}"
            lines.append(
                f"{path:40s} {ranks:>7s} {item.energy:11.3f}  {item.fallback or ''}"
            )
        return "\n".join(lines)


@functools.cache
def _compiled_svd():
    """`svd_of_product`, on JAX compiled once per factor shape (every rank
    after it is slicing): a switch of 210 layers at 19 different ranks
    compiled 144 programs (20 of its 29 s) while the rank was inside."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(svd_of_product)
    return svd_of_product


def _factor_dims(layer):
    """`(m, n, R)`: the adapter as an `(m, R) @ (R, n)` product."""
    a, b = lora.lora_factors(layer)
    return int(np.prod(a.shape)) // b.shape[0], b.shape[1], b.shape[0]


def _preheated_svd(layer):
    """`(u, s, v)` of the layer's preheated `A @ B` as numpy, or why not."""
    a, b = (ops.convert_to_numpy(x) for x in lora.factor_matrices(layer))
    if not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
        return "non-finite preheated adapter"
    try:
        return tuple(ops.convert_to_numpy(x) for x in _compiled_svd()(a, b))
    except Exception as error:  # a failed SVD must not kill the run
        return f"SVD failed: {error}"


def _new_factors(layer, svd, rank, norm, init):
    """`(A, B)` at `rank` and the report, or a reason to fall back."""
    if isinstance(svd, str):
        return None, None, None, None, svd
    u, s, v = svd
    scaled = s * abs(lora.lora_scale(layer))  # the delta's singular values, for the report
    if not np.all(np.isfinite(scaled)) or not np.all(np.isfinite(u)) or not np.all(np.isfinite(v)):
        return None, None, scaled, None, "non-finite SVD result"
    if scaled[0] == 0.0:
        return None, None, scaled, None, "preheated delta is zero"
    if init == "directions":
        new_a, energy = directions_from_svd(u, s, rank, norm)
        new_b = np.zeros((rank, v.shape[0]), "float32")
    else:
        new_a, new_b, energy = truncated_from_svd(u, s, v, rank)
    return new_a, new_b, scaled, energy, None


def _switch_layer(layer, init, svd):
    state = layer.hrp_state
    rank = state.rank
    a_shape = lora.a_shape_at_rank(layer, rank)
    m, n, from_rank = _factor_dims(layer)
    norm = expected_norm(lora.DEFAULT_A_INITIALIZER, a_shape)
    new_a, new_b, s, energy, fallback = _new_factors(layer, svd, rank, norm, init)
    if fallback:
        initializer = keras.initializers.get(lora.DEFAULT_A_INITIALIZER)
        new_a = initializer(a_shape, dtype="float32")
        new_b = ops.zeros((rank, n), dtype="float32")
        warnings.warn(
            f"HRP switch: layer '{layer.path}' falls back to a random rank-{rank} "
            f"init ({fallback}).",
            stacklevel=3,
        )
    lora.replace_factors(layer, new_a, new_b, trainable_a=state.variant != "asymmetric")
    state.phase = "main"
    if s is None:
        s = np.full((min(m, n, from_rank),), np.nan, "float32")
    return LayerSwitch(s, np.nan if energy is None else energy, from_rank, rank, fallback)


def _allocate_ranks(layers, svds):
    """Sets each `auto_rank` layer's main rank from its preheated spectrum
    (`svds[layer]`), within the layers' `rank_budget` (or the parameters
    their nominal ranks would train; see `keras_hrp.rank_allocation`). A
    layer without a finite spectrum keeps its nominal rank, paid from the
    budget first (and falls back in `_switch_layer`)."""
    chosen, spectra_, costs, tops, budget = [], [], [], [], 0
    total = next((layer.hrp_state.rank_budget for layer in layers if layer.hrp_state.rank_budget), None)
    for layer in layers:
        svd, state = svds[layer], layer.hrp_state
        m, n, _ = _factor_dims(layer)
        cost = m + n
        if isinstance(svd, str) or not np.all(np.isfinite(svd[1])):
            total = None if total is None else total - state.rank * cost
            continue
        chosen.append(layer)
        spectra_.append(svd[1])
        costs.append(cost)
        tops.append(min(state.preheat_rank - 1, m, n))
        budget += state.rank * cost
    budget = budget if total is None else total
    for layer, rank in zip(chosen, allocate_ranks(spectra_, costs, budget, tops)):
        layer.hrp_state.rank = rank


def _warmed_up(optimizer, warmup_steps):
    base = internals.base_learning_rate(optimizer)
    if isinstance(base, keras.Variable):
        base = float(ops.convert_to_numpy(base))
    optimizer.learning_rate = LinearWarmup(base, warmup_steps)


def learning_rate_config(optimizer):
    """The optimizer's learning rate as its config holds it: a float, or a
    schedule's serialized config (JSON-safe; `LinearWarmup` included)."""
    base = internals.base_learning_rate(optimizer)
    if isinstance(base, keras.optimizers.schedules.LearningRateSchedule):
        return keras.saving.serialize_keras_object(base)
    return float(ops.convert_to_numpy(base))


def _fresh_optimizer(optimizer, learning_rate):
    config = optimizer.get_config()
    if learning_rate is not None:
        inner = config["inner_optimizer"]["config"] if "inner_optimizer" in config else config
        inner["learning_rate"] = learning_rate
    return optimizer.__class__.from_config(config)


def rebuild_training_state(model, warmup_steps=0, learning_rate=None):
    """Fresh optimizer (new slots, `iterations` 0) and compiled functions.

    Call after variables were added or removed on a compiled model; works
    inside `fit` on every backend, with or without jit, and creates the new
    optimizer variables under the model's distribution strategy. With
    `warmup_steps > 0` the fresh optimizer's learning rate ramps up
    linearly over that many steps (`LinearWarmup`). A learning-rate
    schedule restarts from step 0 either way. `learning_rate` (a float or
    a `learning_rate_config`) replaces the optimizer's before that.
    """
    optimizer = getattr(model, "optimizer", None)
    with internals.distribution_scope(model):
        if optimizer is not None:
            fresh = _fresh_optimizer(optimizer, learning_rate)
            if warmup_steps:
                _warmed_up(fresh, warmup_steps)
            internals.replace_compiled_optimizer(model, optimizer, fresh)
            model.optimizer = fresh
            del optimizer
            gc.collect()  # the old slots and rank-R variables go before the fresh slots come
            fresh.build(model.trainable_variables)
            internals.update_each_dtype_apart(fresh)
        internals.drop_compiled_functions(model)
    run_state(model).recount_from(getattr(model, "optimizer", None))


def switch_to_main(model, snapshot=None, init="directions", warmup_steps=0):
    """Switches every preheating HRP layer of `model` to its main rank.

    For each layer in phase `"preheat"`, with `init="directions"` (the
    paper's reading): the top-`rank` left singular directions of the
    preheated delta `scale * A @ B` become the new `A` (norm-matched to the
    `A` initializer at rank `rank`) and `B = 0`, so the adapter adds nothing
    yet. With `init="truncated_delta"` the adapter keeps the best rank-`rank`
    approximation of the preheated delta instead. The adapter variables are
    re-created at rank `rank`, under the model's distribution strategy. A
    layer whose delta is not finite (or whose SVD fails) falls back to a
    random init, with a warning. Layers set up with `rank="auto"` first get
    their ranks from their preheated spectra, within their `rank_budget`
    (`keras_hrp.rank_allocation`). Then
    `snapshot` (if given) is restored, the
    optimizer is replaced by a fresh one and every compiled function
    (train, test, predict, KerasHub's generate) is rebuilt. Use it in custom
    training loops; `HRPCallback` calls it inside `fit`. Singular vectors
    have a fixed sign, so replicas that switch locally agree bit for bit.

    Args:
        model: a built Keras model with HRP layers in phase `"preheat"`.
        snapshot: a `WeightSnapshot` taken before preheating, to roll back
            every other weight; `None` keeps them as trained.
        init: `"directions"` or `"truncated_delta"` (see above).
        warmup_steps: if positive, the fresh optimizer's learning rate ramps
            up linearly over this many steps.

    Returns:
        A `SwitchReport`.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((16,)), keras_hrp.HRPDense(8, rank=2, preheat_rank=8)])
    >>> model.compile("adam", "mse")
    >>> snapshot = keras_hrp.WeightSnapshot(model)
    >>> _ = model.fit(np.ones((32, 16)), np.zeros((32, 8)), verbose=0)  # the preheat
    >>> report = keras_hrp.switch_to_main(model, snapshot)
    >>> model.layers[0].lora_rank, report.fallbacks
    (2, {})
    """
    owner = "switch_to_main"
    if not isinstance(model, keras.layers.Layer):
        settings.fail(owner, "`model` must be a Keras model", error=TypeError, model=model)
    if snapshot is not None and not isinstance(snapshot, WeightSnapshot):
        settings.fail(
            owner, "`snapshot` must be a keras_hrp.WeightSnapshot or None",
            error=TypeError, snapshot=snapshot,
        )
    init, warmup_steps, _ = settings.check_switch_settings(owner, init, warmup_steps)
    start = time.perf_counter()
    layers = hrp_layers(model, phase="preheat")
    if not layers:
        settings.fail(
            owner,
            f"model '{model.name}' has no HRP layer in phase 'preheat'",
            phases=[layer.hrp_state.phase for layer in hrp_layers(model)],
        )
    run_state(model).count_updates(model)
    report = SwitchReport()
    svds = {layer: _preheated_svd(layer) for layer in layers}
    _allocate_ranks([layer for layer in layers if layer.hrp_state.auto_rank], svds)
    with internals.distribution_scope(model):
        for layer in layers:
            report[layer.path] = _switch_layer(layer, init, svds[layer])
    if snapshot is not None:
        snapshot.restore()
    internals.retrack_torch_params(
        model, [v for layer in layers for v in lora.lora_factors(layer)]
    )
    rebuild_training_state(model, warmup_steps)
    report.seconds = time.perf_counter() - start
    return report
