"""Every use of a private Keras / KerasHub attribute, in one place.

Each entry says why the public API does not suffice. When a Keras or
KerasHub release changes one of these, this module is the one to fix.
Verified against keras 3.15 and keras-hub 0.32.
"""

import contextlib
import functools
import sys

import keras


def all_layers(model, include_self=True):
    """Every layer under `model`, nested ones (attention projections) included.

    `model.layers` lists only the top level; `_flatten_layers` is the
    traversal Keras itself uses for nested layers, in a stable order.
    """
    return list(model._flatten_layers(include_self=include_self, recursive=True))


def child_layers(layer):
    """The layers directly under `layer`, in the order Keras tracks them.

    Keras exposes no public list of a layer's direct sublayers (`layers`
    exists on models only, and not for nested attention projections).
    """
    return list(layer._flatten_layers(include_self=False, recursive=False))


def own_variables(layer):
    """The variables a layer owns directly, not those of its sublayers.

    `layer.weights` includes every sublayer's variables.
    """
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def base_weight(layer):
    """The frozen weight under a LoRA adapter (`Dense`/`EinsumDense`/`Embedding`).

    The public `kernel` / `embeddings` properties return the weight merged
    with the adapter, never the variable itself.
    """
    if isinstance(layer, keras.layers.Embedding):
        return layer._embeddings
    return layer._kernel


def replace_variable(layer, name, value, trainable, like):
    """Replaces the variable `layer.<name>` by a new one holding `value`.

    Keras layers lock their variable tracker after `build`; `enable_lora`
    and `quantize` unlock it the same way to add variables. The old variable
    is untracked directly: `Layer.__delattr__` would run one full
    `gc.collect()` per variable.
    """
    layer._tracker.unlock()
    try:
        layer._untrack_variable(like)
        super(keras.layers.Layer, layer).__delattr__(name)
        new = layer.add_weight(
            name=name,
            shape=tuple(value.shape),
            initializer="zeros",
            dtype="float32",
            trainable=trainable,
            regularizer=like.regularizer,
            constraint=like.constraint,
        )
        new.assign(value)
        setattr(layer, name, new)
    finally:
        layer._tracker.lock()
    return new


def retrack_torch_params(model, variables):
    """Points every torch `ParameterDict` of `model` at `variables`.

    On torch each Keras layer (the model too) keeps a `_torch_params` dict of
    the variables below it, built once; a replaced variable would stay
    registered there (its gradient never zeroed) and the new one missing.
    There is no public way to re-register a variable.
    """
    if keras.backend.backend() != "torch":
        return
    for owner in model.modules():
        params = getattr(owner, "_torch_params", None)
        if params is None:
            continue
        for variable in variables:
            if variable.path in params:
                params[variable.path] = variable.value


def base_learning_rate(optimizer):
    """The optimizer's learning rate as configured: a float or a schedule.

    `optimizer.learning_rate` evaluates a schedule at the current step.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    return inner._learning_rate


def drop_compiled_functions(model):
    """Makes every compiled function of `model` (and its submodels) retrace.

    Compiled train / test / predict functions capture the variables they were
    traced with (TensorFlow keeps them); `make_train_function(force=True)`
    is public but the test and predict caches have no public reset. KerasHub
    CausalLMs also cache `generate_function`, which on TensorFlow keeps the
    old adapters.
    """
    for owner in all_layers(model):
        if not isinstance(owner, keras.Model):
            continue
        if getattr(owner, "generate_function", None) is not None:
            owner.generate_function = None
        owner.test_function = None
        owner.predict_function = None  # `predict` works on uncompiled models too
        if getattr(owner, "compiled", False):
            owner.train_function = None
            owner.make_train_function(force=True)


def replace_compiled_optimizer(model, old, new):
    """Points the `compile()` arguments Keras keeps at `new` instead of `old`.

    Keras keeps the optimizer passed to `compile()` in `_compile_config` (for
    `get_compile_config`, which saving uses); left there, a replaced
    optimizer stays alive with its slots and, through them, the variables it
    was built for. Calling `compile()` again would rebuild losses and metrics
    in the middle of `fit`.
    """
    config = getattr(getattr(model, "_compile_config", None), "config", None)
    if config is None:
        return
    kept = config.get("optimizer")
    if kept is old:
        config["optimizer"] = new
    elif kept is not None and kept is getattr(old, "inner_optimizer", None):  # mixed precision
        config["optimizer"] = new.inner_optimizer


def set_keras_hub_lora_index(backbone, targets, rank):
    """Tells a KerasHub backbone which layers carry LoRA, at which rank.

    `save_lora_weights` / `load_lora_weights` read `_lora_enabled_layers`
    (indices among layers with weights) and `_lora_rank`; only
    `Backbone.enable_lora` sets them, and it enables LoRA itself.
    """
    weighted = [layer for layer in all_layers(backbone, include_self=False) if layer.weights]
    backbone._lora_enabled_layers = [i for i, layer in enumerate(weighted) if layer in targets]
    backbone._lora_rank = rank


@functools.cache
def _with_kernel(cls, merge):
    """`cls` with its `kernel` property computed by `merge(layer)`, and
    `__class__` still answering `cls` (what Keras' saving names)."""
    return type(cls.__name__, (cls,), {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__class__": property(lambda self: cls),
        "kernel": property(lambda self: merge(self) if self.lora_enabled else cls.kernel.fget(self)),
    })


def use_kernel_property(layer, merge):
    """Makes `layer.kernel` return `merge(layer)` while LoRA is enabled.

    Keras' `kernel` property adds `matmul(lora_kernel_a, lora_kernel_b)`,
    which fits only its own factor shapes, and a property cannot be replaced
    on one instance: the instance's type becomes a subclass that overrides
    `kernel` and nothing else. `layer.__class__` (what `isinstance` and
    Keras' serialization read) still answers the Keras class, so `.keras`
    files name the stock layer and load without keras-hrp.
    """
    cls = layer.__class__
    if type(layer) is cls:
        object.__setattr__(layer, "__class__", _with_kernel(cls, merge))


def overrides_kernel(layer):
    """Whether `use_kernel_property` changed `layer`."""
    return type(layer) is not layer.__class__


def wrap_method(owner, name, make_wrapper):
    """Replaces `owner.<name>` on this instance by `make_wrapper(original)`.

    Keras offers no hook on these calls, and keras-hrp must act on each:
    - an HRP stock layer's `load_own_variables`: Keras writes the saved,
      merged kernel into the frozen weight; the wrapper keeps it exactly;
    - a model's `save_weights` / `save` / `load_weights` (what
      BackupAndRestore and ModelCheckpoint call): keras-hrp's state file is
      written and read beside Keras' own;
    - a KerasHub backbone's `save_lora_weights` / `load_lora_weights`: their
      file holds one rank, so they refuse while layers preheat;
    - an adapted layer's `call`: Keras' float LoRA path multiplies by the
      merged kernel; keras-hrp never forms the merged kernel's gradient;
    - a torch optimizer's `_backend_update_step` (`update_each_dtype_apart`).
    Only this instance changes; wrapping twice is a no-op.
    """
    original = getattr(owner, name)
    if getattr(original, "_keras_hrp_wrapped", False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper._keras_hrp_wrapped = True
    object.__setattr__(owner, name, wrapper)


def update_each_dtype_apart(optimizer):
    """Makes a torch-backend optimizer update variables of each dtype apart.

    Keras' torch Adam, AdamW, Nadam, RMSprop, ... compute their step sizes
    in the dtype of the *first* variable of the update (`_parallel_update_
    step`). In a bfloat16 model that is a bfloat16 bias, where `beta_2 **
    step` rounds to 1: Adam's step is exactly 0 for every variable, the
    float32 adapters included, and nothing trains. There is no public hook
    on the update; grouping by dtype gives each group its own dtype.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    if keras.backend.backend() != "torch" or not hasattr(inner, "_parallel_update_step"):
        return

    def make(original):
        def _backend_update_step(grads, trainable_variables, learning_rate):
            groups = {}
            for grad, variable in zip(grads, trainable_variables):
                pair = groups.setdefault(variable.dtype, ([], []))
                pair[0].append(grad)
                pair[1].append(variable)
            for group_grads, group_variables in groups.values():
                original(group_grads, group_variables, learning_rate)

        return _backend_update_step

    wrap_method(inner, "_backend_update_step", make)


@contextlib.contextmanager
def observed_inputs(layers, observe):
    """Calls `observe(layer, inputs)` on every call of each of `layers`.

    Keras has no public hook on a layer's inputs, and a nested layer (an
    attention projection inside a KerasHub block) is no node of a functional
    graph to read them from. Each instance's `call` is shadowed for the
    duration (as `wrap_method` does) and restored after.
    """
    saved = []
    for layer in layers:
        own = layer.__dict__.get("call")
        original = layer.call

        def call(inputs, *args, _layer=layer, _original=original, **kwargs):
            observe(_layer, inputs)
            return _original(inputs, *args, **kwargs)

        object.__setattr__(layer, "call", call)
        saved.append((layer, own))
    try:
        yield
    finally:
        for layer, own in saved:
            if own is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", own)


def sibling_callbacks(callback):
    """The other callbacks of the `fit` that is calling `callback.set_model`.

    Keras gives a callback no handle on the other callbacks of its run; the
    `CallbackList` that calls `set_model` on each of them is the one object
    that holds them all. Returns `[]` when not called from one.
    """
    frame = sys._getframe(1)
    for _ in range(8):  # a few frames up: subclasses may wrap set_model
        frame = frame.f_back
        if frame is None:
            break
        caller = frame.f_locals.get("self")
        if isinstance(caller, keras.callbacks.CallbackList):
            return [cb for cb in caller.callbacks if cb is not callback]
    return []


@contextlib.contextmanager
def distribution_scope(model):
    """The scope new variables of `model` must be created in.

    TensorFlow: the model's `tf.distribute` strategy (`distribute_strategy`
    is public on TF models); elsewhere `keras.distribution` is global and
    needs nothing.
    """
    strategy = getattr(model, "distribute_strategy", None)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        yield
