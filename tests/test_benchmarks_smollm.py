"""The decoder recipe's model loader (`benchmarks/common/smollm.py`): a GGUF
file written here with gguf's own writer, and the embedded SmolLM2 itself."""

import os
import sys

import keras
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="needs gguf (requirements-ci.txt) to read GGUF files")
pytest.importorskip("keras_hub", reason="needs the [hub] extra (keras-hub)")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from common import smollm  # noqa: E402

Q4_1, Q8_0, F32 = (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0,
                   gguf.GGMLQuantizationType.F32)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=64)
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ġ", "Ġa", *"abcdefghijklmnopqrstuvwxyz"]


def _permute_rope(weight, heads):
    """llama.cpp's row order for q / k (the inverse of `unpermute_rope`)."""
    out, fan_in = weight.shape
    return weight.reshape(heads, 2, out // heads // 2, fan_in).swapaxes(1, 2).reshape(out, fan_in)


def _round_trip(weight, kind):
    if kind == F32:
        return weight
    return gguf.quants.dequantize(gguf.quants.quantize(weight, kind), kind).astype(np.float32)


def _tiny_gguf(path):
    """Writes a tiny llama GGUF (Q4_1 projections, Q8_0 embedding, F32 norms);
    returns what its tensors dequantize to, in Hugging Face's row order."""
    rng = np.random.default_rng(0)
    h, head_dim = TINY["hidden"], TINY["hidden"] // TINY["heads"]
    shapes = {"token_embd.weight": ((len(TOKENS), h), Q8_0), "output_norm.weight": ((h,), F32)}
    for i in range(TINY["layers"]):
        shapes.update({
            f"blk.{i}.attn_q.weight": ((h, h), Q4_1),
            f"blk.{i}.attn_k.weight": ((TINY["kv_heads"] * head_dim, h), Q4_1),
            f"blk.{i}.attn_v.weight": ((TINY["kv_heads"] * head_dim, h), Q4_1),
            f"blk.{i}.attn_output.weight": ((h, h), Q4_1),
            f"blk.{i}.ffn_gate.weight": ((TINY["ffn"], h), Q4_1),
            f"blk.{i}.ffn_up.weight": ((TINY["ffn"], h), Q4_1),
            f"blk.{i}.ffn_down.weight": ((h, TINY["ffn"]), Q4_1),
            f"blk.{i}.attn_norm.weight": ((h,), F32),
            f"blk.{i}.ffn_norm.weight": ((h,), F32),
        })
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(TINY["layers"])
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_merges(["Ġ a"])
    expected = {}
    for name, (shape, kind) in shapes.items():
        weight = (rng.normal(size=shape) * (1.0 if "norm" in name else 0.1)).astype(np.float32)
        stored = weight
        if "attn_q" in name or "attn_k" in name:
            stored = _permute_rope(weight, TINY["heads"] if "attn_q" in name else TINY["kv_heads"])
        if kind == F32:
            writer.add_tensor(name, stored)
        else:
            writer.add_tensor(name, gguf.quants.quantize(stored, kind), raw_dtype=kind)
        expected[name] = _round_trip(weight, kind)  # quantized row by row: the order commutes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_rope_rows_return_to_hugging_face_order():
    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        permuted = _permute_rope(weight, heads)
        assert not np.array_equal(permuted, weight)
        np.testing.assert_array_equal(smollm.unpermute_rope(permuted, heads), weight)


def test_a_tiny_gguf_dequantizes_and_loads_into_keras_hub(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    expected = _tiny_gguf(path)
    metadata, tensors = smollm.read_gguf(path)
    assert sorted(tensors) == sorted(expected)
    for name, value in expected.items():
        assert tensors[name].shape == value.shape, name
        np.testing.assert_allclose(tensors[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
    lm = smollm.causal_lm(str(tmp_path / "cache"), sequence_length=16, path=path)
    assert os.listdir(tmp_path / "cache")  # the dequantized weights, cached
    backbone = lm.backbone
    h, head_dim = TINY["hidden"], TINY["hidden"] // TINY["heads"]
    variables = {v.path: keras.ops.convert_to_numpy(v) for v in backbone.weights}
    np.testing.assert_allclose(variables["transformer_layer_1/self_attention/query/kernel"],
                               expected["blk.1.attn_q.weight"].T.reshape(h, TINY["heads"], head_dim), atol=1e-6)
    np.testing.assert_allclose(variables["transformer_layer_0/feedforward_output_dense/kernel"],
                               expected["blk.0.ffn_down.weight"].T, atol=1e-6)
    np.testing.assert_allclose(variables["token_embedding/embeddings"], expected["token_embd.weight"], atol=1e-6)
    assert "token_embedding/reverse_embeddings" not in variables  # tied, as the file has no output.weight
    again = smollm.causal_lm(str(tmp_path / "cache"), sequence_length=16, path=path)  # from the cache
    x = {"token_ids": np.array([[1, 5, 6, 2]]), "padding_mask": np.ones((1, 4), bool)}
    np.testing.assert_allclose(keras.ops.convert_to_numpy(again(x)), keras.ops.convert_to_numpy(lm(x)), atol=1e-5)
    tokens = lm.preprocessor.tokenizer("a ab")
    assert [TOKENS[int(t)] for t in keras.ops.convert_to_numpy(tokens)] == ["a", "Ġa", "b"]


try:
    REAL = smollm.gguf_path()
except smollm.SetupError:
    REAL = None


def _response_nll(lm, x, y, weight):
    """Teacher-forced NLL of `y` in nats per weighted token, in float64."""
    logits = keras.ops.convert_to_numpy(lm(x)).astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return -(np.take_along_axis(logp, y[..., None], -1)[..., 0] * weight).sum() / weight.sum()


@pytest.mark.skipif(REAL is None, reason=f"the decoder ({smollm.PACKAGE}) is not installed")
@pytest.mark.skipif(os.environ.get("KERAS_BACKEND") == "jax",
                    reason="on JAX the decoder recipe's real run loads, scores and generates (test_examples)")
def test_the_real_model_predicts_english_and_answers(tmp_path_factory):
    cache = os.environ.get("KERAS_HRP_CACHE", str(tmp_path_factory.mktemp("smollm")))
    lm = smollm.causal_lm(cache, sequence_length=24)
    sentences = ["The sun rises in the east and sets in the west.",
                 "She opened the door and walked into the room."]
    lm.preprocessor.add_end_token = False
    x, y, w = lm.preprocessor(sentences)
    nll = _response_nll(lm, x, np.asarray(y), np.asarray(w, np.float64))
    assert 1.0 < nll < 3.2, nll  # measured 2.29 nats/token on JAX (a uniform guess: 10.8)
    lm.compile(sampler="greedy")
    answer = lm.generate(smollm.chat_prompt("What is the capital of France?"), max_length=24, strip_prompt=True)
    assert "Paris" in answer, answer


@pytest.mark.skipif(REAL is None, reason=f"the decoder ({smollm.PACKAGE}) is not installed")
@pytest.mark.skipif(os.environ.get("KERAS_BACKEND") != "tensorflow",
                    reason="JAX and torch fine-tune the real model through the recipe (test_examples)")
def test_a_short_real_fine_tune_lowers_the_held_out_loss_on_tensorflow(tmp_path_factory):
    """The recipe's steps on TensorFlow: HRP on every linear layer, six steps
    (two preheating), eagerly: tracing the 30 blocks' train, test and
    generate functions takes minutes on 2 cores, past the CI budget."""
    import keras_hrp
    from common import instructions

    cache = os.environ.get("KERAS_HRP_CACHE", str(tmp_path_factory.mktemp("smollm")))
    train, _, test = instructions.split(instructions.reviews(cache), 0, val_size=0, test_size=24)
    tokenizer = smollm.tokenizer(smollm.read_metadata())
    x, y, weight = instructions.training_arrays(tokenizer, train, 40, 6, 4, 0)
    test_x, test_y, test_weight, _ = instructions.encode(tokenizer, test, 40)
    keras.utils.set_random_seed(0)
    lm = smollm.causal_lm(cache, sequence_length=40)
    before = _response_nll(lm, test_x, test_y, test_weight)
    layers = keras_hrp.enable_hrp(lm.backbone, rank=8, preheat_rank=32,
                                  target_layer_names=keras_hrp.hub.LINEAR_LAYER_NAMES["llama"])
    budget = 8 * sum(sum(keras_hrp.lora.weight_matrix_shape(layer)) for layer in layers)
    lm.compile(optimizer=keras.optimizers.Adam(2e-4), loss=instructions.response_loss(), run_eagerly=True)
    callback = keras_hrp.HRPCallback(2, verbose=0)
    keras.Model.fit(lm, x, y, sample_weight=weight, batch_size=4, callbacks=[callback], verbose=0)
    after = _response_nll(lm, test_x, test_y, test_weight)
    assert 3.5 < before < 5.5, before  # measured 4.32 nats/token on 175 response tokens
    assert after < before - 0.05, (before, after)  # measured 4.18
    assert len(callback.report) == 210 and not callback.report.fallbacks
    ranks = [item.to_rank for item in callback.report.values()]
    assert {item.from_rank for item in callback.report.values()} == {32}
    assert min(ranks) >= 1 and max(ranks) <= 31 and len(set(ranks)) > 1, ranks  # spread by the spectra
    trained = sum(int(np.prod(v.shape)) for v in lm.backbone.trainable_variables)
    assert 0.98 * budget <= trained <= budget, (trained, budget)  # rank 8's parameters, spent unevenly
