"""Small models and data shared by the tests."""

import keras
import numpy as np
from keras import ops

import keras_hrp

BACKEND = keras.backend.backend()
# jit_compile settings worth covering on this backend (torch.compile is
# covered once, in its own test, for its compile time).
JIT_MODES = [False, True] if BACKEND != "torch" else [False]


def regression_data(n=256, d_in=32, d_out=16, seed=0):
    """A linear target whose update from zero has a decaying spectrum."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)).astype("float32")
    u, _ = np.linalg.qr(rng.normal(size=(d_in, d_in)))
    v, _ = np.linalg.qr(rng.normal(size=(d_out, d_out)))
    s = 2.0 ** -np.arange(min(d_in, d_out))
    w = (u[:, : len(s)] * s) @ v[:, : len(s)].T
    y = (x @ w).astype("float32")
    return x, y


def hrp_mlp(rank=4, preheat_rank=12, variant="classic", lora_alpha=None, d_in=32, d_out=16):
    """HRPDense -> BatchNorm -> HRPDense, with a trainable plain head."""
    inputs = keras.Input((d_in,))
    h = keras_hrp.HRPDense(
        24, rank=rank, preheat_rank=preheat_rank, variant=variant,
        lora_alpha=lora_alpha, name="hrp_1",
    )(inputs)
    h = keras.layers.BatchNormalization(name="norm")(h)
    h = keras_hrp.HRPDense(
        24, rank=rank, preheat_rank=preheat_rank, variant=variant,
        lora_alpha=lora_alpha, activation="tanh", name="hrp_2",
    )(h)
    outputs = keras.layers.Dense(d_out, name="head")(h)
    return keras.Model(inputs, outputs, name="hrp_mlp")


def stock_mlp_with_hrp(seed=0):
    """Dense -> Dense -> head under `enable_hrp` (Keras saves the adapted
    kernels merged), compiled, with its data `(model, x, y)`."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((16,)),
        keras.layers.Dense(16, activation="relu", name="dense_in"),
        keras.layers.Dense(16, activation="relu", name="dense_mid"),
        keras.layers.Dense(4, name="head"),
    ])
    keras_hrp.enable_hrp(model, rank=2, preheat_rank=8, target_layer_names=["dense_in", "dense_mid"])
    model.get_layer("head").trainable = True
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32, 16)).astype("float32")
    return model, x, (x[:, :4] * 2.0).astype("float32")


# Reduced-precision policies a GPU run uses, where this backend runs them on
# the CPU (XLA's CPU dot has no float16 inputs with float32 accumulation).
F16_ON_CPU = BACKEND != "jax"
REDUCED_POLICIES = ["mixed_bfloat16", "bfloat16"] + (["mixed_float16"] if F16_ON_CPU else [])


class dtype_policy:
    """`with dtype_policy("mixed_bfloat16"): build()`; the old policy after."""

    def __init__(self, policy):
        self.policy = policy

    def __enter__(self):
        self.previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.policy)

    def __exit__(self, *exc):
        keras.config.set_dtype_policy(self.previous)


def numpy_of(x):
    return ops.convert_to_numpy(x)


def principal_angle_cos(u, w):
    """Smallest cosine of the principal angles between span(u) and span(w)."""
    qu, _ = np.linalg.qr(u)
    qw, _ = np.linalg.qr(w)
    return np.linalg.svd(qu.T @ qw, compute_uv=False).min()


# Tiny KerasHub models built from config (no download).
VOCAB, SEQ = 64, 8


def tokens(n, seed=0, segments=False):
    rng = np.random.default_rng(seed)
    x = {
        "token_ids": rng.integers(1, VOCAB, size=(n, SEQ)).astype("int32"),
        "padding_mask": np.ones((n, SEQ), "int32"),
    }
    if segments:
        x["segment_ids"] = np.zeros((n, SEQ), "int32")
    return x


def bert_classifier(dropout=0.1):
    """`(task, x, y, loss)`: a 2-layer BERT text classifier and toy data."""
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=SEQ, dropout=dropout,
    )
    task = keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None, dropout=dropout
    )
    x = tokens(64, segments=True)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # the head gives logits
    return task, x, (x["token_ids"][:, 0] % 2).astype("int32"), loss


def _causal_lm(task_cls, backbone):
    task = task_cls(backbone, preprocessor=None)
    x = tokens(64)
    y = np.roll(x["token_ids"], -1, axis=1)
    return task, x, y, keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def gemma_causal_lm():
    import keras_hub

    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32, head_dim=8,
    )
    return _causal_lm(keras_hub.models.GemmaCausalLM, backbone)


def llama_causal_lm():
    import keras_hub

    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32,
    )
    return _causal_lm(keras_hub.models.LlamaCausalLM, backbone)


def gpt2_causal_lm():
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=SEQ,
    )
    return _causal_lm(keras_hub.models.GPT2CausalLM, backbone)


def weights_by_path(model):
    return {v.path: numpy_of(v) for v in model.weights}


def logits_loss():
    """Classification loss for the tests' heads, which output logits."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# Stand-ins for the KerasHub presets that the README and docs name, so their code blocks run offline.
STANDIN_WORDS = sorted(set(
    "a an the film movie was is and too far long dull gripping beautiful boring loved hated it i what".split()))


def tiny_bert_preset(directory):
    """Writes a 2-layer BERT backbone and its tokenizer as a KerasHub preset
    at `directory`: the shape of `bert_tiny_en_uncased`, smaller."""
    import keras_hub

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + STANDIN_WORDS
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(words), num_layers=2, num_heads=2, hidden_dim=64,
        intermediate_dim=128, max_sequence_length=512,
    )
    backbone.save_to_preset(directory)
    keras_hub.models.BertTokenizer(vocabulary=words).save_to_preset(directory)
    return directory


def _byte_symbols():
    """The 256 byte-level BPE symbols (GPT-2's printable stand-ins for bytes)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def tiny_llama3_preset(directory):
    """Writes a 2-layer Llama 3 backbone and a byte-level BPE tokenizer as a
    KerasHub preset at `directory`: the shape of `llama3.2_instruct_1b`, smaller."""
    import keras_hub

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    words = special + _byte_symbols() + ["Ġt", "he", "Ġthe"]
    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=len(words), num_layers=2, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=32, intermediate_dim=64,
    )
    backbone.save_to_preset(directory)
    tokenizer = keras_hub.models.Llama3Tokenizer(
        vocabulary={word: i for i, word in enumerate(words)}, merges=["Ġ t", "h e", "Ġt he"])
    tokenizer.save_to_preset(directory)
    return directory
