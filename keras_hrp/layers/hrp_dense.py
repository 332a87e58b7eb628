"""`HRPDense`: a drop-in `keras.layers.Dense` with the HRP lifecycle."""

import contextlib
import dataclasses
import json

import keras
import numpy as np

from keras_hrp import internals
from keras_hrp import lora
from keras_hrp import settings
from keras_hrp import fast_lora
from keras_hrp.state import HRPState


@keras.saving.register_keras_serializable(package="keras_hrp")
class HRPDense(keras.layers.Dense):
    """Densely-connected layer with a High-Rank Preheating LoRA adapter.

    Without `rank` this is exactly `keras.layers.Dense` (Keras' own
    `lora_rank` / `enable_lora` included). With `rank` and `preheat_rank`
    the layer builds with a LoRA adapter of rank `preheat_rank` (phase
    `"preheat"`); `HRPCallback` (or `keras_hrp.switch_to_main`) then
    replaces it by a rank-`rank` adapter initialized from the top singular
    directions of the preheated delta (phase `"main"`). With `rank` alone it
    is a plain rank-`rank` LoRA layer in phase `"main"`.

    Scale: the delta is `(lora_alpha / rank) * A @ B` in BOTH phases, so the
    same `A @ B` means the same update whatever its rank; Keras' own
    `layer.lora_alpha` is set to `scale * layer.lora_rank` in each phase.
    `lora_alpha=None` means `lora_alpha=rank` (scale 1).

    State: `layer.hrp_state` (a `keras_hrp.HRPState`) records the phase,
    the ranks, the variant and the preheat updates done.

    Saving: the frozen kernel, the adapter and the state are saved
    separately, so a reloaded layer comes back in its phase, at its rank
    (the adapter is resized if the file's rank differs), and keeps
    training. Weights saved by a plain `Dense` load as the (merged) kernel
    with a fresh, trainable adapter.

    Args:
        units: positive integer, dimensionality of the output space.
        rank: rank of the LoRA adapter used for fine-tuning (`r`).
        preheat_rank: rank of the preheating adapter (`R > rank`), or `None`
            for no preheating.
        lora_alpha: LoRA alpha for the main rank: the delta is scaled by
            `lora_alpha / rank`. Without `rank`, as in `Dense`.
        variant: `"classic"` (`A` and `B` train in both phases) or
            `"asymmetric"` (`A` stays frozen in both phases; `B` trains).
        hrp_phase: phase to build in, `"preheat"` or `"main"`. Defaults to
            `"preheat"` when `preheat_rank` is set; saved by `get_config`.
        **kwargs: any `keras.layers.Dense` argument.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((64,)),
    ...     keras_hrp.HRPDense(32, rank=4, preheat_rank=16),
    ... ])
    >>> model.layers[0].hrp_phase, model.layers[0].lora_rank
    ('preheat', 16)
    """

    def __init__(
        self,
        units,
        rank=None,
        preheat_rank=None,
        lora_alpha=None,
        variant="classic",
        hrp_phase=None,
        **kwargs,
    ):
        name = kwargs.get("name")
        if not settings.is_integer(units) or units < 1:  # Dense's wording, with the layer
            settings.fail(
                f"HRPDense '{name}'" if name else "HRPDense",
                "`units` must be a positive integer", units=units,
            )
        units = int(units)
        if rank is None:
            super().__init__(units, lora_alpha=lora_alpha, **kwargs)
        else:
            super().__init__(units, **kwargs)
        owner = f"HRPDense '{self.name}'"
        if rank is None:
            if preheat_rank is not None:
                settings.fail(owner, "`preheat_rank` needs `rank`", preheat_rank=preheat_rank)
            self.variant = settings.check_variant(owner, variant)
            self.rank = self.preheat_rank = None
            self._lora_alpha_arg = lora_alpha
            self.hrp_state = None
            return
        if kwargs.get("lora_rank"):
            settings.fail(
                owner,
                "pass either `rank` (HRP) or `lora_rank` (plain Keras LoRA)",
                rank=rank,
                lora_rank=kwargs["lora_rank"],
            )
        self.rank, self.preheat_rank, self.variant, self._lora_alpha_arg = (
            settings.check_hrp_settings(owner, rank, preheat_rank, variant, lora_alpha)
        )
        if hrp_phase is not None:
            settings.choice(owner, "hrp_phase", hrp_phase, settings.PHASES)
            if hrp_phase == "preheat" and self.preheat_rank is None:
                settings.fail(owner, "phase 'preheat' needs `preheat_rank`", hrp_phase=hrp_phase)
        self.hrp_state = HRPState(
            rank=self.rank,
            preheat_rank=self.preheat_rank,
            variant=self.variant,
            phase=hrp_phase or ("preheat" if self.preheat_rank else "main"),
            scale=self.lora_scale,
        )

    @property
    def hrp_phase(self):
        """`"preheat"`, `"main"`, or `None` without `rank`."""
        return None if self.hrp_state is None else self.hrp_state.phase

    @property
    def lora_scale(self):
        """`lora_alpha / rank`, the factor on `A @ B` in both phases."""
        if self._lora_alpha_arg is None:
            return 1.0
        return self._lora_alpha_arg / self.rank

    def build(self, input_shape):
        super().build(input_shape)
        if self.hrp_state is None:
            return
        limit = min(int(input_shape[-1]), self.units)
        for name in ("rank", "preheat_rank"):
            value = getattr(self, name)
            if value is not None and value > limit:
                settings.fail(
                    f"HRPDense '{self.name}'",
                    f"`{name}` must be at most min(input_dim, units) = {limit}",
                    **{name: value},
                )
        lora.enable_adapter(
            self,
            self.hrp_state.current_rank,
            self.lora_scale,
            trainable_a=self.variant != "asymmetric",
        )

    def call(self, inputs, training=None):
        if self.hrp_state is None or not self.lora_enabled:
            return super().call(inputs, training=training)
        return fast_lora.dense_call(self, inputs)  # no gradient the size of the kernel

    @contextlib.contextmanager
    def _without_lora(self):
        self.lora_enabled = False
        try:
            yield
        finally:
            self.lora_enabled = True

    def save_own_variables(self, store):
        if self.hrp_state is None or not self.lora_enabled:
            return super().save_own_variables(store)
        with self._without_lora():  # the frozen kernel, unmerged
            super().save_own_variables(store)
        count = len(store.keys())
        store[str(count)] = self.lora_kernel_a
        store[str(count + 1)] = self.lora_kernel_b
        store[str(count + 2)] = _encode(self.hrp_state.to_dict())

    def load_own_variables(self, store):
        if self.hrp_state is None or not self.lora_enabled:
            return super().load_own_variables(store)
        count = len(store.keys())
        own = len(internals.own_variables(self))  # base weights, A and B
        if count == own - 2:  # merged weights from a plain Dense
            return self._load_merged(store)
        if count not in (own, own + 1):
            settings.fail(
                f"HRPDense '{self.name}'",
                f"the saved weights do not fit this layer ({own - 2} base weights, "
                "an adapter and its state)",
                saved_entries=count,
            )
        state = None
        if count == own + 1:  # format 2: ... A, B, state
            state = HRPState.from_dict(_decode(store[str(count - 1)]), f"HRPDense '{self.name}'")
            count -= 1
        a, b = store[str(count - 2)], store[str(count - 1)]
        self._adopt(state, b.shape[0])
        base = {str(i): store[str(i)] for i in range(count)}
        with self._without_lora():
            super().load_own_variables(base)
        self.lora_kernel_a.assign(a)
        self.lora_kernel_b.assign(b)

    def _adopt(self, state, rank):
        """Takes the saved phase and rank (resizing the adapter if needed)."""
        if state is None:  # format 1 files hold no state: infer it from the rank
            phases = {self.rank: "main", self.preheat_rank: "preheat"}
            if rank not in phases:
                settings.fail(
                    f"HRPDense '{self.name}'",
                    f"the saved adapter has rank {rank}, neither `rank` nor `preheat_rank`",
                    saved_rank=rank,
                )
            state = dataclasses.replace(self.hrp_state, phase=phases[rank])
        ours = (self.rank, self.preheat_rank, self.variant)
        if (state.rank, state.preheat_rank, state.variant) != ours or state.current_rank != rank:
            settings.fail(
                f"HRPDense '{self.name}'",
                f"the saved HRP state does not match this layer's (rank, preheat_rank, "
                f"variant) = {ours}",
                saved_state=state.to_dict(),
            )
        if self.lora_rank != rank:
            lora.resize(self, rank)
        self.hrp_state = state

    def _load_merged(self, store):
        # Keras zeroes A and B here, which would leave both gradients zero
        # forever; re-draw A so the adapter can train.
        super().load_own_variables(store)
        initializer = keras.initializers.get(lora.DEFAULT_A_INITIALIZER)
        self.lora_kernel_a.assign(initializer(self.lora_kernel_a.shape, "float32"))

    def quantize(self, mode=None, type_check=True, config=None):
        # Dense refuses subclasses; this subclass keeps Dense's variables.
        super().quantize(mode, type_check=False, config=config)

    def get_config(self):
        config = super().get_config()
        config.update(
            rank=self.rank,
            preheat_rank=self.preheat_rank,
            variant=self.variant,
            hrp_phase=self.hrp_phase,
        )
        if self.rank is not None:
            config.pop("lora_rank", None)
            config["lora_alpha"] = self._lora_alpha_arg
        return config


def _encode(config):
    return np.frombuffer(json.dumps(config).encode(), dtype=np.uint8)


def _decode(array):
    return json.loads(np.asarray(array).tobytes().decode())
