"""Training runs that are interrupted and resumed, for the checkpoint tests.

The tests run the uninterrupted and the interrupted runs in their own
process and the resumed runs in a new one:

    KERAS_BACKEND=jax python -m tests.resume_worker SPECS.json

Each spec names a model kind, the preheat length, the callbacks' order, the
step to interrupt at and the folders to use; `run(spec)` returns the final
weights by path and the HRP layers' states.
"""

import json
import sys

import keras
import numpy as np

import keras_hrp
from keras_hrp import internals
from tests.helpers import bert_classifier
from tests.helpers import hrp_mlp
from tests.helpers import regression_data
from tests.helpers import weights_by_path

EPOCHS, BATCH = 5, 16  # 4 batches per epoch


class Interrupted(Exception):
    pass


class InterruptAt(keras.callbacks.Callback):
    """Raises after the given optimizer step, as a crash would stop a run."""

    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            raise Interrupted(f"interrupted after step {self.step}")


def set_up(kind, base_path, mean_rank=None, policy="float32", rate="float"):
    """A model set up the same way in every process: build, base weights, HRP
    (hub: `rank="auto"` at `mean_rank` times the rank-1 parameters, if given),
    under the dtype `policy`, compiled with a float learning `rate` or a
    `"schedule"`."""
    keras.backend.clear_session()  # the same layer paths in every process
    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy(policy)
    if kind == "hub":
        model, x, y, loss = bert_classifier(dropout=0.0)
    else:
        (x, y), model, loss = regression_data(n=64), hrp_mlp(rank=2, preheat_rank=8), "mse"
    model.load_weights(base_path)
    if kind == "hub" and mean_rank:
        per_rank = sum(sum(keras_hrp.lora.weight_matrix_shape(layer)) for layer in internals.all_layers(model)
                       if layer.name in ("query", "value"))
        keras_hrp.enable_hrp(model, rank="auto", preheat_rank=6, rank_budget=int(mean_rank * per_rank))
    elif kind == "hub":
        keras_hrp.enable_hrp(model, rank=2, preheat_rank=6)
    else:  # HRPDense models: attach before any load that should read the state file
        keras_hrp.checkpoints.attach(model)
    learning_rate = 3e-3 if rate == "float" else keras.optimizers.schedules.ExponentialDecay(3e-3, 4, 0.8)
    model.compile(keras.optimizers.Adam(learning_rate), loss=loss)
    return model, x, y


def base_weights(kind, path):
    """Writes the 'pretrained' weights every run starts from."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = bert_classifier(dropout=0.0)[0] if kind == "hub" else hrp_mlp(rank=2, preheat_rank=8)
    model.save_weights(path)


def run(spec):
    """One fit (or the rest of one): final weights and HRP states (the
    process's dtype policy is float32 again afterwards)."""
    try:
        return _run(spec)
    finally:
        keras.config.set_dtype_policy("float32")


def _run(spec):
    model, x, y = set_up(spec["kind"], spec["base"], spec.get("mean_rank"),
                         spec.get("policy", "float32"), spec.get("rate", "float"))
    hrp = keras_hrp.HRPCallback(spec["preheat"], verbose=0, warmup_steps=spec.get("warmup", 0),
                                **spec.get("auto", {}))
    callbacks = [hrp]
    if spec.get("backup_dir"):
        backup = keras.callbacks.BackupAndRestore(spec["backup_dir"])
        callbacks = [hrp, backup] if spec["order"] == "hrp_first" else [backup, hrp]
    if spec.get("checkpoint"):
        callbacks.append(
            keras.callbacks.ModelCheckpoint(spec["checkpoint"], save_weights_only=True)
        )
    if spec.get("load"):
        model.load_weights(spec["load"])
    if spec.get("interrupt_at"):
        callbacks.append(InterruptAt(spec["interrupt_at"]))
    try:
        keras.Model.fit(
            model, x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
            callbacks=callbacks, initial_epoch=spec.get("initial_epoch", 0),
        )
    except Interrupted:
        return None
    states = {
        layer.path: layer.hrp_state.to_dict() for layer in keras_hrp.hrp_layers(model)
    }
    fallbacks = sorted(hrp.report.fallbacks) if hrp.report is not None else []
    return {
        "weights": weights_by_path(model), "states": states,
        "switch_step": hrp.switch_step, "fallbacks": fallbacks,
        "checks": [[c.step, c.angle] for c in hrp.report.checks] if hrp.report is not None else [],
    }


def main(path):
    with open(path) as stream:
        specs = json.load(stream)
    for spec in specs:
        result = run(spec)
        np.savez(spec["out"], **result["weights"])
        with open(spec["out"] + ".json", "w") as stream:
            json.dump({key: result[key] for key in ("states", "switch_step", "fallbacks", "checks")}, stream)


if __name__ == "__main__":
    main(sys.argv[1])
