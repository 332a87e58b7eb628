"""`enable_hrp`: High-Rank Preheating on any Keras or KerasHub model."""

import re
import warnings

import keras

from keras_hrp import checkpoints
from keras_hrp import internals
from keras_hrp import lora
from keras_hrp import settings
from keras_hrp import fast_lora
from keras_hrp.state import HRPState
from keras_hrp.state import hrp_layers

# The layers KerasHub's `Backbone.enable_lora` targets by default.
DEFAULT_TARGETS = ("query_dense", "value_dense", "query", "value", "query_proj", "value_proj")
SUPPORTED = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding)
# Every linear layer of a transformer block, by KerasHub layer name.
LINEAR_LAYER_NAMES = {
    "bert": ("query", "key", "value", "attention_output",
             "feedforward_intermediate_dense", "feedforward_output_dense"),
    "gemma": ("query", "key", "value", "attention_output",
              "ffw_gating", "ffw_gating_2", "ffw_linear"),
    "llama": ("query", "key", "value", "attention_output", "feedforward_intermediate_dense",
              "feedforward_gate_dense", "feedforward_output_dense"),
}
OWNER = "enable_hrp"


def _freeze_scope(model):
    """What KerasHub's `enable_lora` freezes: the backbone of a Task."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, keras.Model) else model


def _matches(layer, patterns):
    return any(layer.name == p or re.fullmatch(p, layer.path) for p in patterns)


def _targets(model, scope, target_layer_names):
    if target_layer_names is None:
        names = getattr(scope, "default_lora_layer_names", None)
        target_layer_names = sorted(set(names()) | set(DEFAULT_TARGETS)) if names else DEFAULT_TARGETS
    patterns = settings.patterns(OWNER, "target_layer_names", target_layer_names)
    candidates = [
        layer
        for layer in internals.all_layers(model, include_self=False)
        if isinstance(layer, SUPPORTED)
    ]
    targets = [layer for layer in candidates if _matches(layer, patterns)]
    if not targets:
        settings.fail(
            OWNER,
            f"`target_layer_names` matches no Dense, EinsumDense or Embedding layer of "
            f"model '{model.name}' (names or regular expressions over paths; the model "
            f"has {[layer.path for layer in candidates]})",
            target_layer_names=patterns,
        )
    return targets


def _preheat_rank_for(layer, rank, preheat_rank):
    """The layer's preheat rank (`None`: plain LoRA), capped at its useful rank."""
    limit = lora.max_useful_rank(layer)
    if preheat_rank is None:
        if rank > limit:
            settings.fail(OWNER, f"layer '{layer.path}' has LoRA rank at most {limit}", rank=rank)
        return None
    if rank >= limit:
        settings.fail(
            OWNER,
            f"layer '{layer.path}' has LoRA rank at most {limit}: `rank` must be smaller "
            "to leave room for preheating",
            rank=rank,
        )
    if preheat_rank > limit:
        warnings.warn(
            f"enable_hrp: layer '{layer.path}' can use LoRA rank {limit} at most "
            f"({type(layer).__name__} weight as a {lora.weight_matrix_shape(layer)} "
            f"matrix); it preheats at rank {limit} instead of {preheat_rank}.",
            stacklevel=3,
        )
    return min(preheat_rank, limit)


def _refuse_in_preheat(backbone, name):
    """KerasHub's LoRA files hold one rank: refuse them while layers preheat."""

    def make(original):
        def method(*args, **kwargs):
            preheating = [layer.path for layer in hrp_layers(backbone, phase="preheat")]
            if preheating:
                settings.fail(
                    f"{name} of '{backbone.name}'",
                    "HRP layers are still preheating at their preheat rank, and KerasHub's "
                    "LoRA files hold one rank for all layers. Call it after the switch, or "
                    "use keras_hrp.save_adapters / load_adapters (any phase)",
                    preheating=preheating,
                )
            return original(*args, **kwargs)

        return method

    internals.wrap_method(backbone, name, make)


def enable_hrp(
    model,
    rank,
    preheat_rank=None,
    target_layer_names=None,
    lora_alpha=None,
    variant="classic",
):
    """Adds High-Rank Preheating LoRA adapters to a built Keras model.

    Like KerasHub's `Backbone.enable_lora`, it freezes the model (for a
    KerasHub `Task`, its backbone; the task's head keeps training), then
    makes every target layer trainable and gives it a LoRA adapter at
    `preheat_rank`. `HRPCallback` (or `switch_to_main`) then switches these
    layers to `rank` exactly as it switches `HRPDense` layers. With
    `preheat_rank=None` the layers get plain rank-`rank` LoRA (phase
    `"main"`, no preheat).

    The adapters' gradients come from their factors (see
    `keras_hrp.fast_lora`): no gradient the size of `W`, the same outputs
    and gradients as Keras' merged kernel.

    Supported layers: `Dense`, `EinsumDense` (multi-axis kernels: the
    adapter adapts the kernel as a `(prod(shape[:-1]), shape[-1])` matrix,
    so attention projections preheat at most at head_dim; larger
    `preheat_rank`s are capped there with a warning) and `Embedding` /
    `ReversibleEmbedding`.

    Args:
        model: a built Keras model, e.g. a KerasHub `Backbone` or `Task`.
        rank: the LoRA rank of the main phase.
        preheat_rank: the rank of the preheating adapters (`> rank`), or
            `None` for plain LoRA at `rank`.
        target_layer_names: layer names or regular expressions matched
            (whole) against layer paths. Defaults to the attention query and
            value projections KerasHub's `enable_lora` targets.
        lora_alpha: the delta is `(lora_alpha / rank) * A @ B` in both
            phases; `None` means scale 1 (KerasHub's default).
        variant: `"classic"` or `"asymmetric"` (`A` frozen in both phases).

    Returns:
        The list of HRP-managed layers.

    Example:

    >>> backbone = keras_hub.models.BertBackbone.from_preset(path)
    >>> keras_hrp.enable_hrp(backbone, rank=4, preheat_rank=32)
    >>> model.fit(x, y, callbacks=[keras_hrp.HRPCallback(100)])
    """
    if not isinstance(model, keras.Model):
        settings.fail(OWNER, "`model` must be a Keras model", error=TypeError, model=model)
    rank, preheat_rank, variant, lora_alpha = settings.check_hrp_settings(
        OWNER, rank, preheat_rank, variant, lora_alpha
    )
    if not model.built:
        settings.fail(OWNER, f"model '{model.name}' must be built first", built=False)
    if hrp_layers(model):
        settings.fail(
            OWNER,
            f"model '{model.name}' already has HRP layers; enable_hrp runs once",
            hrp_layers=[layer.path for layer in hrp_layers(model)],
        )
    scope = _freeze_scope(model)
    targets = _targets(model, scope, target_layer_names)
    already = [layer.path for layer in targets if layer.lora_enabled]
    if already:
        settings.fail(OWNER, "these target layers already have LoRA", layers=already)
    ranks = [_preheat_rank_for(layer, rank, preheat_rank) for layer in targets]
    scale = 1.0 if lora_alpha is None else lora_alpha / rank

    scope.trainable = True
    for layer in internals.all_layers(scope, include_self=False):
        layer.trainable = False
    for layer, layer_rank in zip(targets, ranks):
        layer.trainable = True
        layer.hrp_state = HRPState(
            rank=rank, preheat_rank=layer_rank, variant=variant,
            phase="main" if layer_rank is None else "preheat", scale=scale,
        )
        lora.enable_adapter(
            layer, layer.hrp_state.current_rank, scale, trainable_a=variant != "asymmetric"
        )
        fast_lora.use_fast_lora(layer)
    checkpoints.attach(model)
    if hasattr(scope, "save_lora_weights"):  # a KerasHub backbone
        internals.set_keras_hub_lora_index(scope, targets, rank)
        _refuse_in_preheat(scope, "save_lora_weights")
        _refuse_in_preheat(scope, "load_lora_weights")
    return targets
