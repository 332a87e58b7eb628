"""import_peft: PEFT adapter directories load into KerasHub models, and
export_peft of residual inits exports against the pretrained weights."""

import json
import math
import os

import keras
import numpy as np
import pytest

import keras_hrp
from keras_hrp import internals
from keras_hrp import lora
from keras_hrp import peft_files
from keras_hrp import peft_mapping
from tests.helpers import bert_classifier
from tests.helpers import numpy_of

pytest.importorskip("keras_hub", reason="needs the [hub] extra (keras-hub)")
TARGETS = ["query", "value", "attention_output", "feedforward_output_dense", "token_embedding"]
PREFIX = peft_files.PREFIX


def _twins():
    """Two tiny BERT classifiers with the same weights, and inputs."""
    first, x, *_ = bert_classifier(dropout=0.0)
    second, *_ = bert_classifier(dropout=0.0)
    second.set_weights(first.get_weights())
    return first, second, x


def _layer(model, suffix):
    return next(layer for layer in internals.all_layers(model) if (layer.path or "").endswith(suffix))


def _randomize_factors(layers, seed=0):
    rng = np.random.default_rng(seed)
    for layer in layers:
        for v in lora.lora_factors(layer):
            v.assign(rng.normal(scale=0.3, size=v.shape).astype("float32"))


@pytest.mark.parametrize("factorization", ["per_head", "full"])
def test_export_then_import_gives_the_same_outputs(factorization, tmp_path):
    source, target, x = _twins()
    layers = keras_hrp.enable_hrp(source, rank=2, target_layer_names=TARGETS, factorization=factorization,
                                  lora_alpha=3.0)
    _randomize_factors(layers)
    head = source.get_layer("logits")
    head.kernel.assign(head.kernel + 0.5)
    keras_hrp.export_peft(source, tmp_path)
    imported = keras_hrp.import_peft(target, tmp_path)
    assert sorted(imported) == sorted(layer.path for layer in layers)
    np.testing.assert_allclose(numpy_of(target.predict(x, verbose=0)), numpy_of(source.predict(x, verbose=0)),
                               atol=2e-5)
    query = _layer(target, "transformer_layer_0/self_attention_layer/query")
    assert lora.factorization_of(query) == "full"
    assert query.lora_rank == (4 if factorization == "per_head" else 2)  # per head: heads * r
    assert not internals.base_weight(query).trainable and query.trainable
    assert not _layer(target, "transformer_layer_0/self_attention_layer_norm").trainable  # frozen as PEFT's base


def _write(directory, config, tensors):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, peft_files.CONFIG), "w") as f:
        json.dump(config, f)
    with open(os.path.join(directory, peft_files.WEIGHTS), "wb") as f:
        f.write(peft_files.safetensors_bytes({PREFIX + k: v for k, v in tensors.items()}))


def _in_out_delta(layer):
    delta = numpy_of(layer.kernel) - numpy_of(internals.base_weight(layer))
    contracted = list(peft_mapping.contracted_axes(getattr(layer, "equation", None)))
    outputs = [i for i in range(delta.ndim) if i not in contracted]
    return np.transpose(delta, contracted + outputs).reshape(math.prod(delta.shape[i] for i in contracted), -1)


def test_ranks_alphas_rslora_and_biases_follow_the_config(tmp_path):
    _, target, _ = _twins()
    rng = np.random.default_rng(2)
    query = "bert.encoder.layer.0.attention.self.query"
    dense = "bert.encoder.layer.1.output.dense"
    tensors = {f"{query}.lora_A.weight": rng.normal(size=(3, 16)), f"{query}.lora_B.weight": rng.normal(size=(16, 3)),
               f"{dense}.lora_A.weight": rng.normal(size=(5, 32)), f"{dense}.lora_B.weight": rng.normal(size=(16, 5)),
               f"{dense}.base_layer.bias": rng.normal(size=(16,))}
    config = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "use_rslora": True, "bias": "lora_only",
              "rank_pattern": {"output.dense": 5}, "alpha_pattern": {"layer.1.output.dense": 10},
              "target_modules": [query, dense]}
    _write(tmp_path, config, {k: v.astype("float32") for k, v in tensors.items()})
    paths = keras_hrp.import_peft(target, tmp_path)
    by_path = {layer.path: layer for layer in internals.all_layers(target)}
    layers = {peft_mapping.module_name(peft_mapping.BERT, p): by_path[p] for p in paths}
    assert set(layers) == {query, dense}
    for module, rank, alpha in ((query, 3, 6), (dense, 5, 10)):
        layer = layers[module]
        assert layer.lora_rank == rank
        np.testing.assert_allclose(lora.lora_scale(layer), alpha / math.sqrt(rank), rtol=1e-6)  # rsLoRA
        expected = alpha / math.sqrt(rank) * (tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"]).T
        np.testing.assert_allclose(_in_out_delta(layer), expected, atol=1e-4)
    np.testing.assert_allclose(numpy_of(layers[dense].bias), tensors[f"{dense}.base_layer.bias"], atol=1e-6)


def test_a_mismatch_lists_every_module_and_changes_nothing(tmp_path):
    _, target, x = _twins()
    before = [numpy_of(w) for w in target.weights]
    query = "bert.encoder.layer.0.attention.self.query"
    tensors = {f"{query}.lora_A.weight": np.ones((2, 15)), f"{query}.lora_B.weight": np.ones((16, 2)),
               "bert.encoder.layer.9.attention.self.value.lora_A.weight": np.ones((2, 16)),
               "bert.encoder.layer.9.attention.self.value.lora_B.weight": np.ones((16, 2))}
    _write(tmp_path, {"peft_type": "LORA", "r": 2, "lora_alpha": 2}, {k: v.astype("float32") for k, v in tensors.items()})
    with pytest.raises(ValueError) as error:
        keras_hrp.import_peft(target, tmp_path)
    message = str(error.value)
    assert "import_peft" in message and "(2 problems)" in message
    assert "layer.9.attention.self.value: no layer" in message and "lora_A (2, 15)" in message
    assert not any(getattr(layer, "lora_enabled", False) for layer in internals.all_layers(target))
    for old, new in zip(before, target.weights):
        np.testing.assert_array_equal(old, numpy_of(new))


def test_unsupported_adapters_are_refused(tmp_path):
    _, target, _ = _twins()
    _write(tmp_path, {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "use_dora": True}, {})
    with pytest.raises(ValueError, match="use_dora"):
        keras_hrp.import_peft(target, tmp_path)
    os.remove(os.path.join(tmp_path, peft_files.WEIGHTS))
    _write(tmp_path / "bin", {"peft_type": "LORA", "r": 2}, {})
    os.remove(os.path.join(tmp_path / "bin", peft_files.WEIGHTS))
    with pytest.raises(ValueError, match="adapter_model.bin"):
        keras_hrp.import_peft(target, tmp_path / "bin")


@pytest.mark.parametrize("record", [True, False])
def test_residual_inits_export_against_the_pretrained_weights(record, tmp_path):
    source, target, x = _twins()
    pretrained, *_ = bert_classifier(dropout=0.0)
    pretrained.set_weights(source.get_weights())
    layers = keras_hrp.enable_hrp(source, rank=2, target_layer_names=TARGETS[:3], factorization="full",
                                  lora_alpha=4.0)
    keras_hrp.initialize_lora(source, "pissa")
    _randomize_factors(layers, seed=3)  # training moved the adapter on
    query = _layer(source, "transformer_layer_0/self_attention_layer/query")
    original = _layer(pretrained, "transformer_layer_0/self_attention_layer/query").kernel
    assert np.abs(numpy_of(internals.base_weight(query)) - numpy_of(original)).max() > 1e-3  # PiSSA moved W
    if not record:  # as in a new process: only the pretrained model tells
        for layer in layers:
            del layer.hrp_moved_factors
    config = keras_hrp.export_peft(source, tmp_path, base_model=None if record else pretrained)
    assert config["r"] == 4  # the adapter's rank plus the moved part's
    keras_hrp.import_peft(target, tmp_path)
    np.testing.assert_allclose(numpy_of(target.predict(x, verbose=0)), numpy_of(source.predict(x, verbose=0)),
                               atol=2e-5)


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_decoder_tables_round_trip_every_linear_layer(family, tmp_path):
    from tests.helpers import gemma_causal_lm
    from tests.helpers import llama_causal_lm

    make = {"gemma": gemma_causal_lm, "llama": llama_causal_lm}[family]
    source, x, *_ = make()
    target, *_ = make()
    target.set_weights(source.get_weights())
    layers = keras_hrp.enable_hrp(source, rank=2, target_layer_names=list(keras_hrp.hub.LINEAR_LAYER_NAMES[family]),
                                  lora_alpha=4.0)
    _randomize_factors(layers)
    config = keras_hrp.export_peft(source, tmp_path, family=family)
    modules = config["target_modules"]
    assert len(modules) == len(layers) == 14  # 2 blocks x q, k, v, o, gate, up, down
    assert {m.rsplit(".", 1)[1] for m in modules} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"}
    keras_hrp.import_peft(target, tmp_path, family=family)
    np.testing.assert_allclose(numpy_of(target.predict(x, verbose=0)), numpy_of(source.predict(x, verbose=0)),
                               atol=1e-4)
