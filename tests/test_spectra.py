"""The preheated spectra as a PNG and as TensorBoard scalars."""

import glob
import os

import keras
import numpy as np
import pytest

import keras_hrp
from keras_hrp import spectra
from keras_hrp.switch import LayerSwitch
from keras_hrp.switch import SwitchReport
from tests import helpers


def _switched(callbacks=()):
    x, y = helpers.regression_data()
    model = helpers.hrp_mlp(rank=4, preheat_rank=12)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    hrp = keras_hrp.HRPCallback(6, verbose=0)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[hrp, *callbacks])
    return hrp


def test_normalized_spectra_divide_by_the_largest_and_skip_fallbacks():
    report = SwitchReport(
        ok=LayerSwitch(np.array([4.0, 2.0, 1.0]), 0.95, 3, 1),
        failed=LayerSwitch(np.array([np.nan, 1.0]), np.nan, 2, 1, fallback="SVD failed"),
    )
    out = spectra.normalized_spectra(report)
    np.testing.assert_allclose(out["ok"], [1.0, 0.5, 0.25])
    assert out["failed"] is None


def test_report_plot_writes_a_png(tmp_path):
    hrp = _switched()
    assert sorted(hrp.report) == ["hrp_1", "hrp_2"]
    assert all(item.singular_values.shape == (12,) for item in hrp.report.values())
    path = hrp.report.plot(os.path.join(tmp_path, "plots", "spectra.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000


def test_tensorboard_in_the_same_fit_gets_the_spectra(tmp_path):
    tf = pytest.importorskip("tensorflow", reason="Keras' TensorBoard callback writes with tf.summary")
    hrp = _switched([keras.callbacks.TensorBoard(log_dir=str(tmp_path))])
    scalars = {}
    for path in glob.glob(os.path.join(tmp_path, "hrp", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    for layer, item in hrp.report.items():
        (step, energy), = scalars[f"hrp/energy_kept/{layer}"]
        assert step == hrp.switch_step == 6
        np.testing.assert_allclose(energy, item.energy, rtol=1e-6)
        spectrum = sorted(scalars[f"hrp/spectrum/{layer}"])
        assert [s for s, _ in spectrum] == list(range(1, 13))
        np.testing.assert_allclose([v for _, v in spectrum], item.singular_values / item.singular_values[0],
                                   rtol=1e-5)
