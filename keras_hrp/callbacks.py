"""`HRPCallback`: High-Rank Preheating inside one ordinary `model.fit`."""

import warnings

import keras

from keras_hrp.settings import check_switch_settings
from keras_hrp.switch import WeightSnapshot
from keras_hrp.switch import hrp_layers
from keras_hrp.switch import switch_to_main


class HRPCallback(keras.callbacks.Callback):
    """Preheats HRP layers, switches them to their main rank, trains on.

    The callback counts optimizer steps (`steps_per_execution` included) and
    at the first batch end at or after `preheat_steps` calls
    `keras_hrp.switch_to_main` on `self.model`: each HRP layer's new `A` is
    taken from the top singular directions of its preheated delta, `B = 0`,
    the adapter shrinks to its main rank, every other weight returns to its
    value before preheating (`restore_weights=True`), and the optimizer and
    compiled functions are rebuilt. Training goes on in the same `fit`.

    The defaults are the paper's reading: the preheat is only a probe.
    `init`, `restore_weights` and `warmup_steps` let the main phase keep
    more of what the preheat learned (see the README's ablation).

    Args:
        preheat_steps: number of optimizer steps at the preheating rank.
        restore_weights: roll back every other weight training changed
            (heads, biases, normalization statistics) at the switch, so the
            model's output right after it equals its output before
            preheating. `False` keeps them as the preheat trained them.
        init: `"directions"` (new `A` = the delta's top directions,
            norm-matched; `B = 0`) or `"truncated_delta"` (the adapter keeps
            the delta's best rank-`rank` approximation).
        warmup_steps: if positive, the learning rate ramps up linearly over
            this many steps after the switch.
        verbose: `1` prints one line per switch, `0` is silent.

    Attributes:
        report: the `SwitchReport` of the switch (`None` before it): per
            layer path, the preheated singular values and the fraction of
            the delta's energy the kept directions capture.
        switch_step: the optimizer step the switch came after (`None`
            before it).

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((64,)),
    ...     keras_hrp.HRPDense(64, rank=4, preheat_rank=32),
    ... ])
    >>> model.compile("adam", "mse")
    >>> model.fit(x, y, epochs=3, callbacks=[keras_hrp.HRPCallback(50)])
    """

    def __init__(
        self,
        preheat_steps,
        restore_weights=True,
        init="directions",
        warmup_steps=0,
        verbose=1,
    ):
        super().__init__()
        if isinstance(preheat_steps, bool) or not isinstance(preheat_steps, int) or preheat_steps < 1:
            raise ValueError(
                "HRPCallback: `preheat_steps` must be a positive integer. "
                f"Received: preheat_steps={preheat_steps!r}"
            )
        check_switch_settings("HRPCallback", init, warmup_steps)
        self.preheat_steps = preheat_steps
        self.restore_weights = restore_weights
        self.init = init
        self.warmup_steps = warmup_steps
        self.verbose = verbose
        self.report = None
        self.switch_step = None
        self._steps = 0
        self._epoch_offset = 0
        self._snapshot = None
        self._active = False

    def on_train_begin(self, logs=None):
        model = self.model
        if not hrp_layers(model, phase="preheat"):
            if hrp_layers(model):
                warnings.warn(
                    f"HRPCallback: model '{model.name}' is already switched to its "
                    "main rank; the callback does nothing in this fit.",
                    stacklevel=2,
                )
                self._active = False
                return
            raise ValueError(
                f"HRPCallback: model '{model.name}' has no HRP-managed layer "
                "(e.g. HRPDense with `rank` and `preheat_rank`). "
                f"Received: layers={[layer.name for layer in model.layers]}"
            )
        if self.restore_weights and self._snapshot is None:
            unbuilt = [layer.name for layer in hrp_layers(model) if not layer.built]
            if unbuilt:  # TensorFlow builds such models inside the first step
                raise ValueError(
                    f"HRPCallback: model '{model.name}' is not built when fit starts, "
                    "so its weights before preheating cannot be recorded. Build it "
                    "first (keras.Input, model.build(shape) or one call on data), or "
                    f"pass restore_weights=False. Received: unbuilt layers={unbuilt}"
                )
            self._snapshot = WeightSnapshot(model)
        self._active = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_offset = self._steps

    def on_train_batch_end(self, batch, logs=None):
        self._steps = self._epoch_offset + batch + 1
        if not self._active or self._steps < self.preheat_steps:
            return
        self.report = switch_to_main(
            self.model, self._snapshot, init=self.init, warmup_steps=self.warmup_steps
        )
        self.switch_step = self._steps
        self._snapshot = None
        self._active = False
        if self.verbose:
            self._print_switch()

    def on_train_end(self, logs=None):
        if self._active:
            warnings.warn(
                f"HRPCallback: fit ended after {self._steps} steps, before "
                f"preheat_steps={self.preheat_steps}; the HRP layers are still at "
                "their preheating rank (a later fit with this callback goes on).",
                stacklevel=2,
            )

    def _print_switch(self):
        report = self.report
        ranks = sorted({f"{s.from_rank}->{s.to_rank}" for s in report.values()})
        energies = [s.energy for s in report.values() if not s.fallback]
        energy = sum(energies) / len(energies) if energies else float("nan")
        print(
            f"\nHRPCallback: switched {len(report)} layers (rank {', '.join(ranks)}) "
            f"at step {self.switch_step} in {report.seconds:.3f} s; mean energy kept "
            f"{energy:.3f}; fallbacks: {len(report.fallbacks)}",
            flush=True,
        )
