"""The HRP state of a layer and of a training run.

`HRPState` is the one record of where a layer is in the HRP lifecycle;
`HRPDense` and the layers `enable_hrp` adapts both carry one as
`layer.hrp_state`, and it travels with weights files, `.keras` files,
adapter files and checkpoints. `RunState` holds what a run needs beyond the
layers (the roll-back snapshot, the optimizer step last counted), per model.
"""

import dataclasses
import weakref

from keras import ops

from keras_hrp import internals
from keras_hrp import settings


@dataclasses.dataclass
class HRPState:
    """Where one layer is in the HRP lifecycle.

    Args:
        rank: the main rank `r`.
        preheat_rank: the preheating rank `R` this layer uses (after any cap
            at its largest useful rank), or `None` for plain LoRA.
        variant: `"classic"` or `"asymmetric"` (`A` frozen in both phases).
        phase: `"preheat"` or `"main"`.
        scale: the factor on `A @ B` in both phases (`lora_alpha / rank`).
        preheat_updates: optimizer updates applied during the preheat so far
            (its total once the layer is in its main phase).
        factorization: `"per_head"` (Keras' layout) or `"full"` (standard
            LoRA over an EinsumDense kernel; see `keras_hrp.lora.factor_axes`).
        auto_rank: whether the switch chooses `rank` from the preheated
            spectrum (`rank` is the budget's mean rank until then).
        rank_budget: the trainable adapter parameters the switch spends
            over every `auto_rank` layer of the model (the same in each), or
            `None`: those of `rank` on each.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((16,)), keras_hrp.HRPDense(8, rank=2, preheat_rank=8, name="proj")])
    >>> state = model.layers[0].hrp_state
    >>> state.phase, state.rank, state.preheat_rank
    ('preheat', 2, 8)
    """

    rank: int
    preheat_rank: int | None = None
    variant: str = "classic"
    phase: str = "preheat"
    scale: float = 1.0
    preheat_updates: int = 0
    factorization: str = "per_head"
    auto_rank: bool = False
    rank_budget: int | None = None

    @property
    def current_rank(self):
        """The rank the layer's adapter has now."""
        return self.preheat_rank if self.phase == "preheat" else self.rank

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config, owner="HRPState"):
        """Validates a dict written by `to_dict` (e.g. read from a file)."""
        if not isinstance(config, dict) or set(config) - {f.name for f in dataclasses.fields(cls)}:
            settings.fail(owner, "not an HRP layer state", state=config)
        rank, preheat_rank, variant, _ = settings.check_hrp_settings(
            owner, config.get("rank"), config.get("preheat_rank"), config.get("variant", "classic")
        )
        phase = settings.choice(owner, "phase", config.get("phase", "main"), settings.PHASES)
        if phase == "preheat" and preheat_rank is None:
            settings.fail(owner, "a preheating layer needs `preheat_rank`", state=config)
        return cls(
            rank=rank,
            preheat_rank=preheat_rank,
            variant=variant,
            phase=phase,
            scale=settings.positive_number(owner, "scale", config.get("scale", 1.0)),
            preheat_updates=settings.integer(
                owner, "preheat_updates", config.get("preheat_updates", 0), minimum=0
            ),
            factorization=settings.choice(
                owner, "factorization", config.get("factorization", "per_head"),
                settings.FACTORIZATIONS,
            ),
            auto_rank=settings.boolean(owner, "auto_rank", config.get("auto_rank", False)),
            rank_budget=settings.integer(owner, "rank_budget", config.get("rank_budget"), optional=True),
        )


def layer_state(layer):
    """The layer's `HRPState`, or `None` if keras-hrp does not manage it."""
    return getattr(layer, "hrp_state", None)


def hrp_layers(model, phase=None):
    """The HRP-managed layers of `model` (optionally only those in `phase`).

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((16,)), keras_hrp.HRPDense(8, rank=2, preheat_rank=8, name="proj")])
    >>> [layer.name for layer in keras_hrp.hrp_layers(model, phase="preheat")]
    ['proj']
    """
    found = [layer for layer in internals.all_layers(model) if layer_state(layer) is not None]
    return [layer for layer in found if phase is None or layer.hrp_state.phase == phase]


class RunState:
    """What an HRP run keeps per model beyond its layers' states.

    Attributes:
        snapshot: the `WeightSnapshot` taken before the preheat (for the roll
            back), or `None`.
        counted_iterations: `optimizer.iterations` when preheat updates were
            last counted into the layers' states, or `None` (count from the
            optimizer's current value).
        optimizer: the optimizer those iterations belong to.
        tracker: an automatic preheat's `SubspaceTracker`, or `None`.
    """

    def __init__(self):
        self.snapshot = None
        self.counted_iterations = None
        self.optimizer = None
        self.tracker = None

    def count_updates(self, model):
        """Adds the optimizer updates since the last count to the preheat.

        Returns the preheat updates done so far (0 without preheating layers).
        """
        layers = hrp_layers(model, phase="preheat")
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None:  # TensorFlow builds it inside the first step
            now = int(ops.convert_to_numpy(optimizer.iterations))
            if self.optimizer is not optimizer or self.counted_iterations is None:
                self.optimizer, self.counted_iterations = optimizer, now
            new = max(0, now - self.counted_iterations)
            self.counted_iterations = now
            for layer in layers:
                layer.hrp_state.preheat_updates += new
        return max((layer.hrp_state.preheat_updates for layer in layers), default=0)

    def recount_from(self, optimizer):
        """Counts from `optimizer`'s current step on (after a load or a switch)."""
        self.optimizer = optimizer
        self.counted_iterations = (
            None if optimizer is None else int(ops.convert_to_numpy(optimizer.iterations))
        )


_RUNS = weakref.WeakKeyDictionary()


def run_state(model):
    """The `RunState` of `model` (created on first use)."""
    if model not in _RUNS:
        _RUNS[model] = RunState()
    return _RUNS[model]
