import os

import keras
import numpy as np
import pytest

import keras_hrp
from tests.helpers import BACKEND
from tests.helpers import JIT_MODES
from tests.helpers import hrp_mlp
from tests.helpers import numpy_of
from tests.helpers import regression_data


class _Probe(keras.callbacks.Callback):
    """Records predictions and optimizer steps right after the switch."""

    def __init__(self, hrp, x):
        super().__init__()
        self.hrp, self.x, self.after_switch, self.switch_batch = hrp, x, None, None

    def on_train_batch_end(self, batch, logs=None):
        if self.hrp.report is not None and self.after_switch is None:
            self.after_switch = self.model.predict(self.x, verbose=0)


def _fit_with_hrp(jit_compile=False, steps_per_execution=1, preheat_steps=5, epochs=3, **kwargs):
    x, y = regression_data()
    model = hrp_mlp(**kwargs)
    model.compile(
        keras.optimizers.Adam(0.01), "mse",
        jit_compile=jit_compile, steps_per_execution=steps_per_execution,
    )
    before = model.predict(x, verbose=0)
    hrp = keras_hrp.HRPCallback(preheat_steps, verbose=0)
    probe = _Probe(hrp, x)
    history = model.fit(x, y, batch_size=32, epochs=epochs, callbacks=[hrp, probe], verbose=0)
    return model, hrp, probe, before, history


@pytest.mark.parametrize("jit_compile", JIT_MODES + ["auto"])
def test_fit_preheats_switches_and_trains_on(jit_compile):
    model, hrp, probe, before, history = _fit_with_hrp(jit_compile)
    np.testing.assert_allclose(probe.after_switch, before, rtol=1e-6, atol=1e-6)
    assert set(hrp.report) == {l.path for l in keras_hrp.hrp_layers(model)}
    for layer in keras_hrp.hrp_layers(model):
        assert layer.hrp_phase == "main" and layer.lora_rank == 4
        assert np.abs(numpy_of(layer.lora_kernel_b)).max() > 0  # trained after
    # 3 epochs of 8 steps; the fresh optimizer counts the 24 - 5 main steps.
    assert int(numpy_of(model.optimizer.iterations)) == 19
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.skipif(BACKEND == "torch", reason="torch has no steps_per_execution > 1")
@pytest.mark.parametrize("jit_compile", JIT_MODES)
def test_steps_per_execution_switches_at_first_batch_end_after_preheat(jit_compile):
    model, hrp, probe, before, _ = _fit_with_hrp(jit_compile, steps_per_execution=3)
    # batch ends come after steps 3, 6, ...: the switch is at step 6.
    assert hrp.switch_step == 6 and int(numpy_of(model.optimizer.iterations)) == 24 - 6
    np.testing.assert_allclose(probe.after_switch, before, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile is the torch backend's jit")
def test_torch_compile_fit():
    model, hrp, probe, before, history = _fit_with_hrp(True, epochs=2)
    np.testing.assert_allclose(probe.after_switch, before, rtol=1e-5, atol=1e-5)
    assert int(numpy_of(model.optimizer.iterations)) == 11


def test_run_eagerly():
    x, y = regression_data(n=64)
    model = hrp_mlp()
    model.compile("adam", "mse", run_eagerly=True)
    hrp = keras_hrp.HRPCallback(2, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[hrp], verbose=0)
    assert hrp.report is not None and int(numpy_of(model.optimizer.iterations)) == 2


def test_verbose_prints_one_line_per_switch(capsys):
    x, y = regression_data(n=64)
    model = hrp_mlp()
    model.compile("adam", "mse")
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[keras_hrp.HRPCallback(2)], verbose=0)
    lines = [l for l in capsys.readouterr().out.splitlines() if "HRPCallback" in l]
    assert len(lines) == 1
    assert "switched 2 layers (rank 12->4) at step 2 in " in lines[0] and " s;" in lines[0]


def test_second_fit_on_switched_model_warns_and_changes_nothing():
    x, y = regression_data(n=64)
    model = hrp_mlp()
    model.compile("adam", "mse")
    hrp = keras_hrp.HRPCallback(2, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[hrp], verbose=0)
    report = hrp.report
    with pytest.warns(UserWarning, match="already in its main phase"):
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[hrp], verbose=0)
    assert hrp.report is report
    assert all(layer.lora_rank == 4 for layer in keras_hrp.hrp_layers(model))
    assert int(numpy_of(model.optimizer.iterations)) == 2 + 4


def test_fit_ending_before_preheat_warns_and_next_fit_goes_on():
    x, y = regression_data(n=64)
    model = hrp_mlp()
    model.compile("adam", "mse")
    before = model.predict(x, verbose=0)
    hrp = keras_hrp.HRPCallback(6, verbose=0)
    with pytest.warns(UserWarning, match="fit ended after 4 preheat updates; the preheat needs 6 \\(preheat_steps\\)"):
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[hrp], verbose=0)
    probe = _Probe(hrp, x)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[hrp, probe], verbose=0)
    assert hrp.switch_step == 6 and hrp.report is not None
    np.testing.assert_allclose(probe.after_switch, before, rtol=1e-6, atol=1e-6)


def test_options_reach_the_switch():
    x, y = regression_data()
    model = hrp_mlp()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    hrp = keras_hrp.HRPCallback(
        5, restore_weights=False, init="truncated_delta", warmup_steps=8, verbose=0
    )
    seen = {}

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if hrp.report is not None and "lr" not in seen:
                seen["lr"] = float(numpy_of(self.model.optimizer.learning_rate))
                seen["b"] = numpy_of(self.model.get_layer("hrp_1").lora_kernel_b)

    model.fit(x, y, batch_size=32, epochs=1, callbacks=[hrp, Spy()], verbose=0)
    assert seen["lr"] == pytest.approx(0.00125)  # step 0 of 8 after the switch
    assert np.abs(seen["b"]).max() > 0  # B kept from the preheated delta
    # 8 steps in all: 3 after the switch, so the next rate is 4/8 of 0.01.
    assert float(numpy_of(model.optimizer.learning_rate)) == pytest.approx(0.005)


def test_errors():
    with pytest.raises(ValueError, match="HRPCallback.*preheat_steps=0"):
        keras_hrp.HRPCallback(0)
    with pytest.raises(ValueError, match="HRPCallback.*init='delta'"):
        keras_hrp.HRPCallback(3, init="delta")
    with pytest.raises(ValueError, match="HRPCallback.*warmup_steps=1.5"):
        keras_hrp.HRPCallback(3, warmup_steps=1.5)
    with pytest.raises(ValueError, match="preheat_steps=2.5"):
        keras_hrp.HRPCallback(2.5)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")], name="plain")
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="'plain' has no HRP-managed layer.*layers=\\['d'\\]"):
        model.fit(np.ones((4, 4)), np.ones((4, 2)), callbacks=[keras_hrp.HRPCallback(1)], verbose=0)


def test_saved_after_switch_predicts_identically_and_keeps_training(tmp_path):
    x, y = regression_data()
    model, *_ = _fit_with_hrp()
    path = os.path.join(tmp_path, "hrp.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
    layer = loaded.get_layer("hrp_1")
    assert layer.hrp_phase == "main" and tuple(layer.lora_kernel_a.shape) == (32, 4)
    np.testing.assert_array_equal(
        numpy_of(layer.lora_kernel_b), numpy_of(model.get_layer("hrp_1").lora_kernel_b)
    )
    b0 = numpy_of(layer.lora_kernel_b)
    loaded.fit(x, y, epochs=1, verbose=0)
    assert not np.allclose(numpy_of(layer.lora_kernel_b), b0)


def test_restore_weights_false_keeps_preheated_head():
    x, y = regression_data()
    model = hrp_mlp()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    head0 = numpy_of(model.get_layer("head").kernel)
    heads = {}

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 4:
                heads["after"] = numpy_of(self.model.get_layer("head").kernel)

    hrp = keras_hrp.HRPCallback(5, restore_weights=False, verbose=0)
    model.fit(x, y, batch_size=32, epochs=1, callbacks=[hrp, Spy()], verbose=0)
    assert not np.allclose(heads["after"], head0)


def test_unbuilt_model():
    x, y = regression_data(n=64)

    def fit(restore_weights):
        model = keras.Sequential([keras_hrp.HRPDense(8, rank=2, preheat_rank=4), keras.layers.Dense(16)])
        model.compile("adam", "mse")
        hrp = keras_hrp.HRPCallback(2, restore_weights=restore_weights, verbose=0)
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[hrp], verbose=0)
        return model

    assert fit(restore_weights=False).layers[0].lora_rank == 2
    if BACKEND == "tensorflow":  # builds inside the first step, after on_train_begin
        with pytest.raises(ValueError, match="not built when fit starts.*unbuilt_layers=\\['hrp_dense"):
            fit(restore_weights=True)
    else:  # JAX and torch build before on_train_begin
        assert fit(restore_weights=True).layers[0].lora_rank == 2


def _iterations(model):
    return int(numpy_of(model.optimizer.iterations))


@pytest.mark.skipif(BACKEND == "torch", reason="torch has no steps_per_execution > 1")
def test_steps_per_execution_with_a_short_last_chunk_counts_updates():
    # 4 batches an epoch, 3 steps an execution: chunks of 3 and 1 steps.
    x, y = regression_data(n=64)
    model = hrp_mlp()
    model.compile(keras.optimizers.Adam(0.01), "mse", steps_per_execution=3)
    hrp = keras_hrp.HRPCallback(5, verbose=0)
    model.fit(x, y, batch_size=16, epochs=3, callbacks=[hrp], verbose=0)
    # updates at chunk ends: 3, 4 | 7, 8 | 11, 12; the first end at >= 5 is 7.
    assert hrp.switch_step == 7 and _iterations(model) == 12 - 7
    states = [layer.hrp_state for layer in keras_hrp.hrp_layers(model)]
    assert all(s.preheat_updates == 7 and s.phase == "main" for s in states)


def test_gradient_accumulation_counts_optimizer_updates():
    x, y = regression_data(n=64)
    model = hrp_mlp()
    model.compile(keras.optimizers.Adam(0.01, gradient_accumulation_steps=2), "mse")
    hrp = keras_hrp.HRPCallback(3, verbose=0)
    model.fit(x, y, batch_size=16, epochs=3, callbacks=[hrp], verbose=0)
    # 12 batches = 6 updates; the switch after the 3rd (batch 6).
    assert hrp.switch_step == 3 and _iterations(model) == 3


def test_multi_epoch_preheat_from_an_initial_epoch():
    x, y = regression_data(n=64)
    model = hrp_mlp()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    hrp = keras_hrp.HRPCallback(6, verbose=0)
    model.fit(x, y, batch_size=16, epochs=5, initial_epoch=2, callbacks=[hrp], verbose=0)
    assert hrp.switch_step == 6 and _iterations(model) == 12 - 6


class _Score(keras.callbacks.Callback):
    """Logs a score that is best in epoch 0 (a preheat epoch), worse after."""

    def on_epoch_end(self, epoch, logs=None):
        logs["score"] = 0.0 if epoch == 0 else float(epoch)


def test_early_stopping_and_checkpoints_only_compare_main_epochs(tmp_path):
    x, y = regression_data(n=64)
    model = hrp_mlp()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    early = keras.callbacks.EarlyStopping("score", mode="min", patience=5, restore_best_weights=True)
    path = os.path.join(tmp_path, "best.weights.h5")
    best = keras.callbacks.ModelCheckpoint(
        path, "score", mode="min", save_best_only=True, save_weights_only=True
    )
    plateau = keras.callbacks.ReduceLROnPlateau("score", mode="min", patience=1, factor=0.5)
    hrp = keras_hrp.HRPCallback(6, verbose=0)  # preheat: epoch 0 and part of epoch 1
    model.fit(x, y, batch_size=16, epochs=4, verbose=0,
              callbacks=[_Score(), early, best, plateau, hrp])
    assert hrp.switch_step == 6
    assert early.best_epoch == 1  # epoch 0 was a preheat epoch: forgotten at the switch
    assert all(layer.lora_rank == 4 for layer in keras_hrp.hrp_layers(model))
    fresh = hrp_mlp()
    fresh.load_weights(path)  # the best checkpoint is a main-phase one (epoch 1)
    assert all(l.hrp_state.phase == "main" and l.lora_rank == 4 for l in keras_hrp.hrp_layers(fresh))
    np.testing.assert_allclose(fresh.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
