import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_hrp
from keras_hrp import internals
from keras_hrp import lora
from tests.adapter_writer import probe_tokens
from tests.adapter_writer import tiny_model
from tests.helpers import BACKEND
from tests.helpers import logits_loss
from tests.helpers import numpy_of

TARGETS = ["query", "value", "ffn", "embed"]
OTHERS = [b for b in ("tensorflow", "jax", "torch") if b != BACKEND]


def _trained(tmp_path):
    model = tiny_model()
    base = os.path.join(tmp_path, "base.weights.h5")
    model.save_weights(base)
    keras_hrp.enable_hrp(model, rank=2, preheat_rank=6, target_layer_names=TARGETS, rank_allocation="uniform")
    x = np.random.default_rng(0).integers(0, 100, size=(64, 12)).astype("int32")
    model.compile(keras.optimizers.Adam(3e-3), logits_loss())
    model.fit(x, x[:, 0] % 3, batch_size=16, epochs=2, verbose=0,
              callbacks=[keras_hrp.HRPCallback(2, verbose=0)])
    return model, base


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One switched model, its base weights and its adapter file, shared read-only."""
    folder = tmp_path_factory.mktemp("trained")
    model, base = _trained(folder)
    path = os.path.join(folder, "adapters.npz")
    keras_hrp.save_adapters(model, path)
    return {"model": model, "base": base, "file": path, "outputs": model.predict(probe_tokens(), verbose=0)}


def _copy_of(source, target):
    with open(source, "rb") as stream, open(target, "wb") as out:
        out.write(stream.read())
    return target


def test_round_trip_into_a_fresh_model(trained):
    model = trained["model"]
    fresh = tiny_model()
    fresh.load_weights(trained["base"])
    keras_hrp.load_adapters(fresh, trained["file"])
    tokens = probe_tokens()
    np.testing.assert_allclose(fresh.predict(tokens, verbose=0), model.predict(tokens, verbose=0), rtol=1e-5, atol=1e-6)
    query = fresh.get_layer("mha").query_dense
    assert query.lora_enabled and query.lora_rank == 2
    np.testing.assert_array_equal(numpy_of(query.bias), numpy_of(model.get_layer("mha").query_dense.bias))


@pytest.mark.parametrize("other", OTHERS)
def test_file_from_another_backend_gives_the_same_outputs(tmp_path, other):
    env = {**os.environ, "KERAS_BACKEND": other, "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [sys.executable, "-m", "tests.adapter_writer", str(tmp_path)],
        check=True, cwd=root, env=env, capture_output=True,
    )
    model = tiny_model()
    model.load_weights(os.path.join(tmp_path, "base.weights.h5"))
    keras_hrp.load_adapters(model, os.path.join(tmp_path, "adapters.npz"))
    expected = np.load(os.path.join(tmp_path, "outputs.npy"))
    np.testing.assert_allclose(model.predict(probe_tokens(), verbose=0), expected, rtol=1e-4, atol=1e-5)


def test_mismatch_lists_everything_and_changes_nothing(trained):
    path = trained["file"]
    other = tiny_model()
    other.get_layer("ffn").enable_lora(3)
    other.get_layer("head").enable_lora(1)
    before = [numpy_of(w) for w in other.weights]
    with pytest.raises(ValueError) as error:
        keras_hrp.load_adapters(other, path)
    message = str(error.value)
    assert "2 mismatches" in message
    assert "ffn: file rank 2, layer rank 3" in message
    assert "head: LoRA layer of the model missing from the file" in message
    assert "mha/query" not in message  # fits: it gets LoRA at load
    after = [numpy_of(w) for w in other.weights]
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(before, after))
    assert not other.get_layer("mha").query_dense.lora_enabled


def test_shape_mismatch(trained):
    path = trained["file"]
    tokens = keras.Input((12,), dtype="int32")
    h = keras.layers.Embedding(100, 16, name="embed")(tokens)
    wrong = keras.Model(tokens, keras.layers.Dense(32, name="ffn")(h))
    with pytest.raises(ValueError, match=r"embed: saved A\(100, 2\) B\(2, 32\), layer needs A\(100, 2\) B\(2, 16\)"):
        keras_hrp.load_adapters(wrong, path)


def test_revive_after_keras_load_model(trained, tmp_path):
    path = os.path.join(tmp_path, "m.keras")
    trained["model"].save(path)
    loaded = keras.saving.load_model(path)
    layers = keras_hrp.adapters.lora_layers(loaded)
    assert all(not np.any(numpy_of(lora.lora_factors(l)[0])) for l in layers.values())  # Keras zeroes them
    tokens = probe_tokens()
    before = loaded.predict(tokens, verbose=0)
    revived = keras_hrp.revive_adapters(loaded)
    assert sorted(revived) == sorted(layers)
    np.testing.assert_allclose(loaded.predict(tokens, verbose=0), before, rtol=1e-6)
    assert all(np.abs(numpy_of(lora.lora_factors(l)[0])).max() > 0 for l in layers.values())
    loaded.compile(keras.optimizers.Adam(3e-3), logits_loss())
    loaded.fit(tokens, tokens[:, 0] % 3, verbose=0, epochs=2)
    assert np.abs(numpy_of(lora.lora_factors(layers["ffn"])[1])).max() > 0


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="save_adapters: model 'tiny' has no LoRA layer"):
        keras_hrp.save_adapters(tiny_model(), os.path.join(tmp_path, "x.npz"))
    np.savez(os.path.join(tmp_path, "other.npz"), x=np.ones(3))
    with pytest.raises(ValueError, match="load_adapters: not a readable keras-hrp adapters file"):
        keras_hrp.load_adapters(tiny_model(), os.path.join(tmp_path, "other.npz"))


def test_same_path_for_save_and_load_and_no_extension_added(trained, tmp_path):
    path = os.path.join(tmp_path, "adapters")  # no extension
    keras_hrp.save_adapters(trained["model"], path)
    assert os.listdir(tmp_path) == ["adapters"]
    fresh = tiny_model()
    fresh.load_weights(trained["base"])
    keras_hrp.load_adapters(fresh, path)
    np.testing.assert_allclose(fresh.predict(probe_tokens(), verbose=0), trained["outputs"], rtol=1e-5, atol=1e-6)


def test_an_interrupted_save_leaves_the_old_file(trained, tmp_path, monkeypatch):
    path = _copy_of(trained["file"], os.path.join(tmp_path, "a.npz"))
    before = open(path, "rb").read()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        keras_hrp.save_adapters(trained["model"], path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["a.npz"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign", "missing", "newer"])
def test_damaged_files_name_load_adapters_and_the_path(trained, tmp_path, damage):
    path = _copy_of(trained["file"], os.path.join(tmp_path, "a.npz"))
    data = open(path, "rb").read()
    if damage == "truncated":
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "garbage":
        open(path, "wb").write(b"\x00" * 100)
    elif damage == "foreign":
        np.savez(path, weights=np.ones(3))
    elif damage == "missing":
        os.remove(path)
    else:
        keras_hrp.files.write(path, "adapters", 99, {"layers": []}, {})
    error = FileNotFoundError if damage == "missing" else ValueError
    with pytest.raises(error, match=f"load_adapters: .*Received: path='{path}'"):
        keras_hrp.load_adapters(tiny_model(), path)


def test_load_into_a_preheating_model_adopts_the_rank_and_main_phase(trained):
    fresh = tiny_model()
    fresh.load_weights(trained["base"])
    keras_hrp.enable_hrp(fresh, rank=2, preheat_rank=6, target_layer_names=TARGETS)
    fresh.compile(keras.optimizers.Adam(3e-3), logits_loss())
    keras_hrp.load_adapters(fresh, trained["file"])
    states = {layer.path: layer.hrp_state for layer in keras_hrp.hrp_layers(trained["model"])}
    for layer in keras_hrp.hrp_layers(fresh):
        assert layer.lora_rank == 2 and layer.hrp_state == states[layer.path]
        assert layer.hrp_state.phase == "main"
    np.testing.assert_allclose(fresh.predict(probe_tokens(), verbose=0), trained["outputs"], rtol=1e-5, atol=1e-6)
    x = np.random.default_rng(0).integers(0, 100, size=(32, 12)).astype("int32")
    with pytest.warns(UserWarning, match="already in its main phase"):
        fresh.fit(x, x[:, 0] % 3, batch_size=16, epochs=1, verbose=0,
                  callbacks=[keras_hrp.HRPCallback(2, verbose=0)])
    assert all(layer.lora_rank == 2 for layer in keras_hrp.hrp_layers(fresh))


def test_files_record_the_factorization(tmp_path):
    model = tiny_model()
    keras_hrp.enable_hrp(model, rank=2, target_layer_names=["query"], factorization="full")
    path = str(tmp_path / "full.npz")
    keras_hrp.save_adapters(model, path)
    per_head = tiny_model()
    keras_hrp.enable_hrp(per_head, rank=2, target_layer_names=["query"])
    with pytest.raises(ValueError, match="mha/query: saved with factorization 'full', the layer uses 'per_head'"):
        keras_hrp.load_adapters(per_head, path)
    fresh = tiny_model()
    keras_hrp.load_adapters(fresh, path)
    query = fresh.get_layer("mha").query_dense
    assert query.hrp_state.factorization == "full" and tuple(query.lora_kernel_a.shape) == (32, 2)


def _trained_classifier(seed):
    """A tiny BertTextClassifier fine-tuned with HRP: its new head trains."""
    from tests.helpers import bert_classifier

    keras.utils.set_random_seed(seed)
    model, x, y, loss = bert_classifier(dropout=0.0)
    return model, x, y, loss


def test_trained_head_and_freezing_travel_with_the_adapters(tmp_path):
    pytest.importorskip("keras_hub", reason="needs the [hub] extra (keras-hub)")
    model, x, y, loss = _trained_classifier(0)
    base = os.path.join(tmp_path, "base.weights.h5")
    model.save_weights(base)
    keras_hrp.enable_hrp(model, rank=2, preheat_rank=6)
    model.compile(keras.optimizers.Adam(1e-2), loss=loss)
    keras.Model.fit(model, x, y, batch_size=16, epochs=2, verbose=0, callbacks=[keras_hrp.HRPCallback(2, verbose=0)])
    path = os.path.join(tmp_path, "classifier.npz")
    keras_hrp.save_adapters(model, path)
    fresh, *_ = _trained_classifier(1)  # another random head
    fresh.load_weights(base)
    head = fresh.get_layer("logits")
    assert not np.allclose(numpy_of(head.kernel), numpy_of(model.get_layer("logits").kernel))
    keras_hrp.load_adapters(fresh, path)
    np.testing.assert_allclose(fresh.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert sorted(v.path for v in fresh.trainable_variables) == sorted(v.path for v in model.trainable_variables)
    assert not fresh.backbone.get_layer("token_embedding").trainable_weights  # the backbone frozen again
    # A model without the head: one error naming each weight that has no place.
    backbone = keras.models.clone_model(fresh.backbone)
    with pytest.raises(ValueError, match=r"(?s)2 mismatches.*logits/kernel: trained weight with no place.*logits/bias"):
        keras_hrp.load_adapters(backbone, path)
    assert not keras_hrp.adapters.lora_layers(backbone)  # nothing changed


def _sequential(units=16):
    return keras.Sequential([
        keras.Input((16,)),
        keras_hrp.HRPDense(units, rank=2, preheat_rank=8, activation="relu"),
        keras.layers.Dense(4),
    ])


def test_auto_named_models_load_by_position(tmp_path):
    """A second identical Sequential gets other auto names (`sequential_1/
    hrp_dense_1`), as does `keras.saving.load_model`'s: files still fit."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 16)).astype("float32"), rng.integers(0, 4, 32)
    model = _sequential()
    model.compile(keras.optimizers.Adam(1e-2), logits_loss())
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[keras_hrp.HRPCallback(2, verbose=0)])
    path = os.path.join(tmp_path, "seq.npz")
    keras_hrp.save_adapters(model, path)
    twin = _sequential()
    assert twin.layers[0].path != model.layers[0].path
    keras_hrp.load_adapters(twin, path)
    for layer, source in zip(twin.layers, model.layers):  # the frozen kernel is the caller's
        if isinstance(layer, keras_hrp.HRPDense):
            internals.base_weight(layer).assign(numpy_of(internals.base_weight(source)))
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert twin.layers[0].hrp_state.phase == "main" and twin.layers[0].lora_rank == 2
    # Where the position holds nothing that fits, the error names both sides.
    other = keras.Sequential([keras.Input((16,)), keras.layers.Dense(4)])
    saved = re.escape(model.layers[0].path)
    with pytest.raises(ValueError, match=rf"(?s)load_adapters: .* does not fit model '{other.name}'.*"
                                         rf"{saved}: no such layer in the model .*position 'hrp_dense'"):
        keras_hrp.load_adapters(other, path)
