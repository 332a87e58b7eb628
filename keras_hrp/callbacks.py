"""`HRPCallback`: High-Rank Preheating inside one ordinary `model.fit`."""

import os
import warnings

import keras

from keras_hrp import checkpoints
from keras_hrp import internals
from keras_hrp import settings
from keras_hrp import spectra
from keras_hrp.auto_preheat import SubspaceTracker
from keras_hrp.state import hrp_layers
from keras_hrp.state import run_state
from keras_hrp.switch import WeightSnapshot
from keras_hrp.switch import switch_to_main


class HRPCallback(keras.callbacks.Callback):
    """Preheats HRP layers, switches them to their main rank, trains on.

    The callback counts optimizer updates (`optimizer.iterations`: one per
    `steps_per_execution` step, one per `gradient_accumulation_steps`
    batches, across epochs, fits and resumed runs) and at the first batch
    end after `preheat_steps` of them (by default a tenth of the updates
    the `fit` plans; with `"auto"`, once the preheat is stable, see below)
    calls `keras_hrp.switch_to_main` on
    `self.model`: each HRP layer's new `A` is
    taken from the top singular directions of its preheated delta, `B = 0`,
    the adapter shrinks to its main rank, every other weight returns to its
    value before preheating (`restore_weights=True`), and the optimizer and
    compiled functions are rebuilt. Training goes on in the same `fit`.

    Long runs: the preheat's progress, the phases and the roll-back
    snapshot live on the model and travel with its checkpoints
    (`BackupAndRestore`, `ModelCheckpoint`, in any order of the callbacks;
    see `keras_hrp.checkpoints`). At the switch, `EarlyStopping` and
    `ReduceLROnPlateau` of the same `fit` start afresh and a
    `ModelCheckpoint`'s best value returns to its value before the preheat:
    "best" means best since the switch, since the roll back makes preheat
    epochs incomparable with main ones. With a `keras.callbacks.TensorBoard`
    in the same `fit`, the switch writes each layer's preheated spectrum and
    energy kept under its `log_dir`, in `hrp/` (`keras_hrp.spectra`).

    The defaults are the paper's reading: the preheat is only a probe, a
    tenth of the run long. They were chosen from the benchmarks
    (`benchmarks/results/defaults.md`). `init`, `restore_weights` and
    `warmup_steps` let the main phase keep more of what the preheat learned
    (see the ablations in benchmarks/README.md).

    `preheat_steps="auto"`: every `check_every` updates the
    callback takes each preheating layer's top-`rank` left singular
    directions of its delta (the directions the switch keeps) and switches
    once every layer's subspace moved less than `stable_degrees` (largest
    principal angle) since the previous check, or after
    `max_preheat_steps` updates. `report.reason` says which; `report.checks`
    lists each check's step and largest angle. The last check's directions
    travel with keras-hrp's checkpoint state files, so a resumed run makes
    the same checks as an uninterrupted one.

    Args:
        preheat_steps: number of optimizer updates at the preheating rank,
            or `"auto"`. `None` (the default): a tenth of the updates the
            `fit` plans (epochs x steps per epoch), at least 1; 100, with a
            warning, when the `fit` does not know its length.
        max_preheat_steps: `"auto"`'s limit (updates). `None`: a tenth of
            the updates the `fit` plans (epochs x steps per epoch), at
            least `check_every` and 2; 100, with a warning, when the `fit` does not know
            its length.
        check_every: `"auto"`'s updates between two checks. `None`: 10,
            or a fifth of `max_preheat_steps` where that is under 50, so
            even a short run's preheat gets five checks.
        stable_degrees: `"auto"`'s threshold (degrees, in `(0, 90)`).
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
            the delta's energy the kept directions capture;
            `report.plot("spectra.png")` draws them.
        switch_step: the preheat updates done when the switch came
            (`None` before it).

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((64,)),
    ...     keras_hrp.HRPDense(64, rank=4, preheat_rank=32),
    ... ])
    >>> model.compile("adam", "mse")
    >>> x, y = np.ones((64, 64)), np.zeros((64, 64))
    >>> _ = model.fit(x, y, epochs=5, callbacks=[keras_hrp.HRPCallback(verbose=0)], verbose=0)
    >>> model.layers[0].hrp_phase
    'main'
    """

    def __init__(
        self,
        preheat_steps=None,
        restore_weights=True,
        init="directions",
        warmup_steps=0,
        verbose=1,
        max_preheat_steps=None,
        check_every=None,
        stable_degrees=10.0,
    ):
        super().__init__()
        owner = "HRPCallback"
        self.auto = isinstance(preheat_steps, str)
        if self.auto and preheat_steps != "auto":
            settings.fail(owner, "`preheat_steps` must be a positive integer, 'auto' or None",
                          preheat_steps=preheat_steps)
        self.preheat_steps = None if self.auto else settings.integer(
            owner, "preheat_steps", preheat_steps, minimum=1, optional=True)
        self.max_preheat_steps = settings.integer(
            owner, "max_preheat_steps", max_preheat_steps, minimum=1, optional=True)
        self.check_every = settings.integer(owner, "check_every", check_every, minimum=1, optional=True)
        self.stable_degrees = settings.positive_number(owner, "stable_degrees", stable_degrees)
        if self.stable_degrees >= 90:
            settings.fail(owner, "`stable_degrees` must be below 90", stable_degrees=stable_degrees)
        self._every = self.check_every or 10
        self._next_check = self._every
        self.init, self.warmup_steps, self.restore_weights = settings.check_switch_settings(
            owner, init, warmup_steps, restore_weights
        )
        self.verbose = settings.integer(owner, "verbose", verbose, minimum=0)
        self.report = None
        self.switch_step = None
        self._siblings = []
        self._checkpoint_best = {}
        self._started = False
        self._active = False
        self._begin = 0
        self._unchecked = 0

    def set_model(self, model):
        super().set_model(model)
        checkpoints.attach(model)
        self._siblings = internals.sibling_callbacks(self)

    def on_train_begin(self, logs=None):
        model = self.model
        self._started = self._active = False
        if getattr(model, "optimizer", None) is not None:
            internals.update_each_dtype_apart(model.optimizer)
        if not hrp_layers(model):
            settings.fail(
                "HRPCallback",
                f"model '{model.name}' has no HRP-managed layer "
                "(e.g. HRPDense with `rank` and `preheat_rank`, or enable_hrp)",
                layers=[layer.name for layer in model.layers],
            )
        unbuilt = [layer.name for layer in hrp_layers(model) if not layer.built]
        if unbuilt and self.restore_weights:  # TensorFlow builds these inside step 1
            settings.fail(
                "HRPCallback",
                f"model '{model.name}' is not built when fit starts, so its weights "
                "before preheating cannot be recorded. Build it first (keras.Input, "
                "model.build(shape) or one call on data), or pass restore_weights=False",
                unbuilt_layers=unbuilt,
            )

    def on_train_batch_begin(self, batch, logs=None):
        if not self._started:
            self._start()
        self._begin = batch

    def _start(self):
        """Runs once per fit, after every callback's `on_train_begin`.

        A `BackupAndRestore` may have restored the model by then, in either
        order of the callbacks: the phases, the preheat's progress and the
        snapshot are read from the model, not kept here.
        """
        self._started = True
        model = self.model  # syncs the JAX state
        if not hrp_layers(model, phase="preheat"):
            warnings.warn(
                f"HRPCallback: model '{model.name}' is already in its main phase (switched "
                "earlier, or loaded from a file written after the switch); the callback "
                "does nothing in this fit.",
                stacklevel=2,
            )
            return
        run = run_state(model)
        done = run.count_updates(model)
        if self.auto and (done == 0 or run.tracker is None):
            run.tracker = SubspaceTracker()
        if self.restore_weights and run.snapshot is None:
            if done == 0:
                run.snapshot = WeightSnapshot(model)
            else:
                warnings.warn(
                    f"HRPCallback: the preheat of model '{model.name}' began ({done} updates) "
                    "without a roll-back snapshot, so the switch cannot restore the other "
                    "weights; they stay as trained.",
                    stacklevel=2,
                )
        self._checkpoint_best = {
            id(cb): cb.best for cb in self._siblings
            if isinstance(cb, keras.callbacks.ModelCheckpoint)
        }
        optimizer = getattr(model, "optimizer", None)
        self._accumulation = getattr(optimizer, "gradient_accumulation_steps", None) or 1
        if self.auto:
            self._limit = self.max_preheat_steps or self._tenth_of_fit(max(self.check_every or 2, 2))
        else:
            self._limit = self.preheat_steps or self._tenth_of_fit(1)
        self._every = self.check_every or min(10, max(1, self._limit // 5))
        self._next_check = (done // self._every + 1) * self._every
        self._done = done
        self._unchecked = 0
        self._active = True

    def on_train_batch_end(self, batch, logs=None):
        if not self._active:
            return
        # `batch - begin + 1` steps ran (steps_per_execution); at most that
        # many optimizer updates. Count them exactly (a JAX state sync) only
        # once the bound reaches the preheat's length.
        self._unchecked += batch - self._begin + 1
        target = min(self._next_check, self._limit) if self.auto else self._limit
        if self._done + self._unchecked // self._accumulation + 1 < target:
            return
        model = self.model
        run = run_state(model)
        if not hrp_layers(model, phase="preheat"):  # switched by a load
            self._active = False
            return
        self._done, self._unchecked = run.count_updates(model), 0
        if self._done < target:
            return
        reason = self._reason(model)
        if reason is None:
            self._next_check = self._done + self._every
            return
        self.report = switch_to_main(
            model, run.snapshot, init=self.init, warmup_steps=self.warmup_steps
        )
        self.report.reason = reason
        self.report.checks = list(run.tracker.checks) if run.tracker is not None else []
        run.tracker = None
        self.switch_step = self._done
        run.snapshot = None
        self._active = False
        self._reset_monitors()
        self._write_tensorboard()
        if self.verbose:
            self._print_switch()

    def _write_tensorboard(self):
        for cb in self._siblings:
            if isinstance(cb, keras.callbacks.TensorBoard):
                log_dir = os.path.join(cb.log_dir, "hrp")
                try:
                    spectra.write_tensorboard(self.report, log_dir, step=self.switch_step)
                except Exception as error:  # a log must not end a run that switched
                    warnings.warn(f"HRPCallback: the spectra were not written to {log_dir}: {error!r}",
                                  stacklevel=2)

    def _tenth_of_fit(self, minimum):
        """A tenth of the updates this `fit` plans (at least `minimum`); 100,
        with a warning, when the `fit` does not know its length."""
        params = self.params or {}
        epochs, steps = params.get("epochs"), params.get("steps")
        if not epochs or not steps:
            name = "max_preheat_steps" if self.auto else "preheat_steps"
            warnings.warn(f"HRPCallback: the fit does not know its length (steps per epoch), so the "
                          f"preheat is capped at 100 updates; pass {name} to choose", stacklevel=3)
            return 100
        return max(minimum, epochs * steps // self._accumulation // 10)

    def _reason(self, model):
        """Why the preheat ends now, or `None` while `"auto"` goes on."""
        if not self.auto:
            return f"preheat_steps={self._limit}" + ("" if self.preheat_steps else " (a tenth of the fit)")
        tracker = run_state(model).tracker
        if self._done >= self._next_check and tracker.check(model, self._done, self.stable_degrees):
            previous, last = tracker.checks[-2:]
            return (f"stable: no top subspace moved {self.stable_degrees:g} degrees or more between "
                    f"updates {previous.step} and {last.step} (largest {last.angle:.1f})")
        if self._done < self._limit:
            return None
        angles = [check.angle for check in tracker.checks if check.angle is not None]
        if not angles:
            return (f"max_preheat_steps={self._limit} reached after {len(tracker.checks)} check(s), "
                    "too few to compare (stability needs two checks with directions); "
                    "pass a smaller check_every or a larger max_preheat_steps")
        return (f"max_preheat_steps={self._limit} reached before the subspaces were stable "
                f"(largest angle at the last comparison {angles[-1]:.1f} degrees, threshold "
                f"{self.stable_degrees:g})")

    def _reset_monitors(self):
        """Preheat epochs are not comparable with main ones: forget them."""
        for cb in self._siblings:
            if isinstance(cb, (keras.callbacks.EarlyStopping, keras.callbacks.ReduceLROnPlateau)):
                cb.on_train_begin()  # their public reset
            elif id(cb) in self._checkpoint_best:
                cb.best = self._checkpoint_best[id(cb)]

    def on_train_end(self, logs=None):
        if self._active:
            done = run_state(self.model).count_updates(self.model)
            if self.auto:
                needs = (f"up to {self._limit} (max_preheat_steps), or until the subspaces "
                         f"are stable")
            else:
                needs = f"{self._limit} (preheat_steps)"
            warnings.warn(
                f"HRPCallback: fit ended after {done} preheat updates; the preheat needs "
                f"{needs}, so the HRP layers are still at their preheating rank (a later fit "
                "with this callback goes on; a shorter preheat_steps switches in this one).",
                stacklevel=2,
            )

    def _print_switch(self):
        report = self.report
        to_ranks = {}
        for item in report.values():
            to_ranks.setdefault(item.from_rank, []).append(item.to_rank)
        ranks = [f"{start}->{min(ends)}" + (f"..{max(ends)}" if max(ends) > min(ends) else "")
                 for start, ends in sorted(to_ranks.items())]
        energies = [s.energy for s in report.values() if not s.fallback]
        energy = sum(energies) / len(energies) if energies else float("nan")
        print(
            f"\nHRPCallback: switched {len(report)} layers (rank {', '.join(ranks)}) "
            f"at step {self.switch_step} in {report.seconds:.3f} s; mean energy kept "
            f"{energy:.3f}; fallbacks: {len(report.fallbacks)}; {report.reason}",
            flush=True,
        )
