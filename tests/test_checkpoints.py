"""Checkpoint / resume: exact, in a new process, at every point of the run."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_hrp
from keras_hrp import internals
from tests import resume_worker
from tests.helpers import BACKEND
from tests.helpers import numpy_of
from tests.helpers import weights_by_path

pytest.importorskip("keras_hub", reason="needs the [hub] extra (keras-hub)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDERS = ("hrp_first", "backup_first")
# (name, preheat steps, interrupted after step): 4 steps an epoch, backups at
# epoch ends. "preheat": last backup mid-preheat; "switch": the switch is the
# last step of epoch 2, backed up right after it; "main": backup after it.
POINTS = (("preheat", 6, 5), ("switch", 8, 9), ("main", 6, 14))


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
    references = {p: resume_worker.run({**common, "preheat": p}) for p in (6, 8)}
    for reference in references.values():
        assert reference["switch_step"] is not None and not reference["fallbacks"]
        for path, value in frozen.items():
            np.testing.assert_array_equal(reference["weights"][path], value)
    specs, expected = [], []
    for name, preheat, step in POINTS:
        for order in ORDERS:
            spec = {
                **common, "preheat": preheat, "order": order,
                "backup_dir": os.path.join(tmp_path, f"{name}-{order}"),
                "out": os.path.join(tmp_path, f"{name}-{order}.npz"),
            }
            assert resume_worker.run({**spec, "interrupt_at": step}) is None
            assert os.path.exists(os.path.join(spec["backup_dir"], "latest.weights.h5.hrp.npz"))
            specs.append(spec)
            expected.append(references[preheat])
    for spec, resumed, reference in zip(specs, _in_new_process(specs, tmp_path), expected):
        _assert_same_run(resumed, reference, frozen)
        states = resumed["states"].values()
        assert all(s["phase"] == "main" and s["preheat_updates"] == spec["preheat"] for s in states)
        # the preheat resumed in the new process switches there, after exactly P updates
        if spec["backup_dir"].endswith(("preheat-hrp_first", "preheat-backup_first")):
            assert resumed["switch_step"] == spec["preheat"]


def test_model_checkpoint_weights_reload_and_continue(tmp_path):
    base, frozen = _pretrained("hub", tmp_path)
    pattern = os.path.join(tmp_path, "ckpt-{epoch}.weights.h5")
    reference = resume_worker.run({"kind": "hub", "base": base, "preheat": 6, "checkpoint": pattern})
    specs = [
        {"kind": "hub", "base": base, "preheat": 6, "load": pattern.format(epoch=epoch),
         "initial_epoch": epoch, "out": os.path.join(tmp_path, f"from-{epoch}.npz")}
        for epoch in (1, 3)  # saved in the preheat, and after the switch
    ]
    for resumed in _in_new_process(specs, tmp_path):
        _assert_same_run(resumed, reference, frozen)


def _switched_hub_model(tmp_path):
    base, frozen = _pretrained("hub", tmp_path)
    model, x, y = resume_worker.set_up("hub", base)
    keras.Model.fit(model, x, y, batch_size=16, epochs=2, verbose=0,
                    callbacks=[keras_hrp.HRPCallback(3, verbose=0)])
    return model, x, frozen


def test_files_still_load_in_stock_keras_and_keras_hub(tmp_path):
    model, x, _ = _switched_hub_model(tmp_path)
    keras_path = os.path.join(tmp_path, "m.keras")
    weights_path = os.path.join(tmp_path, "m.weights.h5")
    model.save(keras_path)
    model.save_weights(weights_path)
    assert os.path.exists(keras_path + ".hrp.npz") and os.path.exists(weights_path + ".hrp.npz")
    np.savez(os.path.join(tmp_path, "x.npz"), **x)
    np.save(os.path.join(tmp_path, "expected.npy"), model.predict(x, verbose=0))
    script = textwrap.dedent(f"""
        import sys
        import keras, keras_hub, numpy as np
        x = dict(np.load({os.path.join(tmp_path, "x.npz")!r}))
        expected = np.load({os.path.join(tmp_path, "expected.npy")!r})
        stock = keras.saving.load_model({keras_path!r})
        np.testing.assert_allclose(stock.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-5)
        fresh = keras.saving.load_model({keras_path!r})
        fresh.load_weights({weights_path!r})
        np.testing.assert_allclose(fresh.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-5)
        assert "keras_hrp" not in sys.modules
        print("stock ok")
    """)
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "stock ok" in done.stdout, done.stderr[-3000:]


def test_load_model_restores_lora_state_and_freezing(tmp_path):
    model, x, frozen = _switched_hub_model(tmp_path)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    stock = keras.saving.load_model(path)  # what KerasHub gives back alone
    assert not keras_hrp.hrp_layers(stock) and stock.backbone.trainable_weights
    restored = keras_hrp.load_model(path)
    layers = keras_hrp.hrp_layers(restored)
    assert sorted(layer.path for layer in layers) == sorted(l.path for l in keras_hrp.hrp_layers(model))
    assert all(layer.hrp_state.phase == "main" and layer.lora_rank == 2 for layer in layers)
    for layer in layers:  # frozen base exact, adapters exact
        np.testing.assert_array_equal(numpy_of(internals.base_weight(layer)), frozen[internals.base_weight(layer).path])
    trainable = sorted(v.path for v in restored.trainable_variables)
    assert trainable == sorted(v.path for v in model.trainable_variables)
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    # KerasHub tasks compile outside load_model; then load_weights brings the optimizer state.
    restored.compile(optimizer=keras.optimizers.Adam(3e-3), loss=model.loss)
    restored.load_weights(path)
    assert int(numpy_of(restored.optimizer.iterations)) == int(numpy_of(model.optimizer.iterations))


def test_stale_state_file_is_refused(tmp_path):
    model, x, _ = _switched_hub_model(tmp_path)
    path = os.path.join(tmp_path, "m.weights.h5")
    model.save_weights(path)
    stale = os.path.join(tmp_path, "stale.npz")
    os.replace(path + ".hrp.npz", stale)
    keras.Model.fit(model, x, x["token_ids"][:, 0] % 2, batch_size=16, epochs=1, verbose=0)
    model.save_weights(path)
    os.replace(stale, path + ".hrp.npz")  # a state file from the earlier save
    with pytest.raises(ValueError, match="load_weights of model .*another save than the Keras file"):
        model.load_weights(path)


def test_other_base_in_memory_is_recovered_with_a_warning(tmp_path):
    model, x, frozen = _switched_hub_model(tmp_path)
    path = os.path.join(tmp_path, "m.weights.h5")
    model.save_weights(path)
    expected = model.predict(x, verbose=0)
    for layer in keras_hrp.hrp_layers(model):  # not the pretrained weights any more
        base = internals.base_weight(layer)
        base.assign(numpy_of(base) + 0.5)
    with pytest.warns(UserWarning, match="frozen weight is not the one this checkpoint was trained from"):
        model.load_weights(path)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-5)
    for layer in keras_hrp.hrp_layers(model):
        np.testing.assert_allclose(numpy_of(internals.base_weight(layer)), frozen[internals.base_weight(layer).path], atol=1e-6)


def test_damaged_state_file(tmp_path):
    model, _, _ = _switched_hub_model(tmp_path)
    path = os.path.join(tmp_path, "m.weights.h5")
    model.save_weights(path)
    with open(path + ".hrp.npz", "r+b") as stream:
        stream.truncate(100)
    with pytest.raises(ValueError, match="load_weights of model .*not a readable keras-hrp checkpoint file.*m.weights.h5.hrp.npz"):
        model.load_weights(path)
