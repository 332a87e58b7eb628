"""`HRPDense`: a drop-in `keras.layers.Dense` with the HRP lifecycle."""

import contextlib

import keras

from keras_hrp import lora
from keras_hrp.settings import check_hrp_settings
from keras_hrp.settings import check_variant
from keras_hrp.settings import fail

PHASES = ("preheat", "main")


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

    Saving: the frozen kernel and the adapter are saved separately, so a
    reloaded layer keeps training where it stopped. Weights saved by a plain
    `Dense` load as the (merged) kernel with a fresh, trainable adapter.

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
        if rank is None:
            super().__init__(units, lora_alpha=lora_alpha, **kwargs)
        else:
            super().__init__(units, **kwargs)
        self.rank = rank
        self.preheat_rank = preheat_rank
        self.variant = variant
        self._lora_alpha_arg = lora_alpha
        self._validate(kwargs.get("lora_rank"), hrp_phase)
        if rank is None:
            self.hrp_phase = None
        else:
            self.hrp_phase = hrp_phase or ("preheat" if preheat_rank else "main")

    def _validate(self, lora_rank, hrp_phase):
        owner = f"HRPDense '{self.name}'"
        if self.rank is None:
            if self.preheat_rank is not None:
                fail(owner, "`preheat_rank` needs `rank`", preheat_rank=self.preheat_rank)
            check_variant(owner, self.variant)
            return
        if lora_rank:
            fail(
                owner,
                "pass either `rank` (HRP) or `lora_rank` (plain Keras LoRA)",
                rank=self.rank,
                lora_rank=lora_rank,
            )
        check_hrp_settings(owner, self.rank, self.preheat_rank, self.variant)
        if hrp_phase not in (None,) + PHASES:
            fail(owner, f"`hrp_phase` must be one of {PHASES}", hrp_phase=hrp_phase)

    @property
    def lora_scale(self):
        """`lora_alpha / rank`, the factor on `A @ B` in both phases."""
        if self._lora_alpha_arg is None:
            return 1.0
        return self._lora_alpha_arg / self.rank

    def build(self, input_shape):
        super().build(input_shape)
        if self.rank is None:
            return
        limit = min(int(input_shape[-1]), self.units)
        for name in ("rank", "preheat_rank"):
            value = getattr(self, name)
            if value is not None and value > limit:
                fail(
                    f"HRPDense '{self.name}'",
                    f"`{name}` must be at most min(input_dim, units) = {limit}",
                    **{name: value},
                )
        rank = self.preheat_rank if self.hrp_phase == "preheat" else self.rank
        lora.enable_adapter(
            self, rank, self.lora_scale, trainable_a=self.variant != "asymmetric"
        )

    @property
    def hrp_rank(self):
        """The main rank, as every HRP-managed layer reports it."""
        return self.rank

    @property
    def hrp_variant(self):
        return self.variant

    @contextlib.contextmanager
    def _without_lora(self):
        self.lora_enabled = False
        try:
            yield
        finally:
            self.lora_enabled = True

    def save_own_variables(self, store):
        if self.hrp_phase is None or not self.lora_enabled:
            return super().save_own_variables(store)
        with self._without_lora():  # the frozen kernel, unmerged
            super().save_own_variables(store)
        count = len(store.keys())
        store[str(count)] = self.lora_kernel_a
        store[str(count + 1)] = self.lora_kernel_b

    def load_own_variables(self, store):
        if self.hrp_phase is None or not self.lora_enabled:
            return super().load_own_variables(store)
        count = len(store.keys())
        if count == len(self._trainable_variables + self._non_trainable_variables):
            with self._without_lora():
                super().load_own_variables(store)
            self.lora_kernel_a.assign(store[str(count - 2)])
            self.lora_kernel_b.assign(store[str(count - 1)])
            return
        # Merged weights (from a plain Dense): Keras zeroes A and B, which
        # would leave both gradients zero forever; re-draw A so it can train.
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
