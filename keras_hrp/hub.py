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
            target_layer_names=target_layer_names,
        )
    return targets


def _check_factorization(layer, factorization):
    """Refuses a 'full' adapter where it would differ from Keras' layout and
    cannot be computed (a quantized kernel, an axis neither contracted nor out)."""
    if factorization != "full" or not isinstance(layer, keras.layers.EinsumDense):
        return
    full = lora.factor_axes(layer, "full")
    if full == lora.factor_axes(layer, "per_head"):
        return
    if layer.quantization_mode is not None:
        settings.fail(
            OWNER,
            f"layer '{layer.path}' is quantized; factorization 'full' needs a float kernel "
            "(Keras' quantized LoRA computes per head)",
            quantization_mode=layer.quantization_mode,
        )
    kernel = layer.equation.split("->")[0].split(",")[1]
    if fast_lora.lora_equations(layer.equation, "".join(kernel[i] for i in full[1])) is None:
        settings.fail(
            OWNER,
            f"layer '{layer.path}' cannot take a 'full' adapter: its kernel axes are not "
            "each either contracted or an output axis",
            equation=layer.equation,
        )


def _check_auto_rank(preheat_rank, rank_budget):
    if preheat_rank is None:
        settings.fail(OWNER, '`rank="auto"` chooses ranks from a preheat: give `preheat_rank`',
                      preheat_rank=preheat_rank)
    if rank_budget is None:
        settings.fail(OWNER, '`rank="auto"` needs `rank_budget` (trainable adapter parameters)',
                      rank_budget=rank_budget)
    return settings.integer(OWNER, "rank_budget", rank_budget, minimum=1)


def _mean_rank(targets, factorization, rank_budget, preheat_rank):
    """The whole rank `rank_budget` pays on every target (the nominal rank of
    `rank="auto"` layers until the switch); at least rank 1 everywhere."""
    per_rank = sum(sum(lora.weight_matrix_shape(layer, factorization)) for layer in targets)
    if rank_budget < per_rank:
        settings.fail(
            OWNER,
            f"`rank_budget` must cover rank 1 on every target layer ({per_rank:,} parameters)",
            rank_budget=rank_budget,
        )
    mean = rank_budget // per_rank
    if mean >= preheat_rank:
        settings.fail(
            OWNER,
            f"`rank_budget` pays rank {mean} on every target layer: `preheat_rank` must be larger",
            rank_budget=rank_budget, preheat_rank=preheat_rank,
        )
    return mean


def _preheat_rank_for(layer, rank, preheat_rank, factorization):
    """The layer's preheat rank (`None`: plain LoRA), capped at its useful rank."""
    limit = lora.max_useful_rank(layer, factorization)
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
            f"({type(layer).__name__} weight as a "
            f"{lora.weight_matrix_shape(layer, factorization)} "
            f"matrix); it preheats at rank {limit} instead of {preheat_rank}.",
            stacklevel=3,
        )
    return min(preheat_rank, limit)


def _guard_keras_hub_file(backbone, name):
    """KerasHub's LoRA files hold one rank and Keras' per-head factors:
    refuse them while layers preheat, where a layer is factored 'full' or
    where ranks differ (`rank="auto"`)."""

    def make(original):
        def method(*args, **kwargs):
            full = [layer.path for layer in hrp_layers(backbone) if internals.overrides_kernel(layer)]
            if full:
                settings.fail(
                    f"{name} of '{backbone.name}'",
                    "these layers use factorization 'full', and KerasHub's LoRA files hold "
                    "Keras' per-head factors. Use keras_hrp.save_adapters / load_adapters",
                    full=full,
                )
            preheating = [layer.path for layer in hrp_layers(backbone, phase="preheat")]
            if preheating:
                settings.fail(
                    f"{name} of '{backbone.name}'",
                    "HRP layers are still preheating at their preheat rank, and KerasHub's "
                    "LoRA files hold one rank for all layers. Call it after the switch, or "
                    "use keras_hrp.save_adapters / load_adapters (any phase)",
                    preheating=preheating,
                )
            ranks = {layer.path: layer.lora_rank for layer in hrp_layers(backbone)}
            if len(set(ranks.values())) > 1:
                settings.fail(
                    f"{name} of '{backbone.name}'",
                    "HRP layers have different ranks (spread from their spectra), and KerasHub's "
                    "LoRA files hold one rank. Use keras_hrp.save_adapters / load_adapters, or "
                    "enable_hrp(..., rank_allocation=\"uniform\")",
                    ranks=ranks,
                )
            if ranks and name == "save_lora_weights":  # the rank the file records
                internals.set_keras_hub_lora_index(backbone, hrp_layers(backbone), min(ranks.values()))
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
    factorization="per_head",
    rank_budget=None,
    rank_allocation="spectrum",
):
    """Adds High-Rank Preheating LoRA adapters to a built Keras model.

    Like KerasHub's `Backbone.enable_lora`, it freezes the model (for a
    KerasHub `Task`, its backbone; the task's head keeps training), then
    makes every target layer trainable and gives it a LoRA adapter at
    `preheat_rank`. `HRPCallback` (or `switch_to_main`) then switches these
    layers to `rank` exactly as it switches `HRPDense` layers. With
    `preheat_rank=None` the layers get plain rank-`rank` LoRA (phase
    `"main"`, no preheat).

    By default (`rank_allocation="spectrum"`) the switch spends the
    parameters that rank `rank` on every target layer would train, but
    gives each layer its own rank from its preheated spectrum: this beat
    both random-init LoRA and uniform ranks on every decoder task measured
    (`benchmarks/results/defaults.md`). `rank_allocation="uniform"` is the
    paper's reading, rank `rank` everywhere; KerasHub's `save_lora_weights`
    needs it (its files hold one rank), `keras_hrp.save_adapters` and PEFT
    export take either.

    The adapters' gradients come from their factors (see
    `keras_hrp.fast_lora`): no gradient the size of `W`, the same outputs
    and gradients as Keras' merged kernel.

    Supported layers: `Dense`, `EinsumDense` and `Embedding` /
    `ReversibleEmbedding`. An `EinsumDense` kernel is factored as
    `factorization` says (see `keras_hrp.lora.factor_axes`): `"per_head"`
    is Keras' own layout (the kernel as a `(prod(shape[:-1]), shape[-1])`
    matrix, so attention projections reach rank head_dim at most; larger
    `preheat_rank`s are capped there with a warning), `"full"` is standard
    LoRA (contracted axes -> `r` -> every output axis: PEFT's rank and
    parameter count, preheat ranks up to the hidden size).

    Args:
        model: a built Keras model, e.g. a KerasHub `Backbone` or `Task`.
        rank: the LoRA rank of the main phase (with
            `rank_allocation="spectrum"`, the mean rank its parameters
            pay for), or `"auto"`: per-layer ranks chosen at the switch
            within `rank_budget` (needs a preheat; `lora_alpha` is divided
            by the budget's mean rank, as below).
        preheat_rank: the rank of the preheating adapters (`> rank`), or
            `None` for plain LoRA at `rank`.
        target_layer_names: layer names or regular expressions matched
            (whole) against layer paths. Defaults to the attention query and
            value projections KerasHub's `enable_lora` targets.
        lora_alpha: the delta is `(lora_alpha / rank) * A @ B` in both
            phases; `None` means scale 1 (KerasHub's default).
        variant: `"classic"` or `"asymmetric"` (`A` frozen in both phases).
        factorization: `"per_head"` or `"full"` (float kernels only;
            KerasHub's `save_lora_weights` refuses it, `save_adapters`
            records it).
        rank_budget: with `rank="auto"`, the trainable adapter parameters
            of the main phase, over all target layers: the switch gives
            each layer its own rank from its preheated spectrum (at least 1,
            below its preheat rank; see `keras_hrp.rank_allocation`).
            KerasHub's `save_lora_weights` then refuses unequal ranks.
        rank_allocation: `"spectrum"` (per-layer ranks from the preheated
            spectra, at least 1 and below the layer's preheat rank, within
            the parameters of rank `rank` everywhere; see
            `keras_hrp.rank_allocation`) or `"uniform"` (rank `rank` on every
            layer: the paper's reading). Plain LoRA (`preheat_rank=None`)
            is uniform either way.

    Returns:
        The list of HRP-managed layers.

    Example:

    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="proj")], name="net")
    >>> [layer.name for layer in keras_hrp.enable_hrp(
    ...     model, rank=2, preheat_rank=8, target_layer_names=["proj"])]
    ['proj']
    >>> model.compile("adam", "mse")
    >>> x, y = np.ones((32, 16)), np.zeros((32, 8))
    >>> _ = model.fit(x, y, batch_size=8, epochs=2, verbose=0,
    ...               callbacks=[keras_hrp.HRPCallback(4, verbose=0)])
    >>> model.get_layer("proj").hrp_state.phase
    'main'
    """
    if not isinstance(model, keras.Model):
        settings.fail(OWNER, "`model` must be a Keras model", error=TypeError, model=model)
    auto = isinstance(rank, str) and rank == "auto"
    rank_allocation = settings.choice(OWNER, "rank_allocation", rank_allocation, settings.RANK_ALLOCATIONS)
    if auto and rank_allocation == "uniform":
        settings.fail(OWNER, '`rank="auto"` spreads ranks: it cannot be `rank_allocation="uniform"`',
                      rank=rank, rank_allocation=rank_allocation)
    if auto:
        rank_budget = _check_auto_rank(preheat_rank, rank_budget)
    elif rank_budget is not None:
        settings.fail(OWNER, '`rank_budget` is for `rank="auto"`', rank=rank, rank_budget=rank_budget)
    rank, preheat_rank, variant, lora_alpha = settings.check_hrp_settings(
        OWNER, 1 if auto else rank, preheat_rank, variant, lora_alpha
    )
    if not model.built:
        settings.fail(OWNER, f"model '{model.name}' must be built first", built=False)
    if hrp_layers(model):
        settings.fail(
            OWNER,
            f"model '{model.name}' already has HRP layers; enable_hrp runs once",
            hrp_layers=[layer.path for layer in hrp_layers(model)],
        )
    factorization = settings.choice(OWNER, "factorization", factorization, settings.FACTORIZATIONS)
    scope = _freeze_scope(model)
    targets = _targets(model, scope, target_layer_names)
    for layer in targets:
        _check_factorization(layer, factorization)
    already = [layer.path for layer in targets if layer.lora_enabled]
    if already:
        settings.fail(OWNER, "these target layers already have LoRA", layers=already)
    if auto:
        rank = _mean_rank(targets, factorization, rank_budget, preheat_rank)
    ranks = [_preheat_rank_for(layer, rank, preheat_rank, factorization) for layer in targets]
    scale = 1.0 if lora_alpha is None else lora_alpha / rank

    scope.trainable = True
    for layer in internals.all_layers(scope, include_self=False):
        layer.trainable = False
    for layer, layer_rank in zip(targets, ranks):
        layer.trainable = True
        layer.hrp_state = HRPState(
            rank=rank, preheat_rank=layer_rank, variant=variant,
            phase="main" if layer_rank is None else "preheat", scale=scale,
            factorization=factorization, auto_rank=layer_rank is not None and (auto or rank_allocation == "spectrum"),
            rank_budget=rank_budget if auto else None,
        )
        lora.enable_adapter(
            layer, layer.hrp_state.current_rank, scale, trainable_a=variant != "asymmetric"
        )
        fast_lora.use_fast_lora(layer)
    internals.retrack_torch_params(model, [v for layer in targets for v in lora.lora_factors(layer)])
    checkpoints.attach(model)
    if hasattr(scope, "save_lora_weights"):  # a KerasHub backbone
        internals.set_keras_hub_lora_index(scope, targets, rank)
        _guard_keras_hub_file(scope, "save_lora_weights")
        _guard_keras_hub_file(scope, "load_lora_weights")
    return targets
