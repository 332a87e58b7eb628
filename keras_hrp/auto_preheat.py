"""When to end an automatic preheat: once its top-`r` subspaces stop moving.

HRP keeps only the top-`rank` left singular directions of each preheated
delta. While the preheat still sees mostly noise (a new head not yet
trained, a loss plateau) those directions wander from check to check; once
they settle, more preheating would not change the start the main phase gets.
"""

import dataclasses

import numpy as np
from keras import ops

from keras_hrp import linalg
from keras_hrp import lora
from keras_hrp.state import hrp_layers


def top_directions(layer):
    """The top-`rank` left singular directions of `layer`'s preheated delta
    `A @ B` as an `(m, rank)` array, or `None` while the delta is zero or
    not finite."""
    a, b = lora.factor_matrices(layer)
    if not bool(ops.all(ops.isfinite(a))) or not bool(ops.all(ops.isfinite(b))) or not bool(ops.any(b)):
        return None
    try:
        u, s, _ = linalg.svd_of_product(a, b, layer.hrp_state.rank)
    except Exception:  # a failed SVD is one more check without an answer
        return None
    u = ops.convert_to_numpy(u)
    if not np.all(np.isfinite(u)) or float(ops.convert_to_numpy(s)[-1]) <= 0.0:
        return None
    return u


@dataclasses.dataclass
class Check:
    """One check: after `step` preheat updates, the largest angle (degrees)
    any layer's top subspace moved since the previous check (`None` at the
    first check, or where a layer had no directions)."""

    step: int
    angle: float | None


class SubspaceTracker:
    """Each preheating layer's top directions at the last check, and the checks.

    One per model (`keras_hrp.state.RunState.tracker`), so it travels with
    keras-hrp's checkpoint state files: a preheat resumed in a new process
    compares its next check with the last one before the interruption.
    """

    def __init__(self):
        self.checks = []
        self._last = {}

    def check(self, model, step, stable_degrees):
        """Records a check after `step` updates; returns whether every layer's
        top subspace moved less than `stable_degrees` since the last one."""
        angles, current = [], {}
        for layer in hrp_layers(model, phase="preheat"):
            u = top_directions(layer)
            current[layer.path] = u
            previous = self._last.get(layer.path)
            if u is None or previous is None:
                angles.append(None)
            else:
                angles.append(linalg.largest_principal_angle(previous, u))
        self._last = current
        angle = None if not angles or None in angles else max(angles)
        self.checks.append(Check(step, angle))
        return angle is not None and angle < stable_degrees

    def to_arrays(self):
        """`(header, arrays)` for a state file (JSON-safe header)."""
        paths = [path for path, u in self._last.items() if u is not None]
        header = {"checks": [[c.step, c.angle] for c in self.checks], "last": paths}
        return header, {f"tracker{i}": self._last[path] for i, path in enumerate(paths)}

    @classmethod
    def from_arrays(cls, header, arrays, resolve=lambda path: path):
        """The tracker `to_arrays` wrote (`resolve` maps its layer paths to
        the model's)."""
        tracker = cls()
        tracker.checks = [Check(int(step), None if angle is None else float(angle))
                          for step, angle in header["checks"]]
        tracker._last = {resolve(path): arrays[f"tracker{i}"] for i, path in enumerate(header["last"])}
        return tracker
