"""keras-hrp's LoRA passes equal Keras' merged ones, per layer type, form and backend."""

import math

import keras
import numpy as np
import pytest

from keras_hrp import internals
from keras_hrp import lora
from keras_hrp import fast_lora
from keras_hrp.state import HRPState
from tests.helpers import JIT_MODES
from tests.helpers import numpy_of

EQUATIONS = [
    # (equation, input shape, output shape without batch)
    ("ab,bc->ac", (12,), (10,)),
    ("abc,cde->abde", (5, 12), (5, 3, 4)),  # attention query/key/value
    ("abcd,cde->abe", (5, 3, 4), (5, 12)),  # attention output
    ("btd,df->btf", (5, 12), (5, 10)),  # Gemma / Llama MLP
    ("...b,bc->...c", (5, 12), (10,)),
]


def _random_adapter(layer, rank=3, alpha=6.0, seed=0):
    layer.enable_lora(rank, lora_alpha=alpha)
    rng = np.random.default_rng(seed)
    for variable in lora.lora_factors(layer):
        variable.assign(rng.normal(size=variable.shape).astype("float32"))


def _inputs(shape, seed=1):
    return np.random.default_rng(seed).normal(size=(4, *shape)).astype("float32")


def _merged(layer, x):
    return numpy_of(type(layer).call(layer, x))  # Keras' own call: the merged kernel


@pytest.mark.parametrize("equation,in_shape,out_shape", EQUATIONS)
def test_einsum_dense_matches_the_merged_kernel(equation, in_shape, out_shape):
    layer = keras.layers.EinsumDense(equation, out_shape, bias_axes=equation.split("->")[1][-1])
    layer.build((None, *in_shape))
    _random_adapter(layer)
    x = _inputs(in_shape)
    expected = _merged(layer, x)
    assert fast_lora.use_fast_lora(layer)
    np.testing.assert_allclose(numpy_of(layer(x)), expected, rtol=1e-5, atol=1e-4)


def test_dense_and_embedding_match_the_merged_weights():
    dense = keras.layers.Dense(10, activation="gelu")
    dense.build((None, 5, 12))
    embedding = keras.layers.Embedding(50, 8)
    embedding.build((None, 7))
    for layer in (dense, embedding):
        _random_adapter(layer)
    x = _inputs((5, 12))
    tokens = np.random.default_rng(2).integers(0, 50, size=(4, 7)).astype("int32")
    expected = _merged(dense, x), _merged(embedding, tokens)
    assert fast_lora.use_fast_lora(dense) and fast_lora.use_fast_lora(embedding)
    np.testing.assert_allclose(numpy_of(dense(x)), expected[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(numpy_of(embedding(tokens)), expected[1], rtol=1e-5, atol=1e-4)


def test_layers_without_a_fast_path_keep_keras_call():
    assert fast_lora.lora_equations("abc,dc->abd") is None  # the kernel's last axis is contracted
    layer = keras.layers.EinsumDense("abc,dc->abd", (5, 6))
    layer.build((None, 5, 4))
    assert not fast_lora.use_fast_lora(layer)
    reversible = keras.layers.ReversibleEmbedding(50, 8)
    reversible.build((None, 7))
    assert not fast_lora.use_fast_lora(reversible)


def test_equations():
    assert fast_lora.lora_equations("abc,cde->abde") == ("abc,cdf->abdf", "abdf,fe->abde")
    assert fast_lora.lora_equations("...b,bc->...c") == ("...b,ba->...a", "...a,ac->...c")


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(40, 12, name="embed")(tokens)
    h = keras.layers.EinsumDense("abc,cde->abde", (6, 2, 6), name="heads")(h)
    h = keras.layers.Reshape((6, 12))(h)
    h = keras.layers.Dense(12, activation="relu", name="ffn")(h)
    outputs = keras.layers.Dense(1, name="head")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(tokens, outputs)
    for name in ("embed", "heads", "ffn"):
        model.get_layer(name).enable_lora(3)
        model.get_layer(name).trainable = True
    model.get_layer("heads").lora_kernel_b.assign(np.full((3, 6), 0.05, "float32"))
    return model


@pytest.mark.parametrize("jit_compile", JIT_MODES)
def test_training_is_the_same_as_with_merged_kernels(jit_compile):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 40, size=(64, 6)).astype("int32")
    y = rng.normal(size=(64, 1)).astype("float32")
    results = []
    for unmerge in (False, True):
        model = _model()
        if unmerge:
            assert all(fast_lora.use_fast_lora(model.get_layer(n)) for n in ("embed", "heads", "ffn"))
        model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit_compile)  # no Adam: it amplifies rounding
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append((history.history["loss"], [numpy_of(v) for v in model.trainable_variables]))
    initial = [numpy_of(v) for v in _model().trainable_variables]
    assert all(not np.allclose(a, b) for a, b in zip(initial, results[1][1]))  # all trained
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-4)
    for merged, fast in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(fast, merged, rtol=1e-3, atol=1e-5)


def _adapted(equation, in_shape, out_shape):
    """`(model, layer)`: a trainable Dense (so the layer's input gradient
    matters) before a frozen layer with a LoRA adapter."""
    if equation == "dense":
        layer = keras.layers.Dense(out_shape[-1], activation="gelu")
    else:
        layer = keras.layers.EinsumDense(equation, out_shape, bias_axes=equation.split("->")[1][-1])
    inputs = keras.Input(in_shape)
    model = keras.Model(inputs, layer(keras.layers.Dense(in_shape[-1], name="before")(inputs)))
    _random_adapter(layer, alpha=1.5)
    return model, layer


FORMS = [("dense", (5, 12), (5, 10)), *EQUATIONS[1:4],
         ("abc,cd->adb", (5, 12), (10, 5)),  # the adapter's axis is not the output's last
         ("abc,bcd->abd", (5, 12), (5, 4))]  # a kernel axis shared with the input and the output


@pytest.mark.parametrize("jit_compile", JIT_MODES)
@pytest.mark.parametrize("batch", [1, 16], ids=["few-tokens-unmerged", "many-tokens-merged"])
@pytest.mark.parametrize("equation,in_shape,out_shape", FORMS)
def test_both_forms_train_like_keras_merged_lora(equation, in_shape, out_shape, batch, jit_compile):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(32, *in_shape)).astype("float32")
    y = rng.normal(size=(32, *out_shape)).astype("float32")
    results = []
    for fast in (False, True):
        keras.utils.set_random_seed(0)
        model, layer = _adapted(equation, in_shape, out_shape)
        if fast:
            assert fast_lora.use_fast_lora(layer)
        model.compile(keras.optimizers.SGD(0.02), "mse", jit_compile=jit_compile)
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        results.append([numpy_of(v) for v in model.trainable_variables] + [numpy_of(model(x))])
    kernel = internals.base_weight(layer)
    axes = getattr(layer, "equation", "ab,bc->ac").split("->")[0].split(",")
    contracted = [c in axes[0] for c in axes[1]]
    assert fast_lora.prefers_merged(layer, (batch, *in_shape), kernel.shape, contracted) == (batch == 16)
    assert not kernel.trainable and len(results[0]) == 6  # before: 2, layer: bias, A, B; output
    for stock, ours in zip(*results):
        np.testing.assert_allclose(ours, stock, rtol=2e-4, atol=2e-5)


def test_unknown_sizes_choose_the_unmerged_form():
    layer = keras.layers.Dense(10)
    layer.build((None, 12))
    _random_adapter(layer)
    assert fast_lora.prefers_merged(layer, (4096, 12), (12, 10), (True, False))
    assert not fast_lora.prefers_merged(layer, (None, 12), (12, 10), (True, False))


@pytest.mark.parametrize("jit_compile", JIT_MODES)
def test_a_trainable_base_weight_trains_as_in_keras(jit_compile):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 5, 12)).astype("float32")
    y = rng.normal(size=(64, 5, 10)).astype("float32")
    results = []
    for fast in (False, True):
        keras.utils.set_random_seed(0)
        model, layer = _adapted("abc,cde->abde", (5, 12), (5, 2, 5))
        model = keras.Model(model.inputs[0], keras.layers.Reshape((5, 10))(model.outputs[0]))
        internals.base_weight(layer).trainable = True  # unfrozen after enable_lora
        if fast:
            assert fast_lora.use_fast_lora(layer)
        model.compile(keras.optimizers.SGD(0.02), "mse", jit_compile=jit_compile)
        model.fit(x, y, batch_size=64, epochs=2, verbose=0)  # enough tokens for the merged form
        results.append([numpy_of(v) for v in model.trainable_variables])
    assert len(results[0]) == 6  # before: 2, layer: kernel, bias, A, B
    for stock, ours in zip(*results):
        np.testing.assert_allclose(ours, stock, rtol=2e-4, atol=2e-5)


def test_gradient_equations():
    assert fast_lora.gradient_equations("abc,cde->abde") == {
        "forward": "abc,cde->abde", "low": "abc,cdf->abdf", "up": "abdf,fe->abde", "merge": "cdf,fe->cde",
        "dx": "abde,cde->abc", "dx_low": "abdf,cdf->abc", "g": "abde,fe->abdf", "da": "abc,abdf->cdf",
        "db": "abdf,abde->fe", "db_flat": 1,
        "da_plan": (2, (2, 0, 1))}  # dA^T as (d, f, c) from 2 token axes, then (c, d, f)
    assert fast_lora.gradient_equations("btnh,nhd->btd")["da_plan"] == (2, (1, 2, 0))
    assert not fast_lora.gradient_equations("abc,cd->adb")["db_flat"]  # B's axis is not the last
    assert fast_lora.gradient_equations("abc,bcd->abd")["da_plan"] is None  # b: in x, A and the output
    assert fast_lora.gradient_equations("...b,bc->...c") is None  # ellipses: autodiff
    assert fast_lora.gradient_equations("abc,dc->abd") is None  # no adapter equations
    full = fast_lora.gradient_equations("btd,ndh->btnh", "nh")  # Gemma's query, factorization 'full'
    assert (full["low"], full["up"], full["merge"]) == ("btd,da->bta", "bta,anh->btnh", "da,anh->ndh")
    assert full["db_flat"] == 2 and full["da_plan"] == (2, (1, 0))


ACCUMULATED = [  # (p, q -> out, shapes of p and q, plan)
    ("abe,ed->abd", (2, 5, 3), (3, 7), (1, False)),  # Dense: (x A) B
    ("abe,ce->abc", (2, 5, 3), (7, 3), (1, True)),  # Dense: g A^T
    ("btna,ah->btnh", (2, 5, 4, 3), (3, 6), (1, False)),  # Gemma's query, per head: (x A) B
    ("abdf,cdf->abc", (2, 5, 4, 3), (7, 4, 3), (2, True)),  # BERT's query, per head: g A^T
    ("btna,nda->btd", (2, 5, 4, 3), (4, 7, 3), None),  # Gemma's query, per head: g A^T, A's heads lead
    ("abc,cd->adb", (2, 5, 3), (3, 4), None),  # the output is not p's leading axes, then q's
]


@pytest.mark.parametrize("equation,p_shape,q_shape,plan", ACCUMULATED)
def test_sums_accumulate_into_one_product_where_it_is_two_dimensional(equation, p_shape, q_shape, plan):
    assert fast_lora.accumulate_plan(equation) == plan
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=p_shape).astype("float32"), rng.normal(size=q_shape).astype("float32")
    product = np.einsum(equation, p, q)
    total = rng.normal(size=product.shape).astype("float32")
    out = fast_lora._plus_product(keras.ops.convert_to_tensor(total), equation, keras.ops.convert_to_tensor(p),
                                  keras.ops.convert_to_tensor(q))
    np.testing.assert_allclose(numpy_of(out), total + product, rtol=1e-5, atol=1e-5)


FULL_FORMS = [("abc,cde->abde", (5, 12), (5, 3, 4)),  # BERT's query: A (12, r), B (r, 3 * 4)
              ("btd,ndh->btnh", (5, 12), (5, 3, 4)),  # Gemma's query: the heads axis leads the kernel
              ("abc,cd->adb", (5, 12), (10, 5))]  # B's axis is not the output's last


def _full_adapter(layer, rank=3, scale=0.5, seed=0):
    layer.hrp_state = HRPState(rank=rank, phase="main", scale=scale, factorization="full")
    lora.enable_adapter(layer, rank, scale)
    rng = np.random.default_rng(seed)
    for variable in lora.lora_factors(layer):
        variable.assign(rng.normal(size=variable.shape).astype("float32"))


@pytest.mark.parametrize("jit_compile", JIT_MODES)
@pytest.mark.parametrize("batch", [1, 16], ids=["few-tokens-unmerged", "many-tokens-merged"])
@pytest.mark.parametrize("equation,in_shape,out_shape", FULL_FORMS)
def test_full_factorization_trains_like_its_merged_kernel(equation, in_shape, out_shape, batch, jit_compile):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(32, *in_shape)).astype("float32")
    y = rng.normal(size=(32, *out_shape)).astype("float32")
    results = []
    for fast in (False, True):  # Keras' call on the merged `kernel` (autodiff), then the factored one
        keras.utils.set_random_seed(0)
        layer = keras.layers.EinsumDense(equation, out_shape, bias_axes=equation.split("->")[1][-1])
        inputs = keras.Input(in_shape)
        model = keras.Model(inputs, layer(keras.layers.Dense(in_shape[-1])(inputs)))
        _full_adapter(layer)
        a, b = lora.lora_factors(layer)
        assert tuple(a.shape) == (12, 3) and tuple(b.shape) == (3, math.prod(out_shape) // 5)
        if fast:
            assert fast_lora.use_fast_lora(layer)
        model.compile(keras.optimizers.SGD(0.02), "mse", jit_compile=jit_compile)
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        results.append([numpy_of(v) for v in model.trainable_variables] + [numpy_of(model(x))])
    assert len(results[0]) == 6  # Dense: 2, the layer: bias, A, B; the output
    for merged, ours in zip(*results):
        np.testing.assert_allclose(ours, merged, rtol=2e-4, atol=2e-5)


def test_full_factorization_kernel_is_the_merged_weight():
    layer = keras.layers.EinsumDense("btd,ndh->btnh", (5, 3, 4))
    layer.build((None, 5, 12))
    _full_adapter(layer, scale=2.0)
    a, b = (numpy_of(v) for v in lora.lora_factors(layer))
    w = numpy_of(internals.base_weight(layer))  # (heads, hidden, head_dim)
    expected = w + 2.0 * (a @ b).reshape(12, 3, 4).transpose(1, 0, 2)
    np.testing.assert_allclose(numpy_of(layer.kernel), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(layer, keras.layers.EinsumDense) and layer.__class__ is keras.layers.EinsumDense
    config = keras.saving.serialize_keras_object(layer)
    assert (config["module"], config["class_name"]) == ("keras.layers", "EinsumDense")


def _reference(layer, x):
    """`x` times `W + s A @ B` in float32 numpy (Keras' own merged path breaks on
    torch for reduced-precision EinsumDense)."""
    a, b = (numpy_of(v).astype("float32") for v in lora.lora_factors(layer))
    w = numpy_of(internals.base_weight(layer)).astype("float32")
    merged = w + (layer.lora_alpha / layer.lora_rank) * (a.reshape(-1, b.shape[0]) @ b).reshape(w.shape)
    equation = getattr(layer, "equation", "...b,bc->...c")
    return np.einsum(equation, x, merged) + numpy_of(layer.bias).astype("float32")


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "float16"])
def test_reduced_precision_matches_the_merged_weights(policy):
    dense = keras.layers.Dense(10, dtype=policy)
    dense.build((None, 12))
    einsum = keras.layers.EinsumDense("abc,cde->abde", (5, 3, 4), bias_axes="e", dtype=policy)
    einsum.build((None, 5, 12))
    for layer, x in ((dense, _inputs((12,))), (einsum, _inputs((5, 12)))):
        _random_adapter(layer, alpha=0.3)
        assert fast_lora.use_fast_lora(layer)
        got = numpy_of(layer(x))
        assert str(got.dtype) == layer.compute_dtype
        np.testing.assert_allclose(got.astype("float32"), _reference(layer, x), rtol=3e-2, atol=5e-2)
