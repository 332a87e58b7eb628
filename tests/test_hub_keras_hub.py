"""enable_hrp + HRPCallback on tiny KerasHub models built from config."""

import os

import keras
import numpy as np
import pytest

import keras_hrp
from keras_hrp import internals
from keras_hrp import lora
from tests.helpers import SEQ
from tests.helpers import VOCAB
from tests.helpers import bert_classifier
from tests.helpers import gemma_causal_lm
from tests.helpers import gpt2_causal_lm
from tests.helpers import llama_causal_lm
from tests.helpers import numpy_of

keras_hub = pytest.importorskip("keras_hub", reason="needs the [hub] extra (keras-hub)")

class _Probe(keras.callbacks.Callback):
    def __init__(self, hrp, x):
        super().__init__()
        self.hrp, self.x, self.after = hrp, x, None

    def on_train_batch_end(self, batch, logs=None):
        if self.hrp.report is not None and self.after is None:
            self.after = self.model.predict(self.x, verbose=0)


@pytest.mark.parametrize(
    "make", [bert_classifier, gemma_causal_lm, llama_causal_lm, gpt2_causal_lm],
    ids=["bert", "gemma", "llama", "gpt2"],
)
def test_hrp_on_keras_hub_task(make):
    task, x, y, loss = make()
    layers = keras_hrp.enable_hrp(task, rank=2, preheat_rank=6, rank_allocation="uniform")
    assert len(layers) == 4 and {l.name for l in layers} == {"query", "value"}
    assert all(layer.lora_rank == 6 for layer in layers)
    backbone_trainable = [v.path for v in task.backbone.trainable_variables]
    assert all(("lora" in p or p.endswith("bias")) for p in backbone_trainable)
    task.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)
    before = task.predict(x, verbose=0)
    hrp = keras_hrp.HRPCallback(3, verbose=0)
    probe = _Probe(hrp, x)
    history = keras.Model.fit(task, x, y, batch_size=16, epochs=2, callbacks=[hrp, probe], verbose=0)
    np.testing.assert_allclose(probe.after, before, rtol=1e-4, atol=1e-4)
    assert not hrp.report.fallbacks and len(hrp.report) == 4
    for layer in layers:
        a, b = lora.lora_factors(layer)
        assert layer.hrp_state.phase == "main" and a.shape[-1] == 2 and b.shape[0] == 2
    assert np.all(np.isfinite(history.history["loss"]))


def test_task_fit_with_tf_data_pipeline():
    task, x, y, loss = bert_classifier()
    keras_hrp.enable_hrp(task, rank=2, preheat_rank=6, rank_allocation="uniform")
    task.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)
    hrp = keras_hrp.HRPCallback(2, verbose=0)
    task.fit(x=x, y=y, batch_size=16, epochs=1, callbacks=[hrp], verbose=0)
    assert hrp.switch_step == 2 and all(l.lora_rank == 2 for l in keras_hrp.hrp_layers(task))


def test_keras_hub_lora_weights_round_trip_after_switch(tmp_path):
    task, x, y, loss = bert_classifier()
    base = task.backbone.get_weights()
    keras_hrp.enable_hrp(task, rank=2, preheat_rank=6, rank_allocation="uniform")
    task.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)
    keras.Model.fit(task, x, y, batch_size=16, epochs=2, verbose=0,
                    callbacks=[keras_hrp.HRPCallback(2, verbose=0)])
    path = os.path.join(tmp_path, "hrp.lora.h5")
    task.backbone.save_lora_weights(path)

    fresh = keras_hub.models.BertBackbone.from_config(task.backbone.get_config())
    fresh.set_weights(base)
    fresh.load_lora_weights(path)
    trained = {l.path: l for l in keras_hrp.hrp_layers(task.backbone)}
    for layer in internals.all_layers(fresh):
        if layer.path in trained:  # KerasHub's file holds A and B, not the biases it trains
            assert layer.lora_rank == 2
            np.testing.assert_array_equal(
                numpy_of(layer.lora_kernel_a), numpy_of(trained[layer.path].lora_kernel_a)
            )
            layer.bias.assign(trained[layer.path].bias)
    inputs = {k: x[k] for k in ("token_ids", "padding_mask", "segment_ids")}
    np.testing.assert_allclose(
        numpy_of(fresh(inputs)["sequence_output"]),
        numpy_of(task.backbone(inputs)["sequence_output"]),
        rtol=1e-5, atol=1e-5,
    )


def test_reversible_embedding_target():
    task, x, y, loss = gemma_causal_lm()
    (layer,) = keras_hrp.enable_hrp(task, rank=2, preheat_rank=6, target_layer_names=["token_embedding"])
    assert type(layer).__name__ == "ReversibleEmbedding" and layer.lora_rank == 6
    task.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)
    before = task.predict(x, verbose=0)
    hrp = keras_hrp.HRPCallback(2, verbose=0)
    probe = _Probe(hrp, x)
    keras.Model.fit(task, x, y, batch_size=16, epochs=1, callbacks=[hrp, probe], verbose=0)
    np.testing.assert_allclose(probe.after, before, rtol=1e-4, atol=1e-4)
    assert tuple(layer.lora_embeddings_a.shape) == (VOCAB, 2) and not hrp.report.fallbacks


def test_generate_after_the_switch_uses_the_current_adapters():
    task, x, y, loss = gemma_causal_lm()
    keras_hrp.enable_hrp(task, rank=2, preheat_rank=6)
    task.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)
    mask = np.arange(SEQ)[None, :] < 3
    prompt = {"token_ids": x["token_ids"][:2] * mask, "padding_mask": np.repeat(mask, 2, axis=0)}
    task.generate(prompt, max_length=SEQ, stop_token_ids=None)  # compiles (and caches) generation at the preheat rank
    keras.Model.fit(task, x, y, batch_size=16, epochs=1, verbose=0,
                    callbacks=[keras_hrp.HRPCallback(2, verbose=0)])
    rng = np.random.default_rng(0)
    for layer in keras_hrp.hrp_layers(task):  # adapters that change what is generated
        b = lora.lora_factors(layer)[1]
        b.assign(rng.normal(size=b.shape).astype("float32") * 3.0)
    generated = task.generate(prompt, max_length=SEQ, stop_token_ids=None)
    task.generate_function = None  # a freshly traced generation, for reference
    expected = task.generate(prompt, max_length=SEQ, stop_token_ids=None)
    np.testing.assert_array_equal(generated["token_ids"], expected["token_ids"])
    for layer in keras_hrp.hrp_layers(task):
        lora.lora_factors(layer)[1].assign(np.zeros(lora.lora_factors(layer)[1].shape, "float32"))
    task.generate_function = None
    unadapted = task.generate(prompt, max_length=SEQ, stop_token_ids=None)
    assert not np.array_equal(unadapted["token_ids"], expected["token_ids"])  # the check can fail


def test_keras_hub_lora_files_refused_while_preheating(tmp_path):
    task, x, y, loss = bert_classifier()
    keras_hrp.enable_hrp(task, rank=2, preheat_rank=6, rank_allocation="uniform")
    path = os.path.join(tmp_path, "pre.lora.h5")
    with pytest.raises(ValueError, match="save_lora_weights of 'bert_backbone.*': HRP layers are still preheating.*preheating=\\["):
        task.backbone.save_lora_weights(path)
    assert not os.path.exists(path)
    task.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)
    keras.Model.fit(task, x, y, batch_size=16, epochs=1, verbose=0,
                    callbacks=[keras_hrp.HRPCallback(2, verbose=0)])
    task.backbone.save_lora_weights(path)  # after the switch: one rank, a valid file
    fresh, *_ = bert_classifier()
    keras_hrp.enable_hrp(fresh, rank=2, preheat_rank=6)
    with pytest.raises(ValueError, match="load_lora_weights of .*still preheating"):
        fresh.backbone.load_lora_weights(path)


@pytest.mark.parametrize(
    "make,family", [(bert_classifier, "bert"), (gemma_causal_lm, "gemma"), (llama_causal_lm, "llama")],
    ids=["bert", "gemma", "llama"],
)
def test_every_linear_layer_unmerged_equals_stock_merged_lora(make, family):
    names = keras_hrp.hub.LINEAR_LAYER_NAMES[family]
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    task, x, y, loss = make()
    layers = keras_hrp.enable_hrp(task, rank=2, target_layer_names=list(names))  # plain LoRA
    assert {layer.name for layer in layers} == set(names) and len(layers) == 2 * len(names)
    assert all(layer.hrp_state.phase == "main" and layer.lora_rank == 2 for layer in layers)
    rng = np.random.default_rng(0)
    for layer in layers:
        b = lora.lora_factors(layer)[1]
        b.assign(rng.normal(size=b.shape).astype("float32") * 0.1)
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    stock, *_ = make()  # the same weights, Keras' own (merged) LoRA
    stock_layers = {layer.path: layer for layer in internals.all_layers(stock)}
    for layer in layers:
        twin = stock_layers[layer.path]
        twin.enable_lora(2, lora_alpha=layer.lora_alpha)
        for mine, theirs in zip(lora.lora_factors(layer), lora.lora_factors(twin)):
            theirs.assign(numpy_of(mine))  # a copy: JAX may donate a shared buffer
    np.testing.assert_allclose(task.predict(x, verbose=0), stock.predict(x, verbose=0), rtol=1e-4, atol=1e-4)
    task.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)
    history = keras.Model.fit(task, x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_full_factorization_on_gemma_every_linear_layer(tmp_path):
    """Gemma's query kernel is (heads, hidden, head_dim): the adapter is
    hidden -> r -> heads * head_dim; KerasHub's own file refuses it, adapter
    files and `.keras` files (in stock Keras too) carry it."""
    names = list(keras_hrp.hub.LINEAR_LAYER_NAMES["gemma"])
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    task, x, y, loss = gemma_causal_lm()
    base = {v.path: numpy_of(v) for v in task.weights}
    layers = keras_hrp.enable_hrp(task, rank=2, preheat_rank=12, target_layer_names=names,
                                  factorization="full", rank_allocation="uniform")
    query = next(layer for layer in layers if layer.name == "query")
    assert tuple(query.lora_kernel_a.shape) == (16, 12) and tuple(query.lora_kernel_b.shape) == (12, 16)
    task.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)
    hrp = keras_hrp.HRPCallback(2, verbose=0)
    keras.Model.fit(task, x, y, batch_size=16, epochs=1, verbose=0, callbacks=[hrp])
    assert not hrp.report.fallbacks and all(layer.lora_rank == 2 for layer in layers)
    with pytest.raises(ValueError, match="save_lora_weights of .*factorization 'full'.*full=\\["):
        task.backbone.save_lora_weights(str(tmp_path / "hub.lora.h5"))
    expected = task.predict(x, verbose=0)
    adapters = str(tmp_path / "gemma.adapters.npz")
    keras_hrp.save_adapters(task, adapters)
    keras.backend.clear_session()
    keras.utils.set_random_seed(1)
    fresh, *_ = gemma_causal_lm()
    for v in fresh.weights:
        v.assign(base[v.path])
    keras_hrp.load_adapters(fresh, adapters)
    assert {lora.factorization_of(layer) for layer in keras_hrp.hrp_layers(fresh)} == {"full"}
    np.testing.assert_allclose(fresh.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-5)


def test_keras_hub_lora_files_refuse_unequal_auto_ranks(tmp_path):
    probe = keras_hrp.enable_hrp(bert_classifier()[0], rank=2, preheat_rank=6)
    budget = 2 * sum(sum(lora.weight_matrix_shape(layer)) for layer in probe)  # rank 2 on each
    task, *_ = bert_classifier()
    layers = keras_hrp.enable_hrp(task, rank="auto", preheat_rank=6, rank_budget=budget)
    rng = np.random.default_rng(0)
    for i, layer in enumerate(layers):
        b = lora.lora_factors(layer)[1]
        value = rng.normal(size=b.shape).astype("float32")
        b.assign(value * (np.arange(6)[:, None] < 1) if i == 0 else value)  # one rank-1 delta
    keras_hrp.switch_to_main(task)
    assert len({layer.lora_rank for layer in layers}) > 1
    with pytest.raises(ValueError, match='save_lora_weights of .*different ranks \\(spread from their spectra\\).*ranks=\\{'):
        task.backbone.save_lora_weights(str(tmp_path / "hub.lora.h5"))
