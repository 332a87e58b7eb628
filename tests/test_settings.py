"""Every public entry point: valid arguments work, invalid ones get a clear error.

Property-based: hypothesis draws argument combinations, valid and not; an
invalid one must raise `ValueError` / `TypeError` naming the function, the
first invalid argument and its value, never a traceback from inside Keras.
"""

import math
import numbers
import os
import warnings

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_hrp
from keras_hrp import settings as hrp_settings
from tests.helpers import hrp_mlp

PROPERTY = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
INTS = st.integers(-2, 12)
ANYTHING = st.one_of(
    st.none(), st.booleans(), INTS, INTS.map(np.int64), INTS.map(np.int32),
    st.floats(-3, 40, allow_nan=False), st.sampled_from([math.nan, math.inf, "16", "", [1]]),
)


def _integral(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _positive(value):
    return (
        isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value) and value > 0
    )


def _shown(value):
    return repr(int(value)) if _integral(value) else repr(value)


def _first_invalid(checks):
    """The first `(name, value)` whose check fails, in the order they are made."""
    for name, value, valid in checks:
        if not valid:
            return name, value
    return None


def _expect(call, owner, invalid):
    """Runs `call`; asserts it fails naming `owner` and `invalid`, or succeeds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if invalid is None:
            return call()
        with pytest.raises((ValueError, TypeError)) as error:
            call()
    name, value = invalid
    message = str(error.value)
    assert message.startswith(owner), message
    assert f"{name}={_shown(value)}" in message, message


def _rank_checks(rank, preheat_rank, lora_alpha, variant):
    return [
        ("variant", variant, variant in hrp_settings.VARIANTS),
        ("rank", rank, _integral(rank) and rank >= 1),
        ("preheat_rank", preheat_rank, preheat_rank is None or _integral(preheat_rank)),
        ("preheat_rank", preheat_rank,
         preheat_rank is None or not _integral(preheat_rank) or not _integral(rank)
         or preheat_rank > rank),
        ("lora_alpha", lora_alpha, lora_alpha is None or _positive(lora_alpha)),
    ]


VARIANT = st.sampled_from(["classic", "asymmetric", "sym", 3])
OPTIONAL = st.one_of(st.none(), ANYTHING)


@PROPERTY
@given(
    units=st.sampled_from([16, np.int64(16), 0, 2.5, "8"]), rank=ANYTHING,
    preheat_rank=OPTIONAL, lora_alpha=OPTIONAL, variant=VARIANT,
)
def test_hrp_dense_arguments(units, rank, preheat_rank, lora_alpha, variant):
    if rank is None:
        return  # without rank HRPDense is a plain Dense
    checks = [("units", units, _integral(units) and units >= 1)]
    invalid = _first_invalid(checks + _rank_checks(rank, preheat_rank, lora_alpha, variant))
    layer = _expect(
        lambda: keras_hrp.HRPDense(
            units, rank=rank, preheat_rank=preheat_rank, lora_alpha=lora_alpha, variant=variant
        ),
        "HRPDense", invalid,
    )
    if layer is not None:
        assert layer.hrp_state.rank == int(rank) and type(layer.hrp_state.rank) is int
        layer.build((None, 16))
        assert layer.lora_rank == int(preheat_rank if preheat_rank is not None else rank)


def _tiny():
    inputs = keras.Input((16,))
    h = keras.layers.Dense(16, name="query")(inputs)
    return keras.Model(inputs, keras.layers.Dense(16, name="value")(h), name="tiny")


TARGETS = st.sampled_from([None, "query", ["query", "value"], "que(", ["value", 3], [], "nothing"])


@PROPERTY
@given(rank=ANYTHING, preheat_rank=OPTIONAL, lora_alpha=OPTIONAL, variant=VARIANT, targets=TARGETS)
def test_enable_hrp_arguments(rank, preheat_rank, lora_alpha, variant, targets):
    plain = preheat_rank is None  # plain LoRA: rank up to the layer's 16
    checks = _rank_checks(rank, preheat_rank, lora_alpha, variant) + [
        ("target_layer_names", targets, targets in (None, "query", ["query", "value"])),
        ("rank", rank, not _integral(rank) or rank < 16 or (plain and rank == 16)),
    ]
    model = _tiny()
    layers = _expect(
        lambda: keras_hrp.enable_hrp(
            model, rank, preheat_rank, target_layer_names=targets,
            lora_alpha=lora_alpha, variant=variant,
        ),
        "enable_hrp", _first_invalid(checks),
    )
    if layers is not None:
        assert all(layer.hrp_state.rank == int(rank) for layer in layers)
        expected = int(rank) if plain else min(int(preheat_rank), 16)
        assert all(layer.lora_rank == expected for layer in layers)
        assert all(layer.hrp_state.phase == ("main" if plain else "preheat") for layer in layers)


@PROPERTY
@given(
    preheat_steps=ANYTHING, restore_weights=st.sampled_from([True, False, np.bool_(True), "no", 0]),
    init=st.sampled_from(["directions", "truncated_delta", "delta"]),
    warmup_steps=ANYTHING, verbose=st.sampled_from([0, 1, np.int64(2), -1, "loud"]),
)
def test_hrp_callback_arguments(preheat_steps, restore_weights, init, warmup_steps, verbose):
    checks = [
        ("preheat_steps", preheat_steps, preheat_steps is None or _integral(preheat_steps) and preheat_steps >= 1),
        ("init", init, init in hrp_settings.SWITCH_INITS),
        ("warmup_steps", warmup_steps, _integral(warmup_steps) and warmup_steps >= 0),
        ("restore_weights", restore_weights, isinstance(restore_weights, (bool, np.bool_))),
        ("verbose", verbose, _integral(verbose) and verbose >= 0),
    ]
    callback = _expect(
        lambda: keras_hrp.HRPCallback(
            preheat_steps, restore_weights=restore_weights, init=init,
            warmup_steps=warmup_steps, verbose=verbose,
        ),
        "HRPCallback", _first_invalid(checks),
    )
    if callback is not None:
        expected = None if preheat_steps is None else int(preheat_steps)  # None: a tenth of the fit
        assert callback.preheat_steps == expected and callback.restore_weights in (True, False)


@PROPERTY
@given(
    init=st.sampled_from(["directions", "truncated_delta", None]),
    warmup_steps=ANYTHING, snapshot=st.sampled_from(["none", "snapshot", "dict"]),
)
def test_switch_to_main_arguments(init, warmup_steps, snapshot):
    model = hrp_mlp()
    model.compile("adam", "mse")
    given_snapshot = {"none": None, "snapshot": keras_hrp.WeightSnapshot(model), "dict": {}}[snapshot]
    checks = [
        ("snapshot", given_snapshot, snapshot != "dict"),
        ("init", init, init is not None),
        ("warmup_steps", warmup_steps, _integral(warmup_steps) and warmup_steps >= 0),
    ]
    report = _expect(
        lambda: keras_hrp.switch_to_main(model, given_snapshot, init=init, warmup_steps=warmup_steps),
        "switch_to_main", _first_invalid(checks),
    )
    if report is not None:
        assert sorted(report) == ["hrp_1", "hrp_2"]


@PROPERTY
@given(
    method=st.sampled_from(["keras", "pissa", "olora", "hrp", None]),
    svd=st.sampled_from(["auto", "full", "randomized", "exact", 1]),
    model_kind=st.sampled_from(["model", "layers", "string"]),
)
def test_initialize_lora_arguments(method, svd, model_kind):
    model = _tiny()
    for layer in model.layers[1:]:
        layer.enable_lora(2)
    given_model = {"model": model, "layers": model.layers[1:], "string": "model"}[model_kind]
    checks = [
        ("method", method, method in ("keras", "pissa", "olora")),
        ("svd", svd, svd in ("auto", "full", "randomized")),
        ("model_or_layers", given_model, model_kind != "string"),
    ]
    paths = _expect(
        lambda: keras_hrp.initialize_lora(given_model, method, svd=svd),
        "initialize_lora", _first_invalid(checks),
    )
    if paths is not None:
        assert sorted(paths) == ["query", "value"]


@PROPERTY
@given(path=st.sampled_from(["file", "pathlike", "", None, 3, ["a"]]))
def test_adapter_file_paths(path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    model = _tiny()
    keras_hrp.enable_hrp(model, 2, 4, target_layer_names=["query"])
    given_path = {"file": str(folder / "a"), "pathlike": folder / "a.npz"}.get(str(path), path)
    invalid = None if path in ("file", "pathlike") else ("path", given_path)
    _expect(lambda: keras_hrp.save_adapters(model, given_path), "save_adapters", invalid)
    _expect(lambda: keras_hrp.load_adapters(model, given_path), "load_adapters", invalid)
    if invalid is None:
        assert os.path.isfile(os.fspath(given_path))  # exactly the path given


def test_numpy_integers_are_python_integers():
    layer = keras_hrp.HRPDense(8, rank=np.int64(2), preheat_rank=np.int32(4), lora_alpha=np.float32(4))
    assert layer.rank == 2 and type(layer.rank) is int and layer.lora_scale == 2.0
    callback = keras_hrp.HRPCallback(np.int64(5), warmup_steps=np.int64(2), restore_weights=np.bool_(False))
    assert callback.preheat_steps == 5 and callback.warmup_steps == 2 and callback.restore_weights is False
    layers = keras_hrp.enable_hrp(_tiny(), np.int64(2), np.int64(4), target_layer_names="query")
    assert [layer.path for layer in layers] == ["query"] and layers[0].lora_rank == 4


def test_a_name_is_not_split_into_characters():
    layers = keras_hrp.enable_hrp(_tiny(), 2, 4, target_layer_names="query")
    assert [layer.name for layer in layers] == ["query"]
    with pytest.raises(ValueError, match="enable_hrp: `target_layer_names` matches no .*target_layer_names='quer'$"):
        keras_hrp.enable_hrp(_tiny(), 2, 4, target_layer_names="quer")


def test_invalid_regular_expression():
    with pytest.raises(ValueError, match="enable_hrp: `target_layer_names` holds an invalid regular expression.*target_layer_names='que\\('"):
        keras_hrp.enable_hrp(_tiny(), 2, 4, target_layer_names=["query", "que("])


def _rank_takers():
    """Every public function taking a rank, called on a 6 x 5 weight."""
    from keras_hrp import initializers as inits
    from keras_hrp import linalg

    rng = np.random.default_rng(0)
    w, a, b = (rng.normal(size=shape).astype("float32") for shape in ((6, 5), (6, 4), (4, 5)))
    return {
        "svd_of_product": (lambda r: keras_hrp.svd_of_product(a, b, rank=r)[1], 4),
        "truncated_svd": (lambda r: linalg.truncated_svd(w, r)[1], 5),
        "randomized_svd": (lambda r: linalg.randomized_svd(w, r, seed=0)[1], 5),
        "pissa": (lambda r: inits.pissa(w, r)[1][:, 0], 5),
        "milora": (lambda r: inits.milora(w, r)[1][:, 0], 5),
        "olora": (lambda r: inits.olora(w, r)[1][:, 0], 5),
        "gaussian": (lambda r: inits.gaussian(w, r, seed=0)[1][:, 0], 5),
        "lora_ga": (lambda r: inits.lora_ga(w, w, r)[1][:, 0], 2),
        "oracle": (lambda r: inits.oracle(w, w, r, 1.0)[1][:, 0], 5),
        "eva": (lambda r: inits.eva(w.T @ w, r)[0], 5),
    }


@PROPERTY
@given(name=st.sampled_from(sorted(_rank_takers())), rank=ANYTHING)
def test_every_rank_argument_takes_numpy_integers(name, rank):
    call, maximum = _rank_takers()[name]
    default = rank is None and name == "svd_of_product"  # None: every triplet
    valid = default or (_integral(rank) and 1 <= rank <= maximum)
    result = _expect(lambda: call(rank), name, None if valid else ("rank", rank))
    if valid:
        assert tuple(result.shape) == (maximum if default else int(rank),)


@PROPERTY
@given(warmup_steps=ANYTHING)
def test_linear_warmup_steps(warmup_steps):
    valid = _integral(warmup_steps) and warmup_steps >= 1
    schedule = _expect(lambda: keras_hrp.schedules.LinearWarmup(1e-2, warmup_steps), "LinearWarmup",
                       None if valid else ("warmup_steps", warmup_steps))
    if valid:
        assert type(schedule.warmup_steps) is int
        np.testing.assert_allclose(float(schedule(0)), 1e-2 / int(warmup_steps), rtol=1e-6)
