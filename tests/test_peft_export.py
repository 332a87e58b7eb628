"""export_peft: PEFT's update `(alpha / r) lora_B @ lora_A` equals Keras' merged delta."""

import json
import os

import keras
import numpy as np
import pytest

import keras_hrp
from keras_hrp import internals
from keras_hrp import lora
from keras_hrp import peft_mapping
from keras_hrp.peft_export import PREFIX
from keras_hrp.peft_files import read_safetensors
from keras_hrp.peft_mapping import peft_pair
from tests.helpers import bert_classifier
from tests.helpers import numpy_of

pytest.importorskip("keras_hub", reason="needs the [hub] extra (keras-hub)")
TARGETS = ["query", "value", "attention_output", "feedforward_output_dense", "token_embedding"]


def _delta_as_in_out(layer):
    """Keras' merged delta as an `(in, out)` matrix (a torch weight transposed)."""
    if isinstance(layer, keras.layers.Embedding):
        return numpy_of(layer.embeddings) - numpy_of(internals.base_weight(layer))
    delta = numpy_of(layer.kernel) - numpy_of(internals.base_weight(layer))
    inputs, kernel = getattr(layer, "equation", "ab,bc->ac").split("->")[0].split(",")
    contracted = [kernel.index(c) for c in inputs if c in kernel]
    outputs = [i for i in range(delta.ndim) if i not in contracted]
    rows = int(np.prod([delta.shape[i] for i in contracted]))
    return np.transpose(delta, contracted + outputs).reshape(rows, -1)


@pytest.mark.parametrize("factorization", ["per_head", "full"])
def test_exported_updates_equal_the_keras_deltas(factorization, tmp_path):
    task, *_ = bert_classifier(dropout=0.0)
    layers = keras_hrp.enable_hrp(task, rank=2, target_layer_names=TARGETS, factorization=factorization,
                                  lora_alpha=3.0)
    rng = np.random.default_rng(0)
    for layer in layers:
        b = lora.lora_factors(layer)[1]
        b.assign(rng.normal(size=b.shape).astype("float32"))
    config = keras_hrp.export_peft(task, tmp_path, base_model_name_or_path="tiny-bert")
    tensors = read_safetensors(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert json.load(open(os.path.join(tmp_path, "adapter_config.json"))) == config
    assert config["bias"] == "lora_only" and config["modules_to_save"] == ["classifier"]
    heads = 2 if factorization == "per_head" else 1  # per head: rank heads * r, block structure
    ranks = {m: config["rank_pattern"].get(m, config["r"]) for m in config["target_modules"]}
    assert len(ranks) == 9 and all(r == (2 * heads if ".self." in m else 2) for m, r in ranks.items())
    for layer in layers:
        module = PREFIX + peft_mapping.module_name(peft_mapping.BERT, layer.path)
        name = module[len(PREFIX):]
        r = config["rank_pattern"].get(name, config["r"])
        alpha = config["alpha_pattern"].get(name, config["lora_alpha"])
        if isinstance(layer, keras.layers.Embedding):
            update = (tensors[f"{module}.lora_embedding_B"] @ tensors[f"{module}.lora_embedding_A"]).T
        else:
            update = (tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"]).T
            np.testing.assert_array_equal(tensors[f"{module}.base_layer.bias"], numpy_of(layer.bias).reshape(-1))
        np.testing.assert_allclose(update * alpha / r, _delta_as_in_out(layer), atol=1e-5)
    head = task.get_layer("logits")
    np.testing.assert_array_equal(tensors[PREFIX + "classifier.weight"], numpy_of(head.kernel).T)


def test_peft_pair_of_a_per_head_adapter_is_block_structured():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 3, 2)), rng.normal(size=(2, 4))  # A (hidden, heads, r), B (r, head_dim)
    lora_a, lora_b = peft_pair(a, b, (6, 3, 4), [0, 1], [2], (0,))
    assert lora_a.shape == (6, 6) and lora_b.shape == (12, 6)  # rank heads * r
    np.testing.assert_allclose((lora_b @ lora_a).T, np.einsum("chk,ke->che", a, b).reshape(6, 12))
    assert not np.any(lora_b[:4, 2:])  # head 0's outputs use head 0's ranks only


def test_what_cannot_be_exported_is_listed(tmp_path):
    task, *_ = bert_classifier(dropout=0.0)
    keras_hrp.enable_hrp(task, rank=2, target_layer_names=["query"])
    task.backbone.get_layer("embeddings_layer_norm").trainable = True  # trained, no PEFT place
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=(
            "(?s)export_peft: model .* cannot be exported as it is .*"
            "embeddings_layer_norm: trained weights without a PEFT place.*"
            "query: `base_model` has no layer of the same shape for bert.encoder.layer.0.attention.self.query")):
        keras_hrp.export_peft(task, tmp_path, base_model=other)
    assert not os.listdir(tmp_path)  # nothing written
    with pytest.raises(ValueError, match="`family` must be one of .*family='gpt9'"):
        keras_hrp.export_peft(task, tmp_path, family="gpt9")


@pytest.mark.parametrize("exported", ["backbone", "task"])
def test_names_follow_what_is_exported_and_import_takes_both(exported, tmp_path):
    """A backbone attaches to the bare BertModel (`encoder.layer.…`), a task
    to BertForSequenceClassification (`bert.encoder.…`); task_type says so."""
    keras.utils.set_random_seed(0)
    task, x, *_ = bert_classifier(dropout=0.0)
    keras_hrp.enable_hrp(task, rank=2)
    rng = np.random.default_rng(0)
    for layer in keras_hrp.hrp_layers(task):
        for variable in lora.lora_factors(layer):
            variable.assign(rng.normal(scale=0.1, size=variable.shape).astype("float32"))
    model = task.backbone if exported == "backbone" else task
    config = keras_hrp.export_peft(model, str(tmp_path))
    names = sorted(read_safetensors(os.path.join(tmp_path, "adapter_model.safetensors")))
    first = PREFIX + ("encoder.layer.0" if exported == "backbone" else "bert.encoder.layer.0")
    assert names and all(name.startswith(PREFIX) for name in names)
    assert any(name.startswith(first + ".attention.self.query.lora_A") for name in names), names
    assert config["task_type"] == {"backbone": "FEATURE_EXTRACTION", "task": "SEQ_CLS"}[exported]
    assert (config["modules_to_save"] == ["classifier"]) == (exported == "task")
    keras.utils.set_random_seed(0)
    fresh, *_ = bert_classifier(dropout=0.0)  # the same base weights and head
    target = fresh.backbone if exported == "backbone" else fresh
    keras_hrp.import_peft(target, str(tmp_path))
    def outputs(m):
        return numpy_of(m(x)["sequence_output"]) if exported == "backbone" else m.predict(x, verbose=0)

    np.testing.assert_allclose(outputs(target), outputs(model), rtol=1e-4, atol=1e-5)
    assert len(keras_hrp.adapters.lora_layers(target)) == len(keras_hrp.hrp_layers(task))


def test_a_preheating_model_is_refused_unless_asked(tmp_path):
    task, *_ = bert_classifier(dropout=0.0)
    keras_hrp.enable_hrp(task, rank=2, preheat_rank=6, target_layer_names=["query", "value"])
    with pytest.raises(ValueError, match=r"export_peft.*4 HRP layers .* preheat phase \(rank 6.*"
                                         r"allow_preheating=True.*Received: allow_preheating=False"):
        keras_hrp.export_peft(task, tmp_path / "refused")
    assert not os.path.exists(tmp_path / "refused")  # nothing written
    with pytest.warns(UserWarning, match="preheat phase.*exporting the preheat's adapter as asked"):
        config = keras_hrp.export_peft(task, tmp_path / "asked", allow_preheating=True)
    assert config["r"] == 2 * 6  # per head: 2 heads of the preheat rank 6
