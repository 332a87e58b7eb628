"""Checkpoint / resume: exact, in a new process, at every point of the run."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest

import keras_hrp
from keras_hrp import internals
from tests import resume_worker
from tests.helpers import BACKEND
from tests.helpers import F16_ON_CPU
from tests.helpers import numpy_of
from tests.helpers import stock_mlp_with_hrp
from tests.helpers import weights_by_path

pytest.importorskip("keras_hub", reason="needs the [hub] extra (keras-hub)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (name, preheat steps, interrupted after step, callback orders): 4 steps an
# epoch, backups at epoch ends. "preheat": last backup mid-preheat; "switch":
# the switch is the last step of epoch 2, backed up right after it; "main":
# backup after it. Both orders where the restore meets a preheat in progress.
POINTS = (
    ("preheat", 6, 5, ("hrp_first", "backup_first")),
    ("switch", 8, 9, ("hrp_first",)),
    ("main", 6, 14, ("backup_first",)),
)
# HRPDense models: before the switch and after it (the rank changes there).
DENSE_POINTS = (("preheat", 6, 5, ("backup_first",)), ("main", 6, 14, ("hrp_first",)))


def _in_new_process(specs, tmp_path):
    path = os.path.join(tmp_path, "specs.json")
    with open(path, "w") as stream:
        json.dump(specs, stream)
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.resume_worker", path],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = []
    for spec in specs:
        with np.load(spec["out"]) as data:
            weights = {key: data[key] for key in data.files}
        with open(spec["out"] + ".json") as stream:
            results.append({"weights": weights, **json.load(stream)})
    return results


def _pretrained(kind, tmp_path):
    base = os.path.join(tmp_path, f"{kind}_base.weights.h5")
    resume_worker.base_weights(kind, base)
    model, *_ = resume_worker.set_up(kind, base)
    frozen = {
        internals.base_weight(layer).path: numpy_of(internals.base_weight(layer))
        for layer in keras_hrp.hrp_layers(model)
    }
    return base, frozen


def _assert_same_run(resumed, reference, frozen):
    assert sorted(resumed["weights"]) == sorted(reference["weights"])
    for path, value in reference["weights"].items():
        np.testing.assert_allclose(resumed["weights"][path], value, rtol=2e-5, atol=2e-6, err_msg=path)
    for path, value in frozen.items():  # the frozen base, bit for bit
        np.testing.assert_array_equal(resumed["weights"][path], value, err_msg=path)
    assert resumed["states"] == reference["states"] and not resumed["fallbacks"]


@pytest.mark.parametrize("kind", ["hub", "dense"])
def test_backup_and_restore_resumes_exactly_in_a_new_process(kind, tmp_path):
    base, frozen = _pretrained(kind, tmp_path)
    common = {"kind": kind, "base": base}
    pattern = os.path.join(tmp_path, "ckpt-{epoch}.weights.h5")
    hub = kind == "hub"
    references = {6: resume_worker.run({**common, "preheat": 6, "checkpoint": pattern})}
    if hub:
        references[8] = resume_worker.run({**common, "preheat": 8})
    for reference in references.values():
        assert reference["switch_step"] is not None and not reference["fallbacks"]
        for path, value in frozen.items():
            np.testing.assert_array_equal(reference["weights"][path], value)
    specs, expected = [], []
    for name, preheat, step, orders in POINTS if hub else DENSE_POINTS:
        for order in orders:
            spec = {
                **common, "preheat": preheat, "order": order,
                "backup_dir": os.path.join(tmp_path, f"{name}-{order}"),
                "out": os.path.join(tmp_path, f"{name}-{order}.npz"),
            }
            assert resume_worker.run({**spec, "interrupt_at": step}) is None
            assert os.path.exists(os.path.join(spec["backup_dir"], "latest.weights.h5.hrp.npz"))
            specs.append(spec)
            expected.append(references[preheat])
    for epoch in (1, 3) if hub else ():  # ModelCheckpoint + reload: in the preheat, after the switch
        specs.append({
            **common, "preheat": 6, "load": pattern.format(epoch=epoch), "initial_epoch": epoch,
            "out": os.path.join(tmp_path, f"from-{epoch}.npz"),
        })
        expected.append(references[6])
    for spec, resumed, reference in zip(specs, _in_new_process(specs, tmp_path), expected):
        _assert_same_run(resumed, reference, frozen)
        states = resumed["states"].values()
        assert all(s["phase"] == "main" and s["preheat_updates"] == spec["preheat"] for s in states)
        if "preheat-" in spec["out"] or spec["out"].endswith("from-1.npz"):
            # the preheat resumed in the new process switches there, after exactly P updates
            assert resumed["switch_step"] == spec["preheat"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A switched hub model's files: weights, .keras, and a later save."""
    folder = tmp_path_factory.mktemp("saved")
    base, frozen = _pretrained("hub", folder)
    model, x, y = resume_worker.set_up("hub", base)
    keras.Model.fit(model, x, y, batch_size=16, epochs=2, verbose=0,
                    callbacks=[keras_hrp.HRPCallback(3, verbose=0)])
    files = {name: os.path.join(folder, name) for name in ("m.weights.h5", "m.keras", "later.weights.h5")}
    model.save_weights(files["m.weights.h5"])
    model.save(files["m.keras"])
    saved = {
        "base": base, "frozen": frozen, "x": x, "files": files, "folder": folder,
        "expected": model.predict(x, verbose=0),
        "iterations": int(numpy_of(model.optimizer.iterations)),
        "paths": sorted(layer.path for layer in keras_hrp.hrp_layers(model)),
        "ranks": {layer.path: layer.lora_rank for layer in keras_hrp.hrp_layers(model)},
        "trainable": sorted(v.path for v in model.trainable_variables),
    }
    keras.Model.fit(model, x, y, batch_size=16, epochs=1, verbose=0)
    model.save_weights(files["later.weights.h5"])
    return saved


def _set_up(saved):
    model, *_ = resume_worker.set_up("hub", saved["base"])
    return model


def _frozen_of(model):
    return {
        internals.base_weight(layer).path: numpy_of(internals.base_weight(layer))
        for layer in keras_hrp.hrp_layers(model)
    }


def _copy(source, target):
    with open(source, "rb") as stream, open(target, "wb") as out:
        out.write(stream.read())


def _loads_in_stock_keras(folder, keras_file, weights_file, x, expected):
    """Loads the files in a new process that never imports keras-hrp and
    compares its predictions with `expected`."""
    np.savez(os.path.join(folder, "x.npz"), **x)
    np.save(os.path.join(folder, "expected.npy"), expected)
    script = textwrap.dedent(f"""
        import sys
        import keras, keras_hub, numpy as np
        x = dict(np.load({os.path.join(folder, "x.npz")!r}))
        expected = np.load({os.path.join(folder, "expected.npy")!r})
        stock = keras.saving.load_model({keras_file!r})
        np.testing.assert_allclose(stock.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-5)
        fresh = keras.saving.load_model({keras_file!r})
        fresh.load_weights({weights_file!r})
        np.testing.assert_allclose(fresh.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-5)
        assert "keras_hrp" not in sys.modules
        print("stock ok")
    """)
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "stock ok" in done.stdout, done.stderr[-3000:]


def test_files_still_load_in_stock_keras_and_keras_hub(saved):
    files = saved["files"]
    assert all(os.path.exists(files[name] + ".hrp.npz") for name in ("m.keras", "m.weights.h5"))
    _loads_in_stock_keras(saved["folder"], files["m.keras"], files["m.weights.h5"], saved["x"], saved["expected"])


def test_full_factorization_files_load_in_stock_keras_and_back(tmp_path):
    from tests.helpers import bert_classifier

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model, x, y, loss = bert_classifier(dropout=0.0)
    keras_hrp.enable_hrp(model, rank=2, preheat_rank=12, factorization="full", rank_allocation="uniform")
    model.compile(keras.optimizers.Adam(3e-3), loss=loss)
    keras.Model.fit(model, x, y, batch_size=16, epochs=1, verbose=0, callbacks=[keras_hrp.HRPCallback(2, verbose=0)])
    expected = model.predict(x, verbose=0)
    keras_file, weights_file = str(tmp_path / "m.keras"), str(tmp_path / "m.weights.h5")
    model.save(keras_file)
    model.save_weights(weights_file)
    _loads_in_stock_keras(str(tmp_path), keras_file, weights_file, x, expected)
    restored = keras_hrp.load_model(keras_file)
    layers = keras_hrp.hrp_layers(restored)
    assert layers and all(layer.hrp_state.factorization == "full" and layer.lora_rank == 2 for layer in layers)
    assert all(tuple(layer.lora_kernel_a.shape) == (16, 2) for layer in layers)  # hidden 16 -> r
    np.testing.assert_allclose(restored.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)


def test_load_model_restores_lora_state_and_freezing(saved):
    path = saved["files"]["m.keras"]
    stock = keras.saving.load_model(path)  # what KerasHub gives back alone
    assert not keras_hrp.hrp_layers(stock) and stock.backbone.trainable_weights
    restored = keras_hrp.load_model(path)
    layers = keras_hrp.hrp_layers(restored)
    assert sorted(layer.path for layer in layers) == saved["paths"]
    assert all(layer.hrp_state.phase == "main" for layer in layers)
    assert {layer.path: layer.lora_rank for layer in layers} == saved["ranks"]  # as the switch chose them
    for path_, value in _frozen_of(restored).items():  # the frozen base, exactly
        np.testing.assert_array_equal(value, saved["frozen"][path_])
    assert sorted(v.path for v in restored.trainable_variables) == saved["trainable"]
    np.testing.assert_allclose(restored.predict(saved["x"], verbose=0), saved["expected"], rtol=1e-5, atol=1e-6)
    # KerasHub tasks compile outside load_model; then load_weights brings the optimizer state.
    restored.compile(optimizer=keras.optimizers.Adam(3e-3),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    restored.load_weights(path)
    assert int(numpy_of(restored.optimizer.iterations)) == saved["iterations"]


def test_stale_state_file_is_refused(saved, tmp_path):
    path = os.path.join(tmp_path, "m.weights.h5")
    _copy(saved["files"]["later.weights.h5"], path)
    _copy(saved["files"]["m.weights.h5"] + ".hrp.npz", path + ".hrp.npz")  # from the earlier save
    model = _set_up(saved)
    with pytest.raises(ValueError, match="load_weights of model .*'.*m.weights.h5.hrp.npz' was not written "
                                         "with '.*m.weights.h5'.*keras.saving.save_model"):
        model.load_weights(path)
    for path_, value in _frozen_of(model).items():  # the frozen base survives the refused load
        np.testing.assert_array_equal(value, saved["frozen"][path_])


def test_other_base_in_memory_is_recovered_with_a_warning(saved):
    model = _set_up(saved)
    for layer in keras_hrp.hrp_layers(model):  # not the pretrained weights
        base = internals.base_weight(layer)
        base.assign(numpy_of(base) + 0.5)
    with pytest.warns(UserWarning, match="frozen weight is not the one this checkpoint was trained from"):
        model.load_weights(saved["files"]["m.weights.h5"])
    np.testing.assert_allclose(model.predict(saved["x"], verbose=0), saved["expected"], rtol=1e-4, atol=1e-5)
    for path_, value in _frozen_of(model).items():
        np.testing.assert_allclose(value, saved["frozen"][path_], atol=1e-6)


def test_damaged_state_file(saved, tmp_path):
    path = os.path.join(tmp_path, "m.weights.h5")
    _copy(saved["files"]["m.weights.h5"], path)
    _copy(saved["files"]["m.weights.h5"] + ".hrp.npz", path + ".hrp.npz")
    with open(path + ".hrp.npz", "r+b") as stream:
        stream.truncate(100)
    with pytest.raises(ValueError, match="load_weights of model .*not a readable keras-hrp checkpoint file.*m.weights.h5.hrp.npz"):
        _set_up(saved).load_weights(path)


def test_auto_rank_resumes_in_a_new_process(tmp_path):
    """`rank="auto"`: interrupted in the preheat, the resumed run spends the
    budget on the same ranks; interrupted after the switch, the checkpoint
    rebuilds the unequal ranks it chose."""
    base, frozen = _pretrained("hub", tmp_path)
    common = {"kind": "hub", "base": base, "preheat": 6, "mean_rank": 2.5}
    reference = resume_worker.run(common)
    ranks = sorted(s["rank"] for s in reference["states"].values())
    assert reference["switch_step"] == 6 and len(set(ranks)) > 1 and sum(ranks) == int(2.5 * len(ranks)), ranks
    specs = []
    for name, step, order in (("preheat", 5, "backup_first"), ("main", 14, "hrp_first")):
        spec = {**common, "order": order, "backup_dir": os.path.join(tmp_path, name),
                "out": os.path.join(tmp_path, f"{name}.npz")}
        assert resume_worker.run({**spec, "interrupt_at": step}) is None
        specs.append(spec)
    preheat, main = _in_new_process(specs, tmp_path)
    for resumed in (preheat, main):
        _assert_same_run(resumed, reference, frozen)
    assert preheat["switch_step"] == 6 and main["switch_step"] is None


def test_the_default_preheat_length_resumes_in_a_new_process(tmp_path):
    """`HRPCallback()`'s default, a tenth of the fit's planned updates (20
    here: 2), is the same in the resumed fit, so it does not preheat again."""
    base, frozen = _pretrained("hub", tmp_path)
    common = {"kind": "hub", "base": base, "preheat": None}
    reference = resume_worker.run(common)
    assert reference["switch_step"] == 2 and not reference["fallbacks"]
    spec = {**common, "order": "hrp_first", "backup_dir": os.path.join(tmp_path, "backup"),
            "out": os.path.join(tmp_path, "main.npz")}
    assert resume_worker.run({**spec, "interrupt_at": 14}) is None
    (resumed,) = _in_new_process([spec], tmp_path)
    _assert_same_run(resumed, reference, frozen)
    assert resumed["switch_step"] is None


def test_auto_preheat_resumes_its_checks_in_a_new_process(tmp_path):
    """The subspace tracker travels with the state file: the first check after
    the resume compares with the last one before the interruption."""
    base, frozen = _pretrained("dense", tmp_path)
    auto = {"check_every": 2, "max_preheat_steps": 12, "stable_degrees": 1e-6}  # never stable: every check
    common = {"kind": "dense", "base": base, "preheat": "auto", "auto": auto}
    reference = resume_worker.run(common)
    assert reference["switch_step"] == 12 and [c[0] for c in reference["checks"]] == [2, 4, 6, 8, 10, 12]
    assert reference["checks"][0][1] is None and all(c[1] is not None for c in reference["checks"][1:])
    spec = {**common, "order": "backup_first", "backup_dir": os.path.join(tmp_path, "backup"),
            "out": os.path.join(tmp_path, "auto.npz")}
    assert resume_worker.run({**spec, "interrupt_at": 7}) is None  # backed up after step 4
    [resumed] = _in_new_process([spec], tmp_path)
    _assert_same_run(resumed, reference, frozen)
    assert resumed["switch_step"] == 12
    np.testing.assert_allclose(np.array([c[1] for c in resumed["checks"][1:]]),
                               np.array([c[1] for c in reference["checks"][1:]]), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("policy, rate", [
    ("mixed_bfloat16", "schedule"),
    ("mixed_bfloat16", "float"),
    pytest.param("mixed_float16", "float", marks=pytest.mark.skipif(
        not F16_ON_CPU, reason="XLA's CPU dot has no float16 inputs with float32 accumulation")),
])
def test_mixed_precision_with_warmup_resumes_exactly(policy, rate, tmp_path):
    """GPU-style runs: Keras writes the merged kernels in the compute dtype,
    and the switch's warm-up lives only in the fresh optimizer; both must
    come back at each interruption point (a schedule and a float rate)."""
    base, frozen = _pretrained("hub", tmp_path)
    common = {"kind": "hub", "base": base, "policy": policy, "rate": rate, "warmup": 4}
    references = {preheat: resume_worker.run({**common, "preheat": preheat}) for preheat in (6, 8)}
    unwarmed = resume_worker.run({**common, "preheat": 6, "warmup": 0})
    differs = [path for path, value in unwarmed["weights"].items()
               if not np.allclose(value, references[6]["weights"][path], rtol=1e-3, atol=1e-5)]
    assert differs  # the warm-up changes the run: a resume without it would show
    specs, expected = [], []
    for name, preheat, step, orders in POINTS:
        spec = {**common, "preheat": preheat, "order": orders[0],
                "backup_dir": os.path.join(tmp_path, name), "out": os.path.join(tmp_path, f"{name}.npz")}
        assert resume_worker.run({**spec, "interrupt_at": step}) is None
        specs.append(spec)
        expected.append(references[preheat])
    for spec, resumed, reference in zip(specs, _in_new_process(specs, tmp_path), expected):
        _assert_same_run(resumed, reference, frozen)
        assert all(s["phase"] == "main" for s in resumed["states"].values())


def _quick_start_model():
    model = keras.Sequential([
        keras.Input((16,)),
        keras_hrp.HRPDense(16, rank=2, preheat_rank=8, activation="relu"),
        keras.layers.Dense(4),
    ])
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    return model


@pytest.mark.parametrize("stop", ["preheat", "main"])
def test_sequential_checkpoints_load_despite_auto_names(stop, tmp_path):
    """The Quick start's model: `keras_hrp.load_model` of its `.keras` file,
    and its weights files into a second identical model of the same process
    (other auto names), mid-preheat (snapshot and progress) and after the switch."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 16)).astype("float32"), rng.integers(0, 4, 32)
    model = _quick_start_model()
    hrp = keras_hrp.HRPCallback(3 if stop == "main" else 100, verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[hrp])
    expected = model.predict(x, verbose=0)
    keras_file, weights_file = str(tmp_path / "m.keras"), str(tmp_path / "m.weights.h5")
    model.save(keras_file)
    model.save_weights(weights_file)
    restored = keras_hrp.load_model(keras_file)
    assert restored.layers[0].path != model.layers[0].path
    np.testing.assert_allclose(restored.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    twin = _quick_start_model()
    keras_hrp.checkpoints.attach(twin)
    twin.load_weights(weights_file)
    np.testing.assert_allclose(twin.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    for copy in (restored, twin):
        layer = copy.layers[0]
        assert layer.hrp_state == model.layers[0].hrp_state and layer.lora_rank == model.layers[0].lora_rank
        assert int(numpy_of(copy.optimizer.iterations)) == int(numpy_of(model.optimizer.iterations))
    if stop == "preheat":  # the roll back of the twin returns to the original's start
        assert len(keras_hrp.state.run_state(twin).snapshot) == len(keras_hrp.state.run_state(model).snapshot)


def test_state_file_left_beside_a_stock_save_is_named(saved, tmp_path):
    path = os.path.join(tmp_path, "m.keras")
    _copy(saved["files"]["m.keras"], path)
    _copy(saved["files"]["m.keras"] + ".hrp.npz", path + ".hrp.npz")
    stock = keras.saving.load_model(path)
    keras.saving.save_model(stock, path)  # the function form writes the Keras file alone
    with pytest.raises(ValueError, match="'.*m.keras.hrp.npz' was not written with '.*m.keras'.*remove the state file"):
        keras_hrp.load_model(path)
    os.remove(path + ".hrp.npz")
    assert not keras_hrp.hrp_layers(keras_hrp.load_model(path))  # the Keras file alone loads


def test_weights_without_their_state_file_warn_when_the_frozen_weights_change(saved, tmp_path):
    path = os.path.join(tmp_path, "m.weights.h5")
    _copy(saved["files"]["m.weights.h5"], path)  # trained adapters, merged by Keras; no state file
    model = _set_up(saved)  # freshly set up: preheat, no update yet
    with pytest.warns(UserWarning) as caught:
        model.load_weights(path)
    messages = [str(w.message) for w in caught if "state file" in str(w.message)]
    assert len(messages) == 1, messages  # one warning for the model, not one per layer
    assert f"changed the frozen weights of {len(saved['paths'])} HRP layer(s)" in messages[0]
    assert f"'{path}'" in messages[0] and "now include that adapter's delta" in messages[0]
    fresh = _set_up(saved)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_weights(saved["base"])  # the pretrained weights again: nothing changes
    assert not [w for w in caught if "state file" in str(w.message)]


_KILLED_SAVE = """
import os, sys
import numpy as np
from tests.helpers import stock_mlp_with_hrp
import keras_hrp

folder, kill_at = sys.argv[1], int(sys.argv[2])
model, x, y = stock_mlp_with_hrp()
hrp = keras_hrp.HRPCallback(3, verbose=0)
path = os.path.join(folder, "m.weights.h5")
model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[hrp])
model.save_weights(path)
np.save(os.path.join(folder, "old.npy"), model.predict(x, verbose=0))
model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[hrp])
np.save(os.path.join(folder, "new.npy"), model.predict(x, verbose=0))
calls, replace = [0], os.replace

def killed_replace(source, target):  # the process dies as `kill -9` would stop it
    calls[0] += 1
    if calls[0] == kill_at:
        os._exit(9)
    replace(source, target)
    if kill_at == 4 and calls[0] == 3:
        os._exit(9)

os.replace = killed_replace
model.save_weights(path)
print("renames", calls[0])
"""


@pytest.mark.parametrize("kill_at", [2, 3, 4])
def test_a_save_killed_midway_leaves_a_pair_that_loads(kill_at, tmp_path):
    """Killed before the new state file is in place (2), before the Keras
    file is (3), or before the old state file is removed (4)."""
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path), str(kill_at)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 9, done.stdout + done.stderr[-3000:]
    strays = [name for name in os.listdir(tmp_path) if name.startswith(".keras_hrp_")]
    assert strays or kill_at == 4
    model, x, _ = stock_mlp_with_hrp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(str(tmp_path / "m.weights.h5"))
    assert not [w for w in caught if "state file" in str(w.message)]
    expected = np.load(tmp_path / ("new.npy" if kill_at == 4 else "old.npy"))
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    model.save_weights(str(tmp_path / "next.weights.h5"))  # a later save in the folder cleans up
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".keras_hrp_")]
    left = {"m.weights.h5", "m.weights.h5.hrp.npz.prev", "next.weights.h5", "next.weights.h5.hrp.npz",
            "old.npy", "new.npy"} | ({"m.weights.h5.hrp.npz"} if kill_at != 2 else set())
    assert sorted(os.listdir(tmp_path)) == sorted(left)
