"""Where KerasHub layers live in transformers models, and how their LoRA
factors become PEFT's (pure; numpy).

Each table row maps a KerasHub layer path (a regular expression, matched
whole) to the transformers module that holds the same weight; `{0}`, `{1}`,
... take the expression's groups (block indices). The tables cover the
layers a LoRA adapter or a trained head can sit on.

PEFT keeps a linear layer's update as `(lora_alpha / r) lora_B @ lora_A` on
the torch weight `(out, in)`, the transpose of a Keras kernel. A Keras
adapter whose `A` has only contracted axes (`Dense`, the 'full'
factorization, attention outputs) maps to `lora_A = A^T`, `lora_B = B^T`
and back. A per-head adapter (`A (hidden, heads, r)`, `B (r, head_dim)`) is
a standard LoRA of rank `heads * r` with block structure (one way only).
"""

import re

import numpy as np

# KerasHub BertBackbone / BertTextClassifier -> transformers BertForSequenceClassification.
BERT = (
    (r"transformer_layer_(\d+)/self_attention_layer/query", "bert.encoder.layer.{0}.attention.self.query"),
    (r"transformer_layer_(\d+)/self_attention_layer/key", "bert.encoder.layer.{0}.attention.self.key"),
    (r"transformer_layer_(\d+)/self_attention_layer/value", "bert.encoder.layer.{0}.attention.self.value"),
    (r"transformer_layer_(\d+)/self_attention_layer/attention_output",
     "bert.encoder.layer.{0}.attention.output.dense"),
    (r"transformer_layer_(\d+)/feedforward_intermediate_dense", "bert.encoder.layer.{0}.intermediate.dense"),
    (r"transformer_layer_(\d+)/feedforward_output_dense", "bert.encoder.layer.{0}.output.dense"),
    (r"token_embedding", "bert.embeddings.word_embeddings"),
    (r"segment_embedding", "bert.embeddings.token_type_embeddings"),
    (r"pooled_dense", "bert.pooler.dense"),
    (r"logits", "classifier"),
)
# KerasHub GemmaBackbone -> transformers GemmaForCausalLM (what KerasHub's own
# converter of transformers checkpoints maps). The tied token embedding is
# left out: KerasHub's LoRA on it also changes the output projection,
# PEFT's on `embed_tokens` the input lookup only.
GEMMA = (
    (r"decoder_block_(\d+)/attention/query", "model.layers.{0}.self_attn.q_proj"),
    (r"decoder_block_(\d+)/attention/key", "model.layers.{0}.self_attn.k_proj"),
    (r"decoder_block_(\d+)/attention/value", "model.layers.{0}.self_attn.v_proj"),
    (r"decoder_block_(\d+)/attention/attention_output", "model.layers.{0}.self_attn.o_proj"),
    (r"decoder_block_(\d+)/ffw_gating", "model.layers.{0}.mlp.gate_proj"),
    (r"decoder_block_(\d+)/ffw_gating_2", "model.layers.{0}.mlp.up_proj"),
    (r"decoder_block_(\d+)/ffw_linear", "model.layers.{0}.mlp.down_proj"),
)
# KerasHub LlamaBackbone -> transformers LlamaForCausalLM (embeddings left out, as for Gemma).
LLAMA = (
    (r"transformer_layer_(\d+)/self_attention/query", "model.layers.{0}.self_attn.q_proj"),
    (r"transformer_layer_(\d+)/self_attention/key", "model.layers.{0}.self_attn.k_proj"),
    (r"transformer_layer_(\d+)/self_attention/value", "model.layers.{0}.self_attn.v_proj"),
    (r"transformer_layer_(\d+)/self_attention/attention_output", "model.layers.{0}.self_attn.o_proj"),
    (r"transformer_layer_(\d+)/feedforward_gate_dense", "model.layers.{0}.mlp.gate_proj"),
    (r"transformer_layer_(\d+)/feedforward_intermediate_dense", "model.layers.{0}.mlp.up_proj"),
    (r"transformer_layer_(\d+)/feedforward_output_dense", "model.layers.{0}.mlp.down_proj"),
)
FAMILIES = {"bert": BERT, "gemma": GEMMA, "llama": LLAMA}
# The module prefix of the task classes above that the bare transformers model
# (`AutoModel`, what a KerasHub backbone is) lacks. Decoders export for
# `*ForCausalLM` whether a backbone or a CausalLM is exported.
BARE_PREFIX = {"bert": "bert."}
# The transformers model an export attaches to, by what is exported, and
# PEFT's `task_type` for it.
TARGETS = {
    ("bert", "backbone"): ("BertModel (AutoModel)", "FEATURE_EXTRACTION"),
    ("bert", "task"): ("BertForSequenceClassification", "SEQ_CLS"),
    ("gemma", "backbone"): ("GemmaForCausalLM", "CAUSAL_LM"),
    ("gemma", "task"): ("GemmaForCausalLM", "CAUSAL_LM"),
    ("llama", "backbone"): ("LlamaForCausalLM", "CAUSAL_LM"),
    ("llama", "task"): ("LlamaForCausalLM", "CAUSAL_LM"),
}


def exported_name(family, module, bare):
    """A table's module name as the exported model names it (`bare`: a
    backbone, which maps to the bare transformers model)."""
    prefix = BARE_PREFIX.get(family)
    if bare and prefix and module.startswith(prefix):
        return module[len(prefix):]
    return module


def table_name(family, module):
    """The table's name of a module named either way (task class or bare
    model): a bare model's module gets the task class's prefix back."""
    prefix = BARE_PREFIX.get(family)
    outside = {template for _, template in FAMILIES[family] if prefix and not template.startswith(prefix)}
    if prefix and not module.startswith(prefix) and module not in outside:  # e.g. `classifier`
        return prefix + module
    return module


def module_name(table, path):
    """The transformers module of the KerasHub layer at `path` (matched
    whole, after any leading model names), or `None`."""
    for pattern, template in table:
        match = re.fullmatch(r"(?:.*/)?" + pattern, path)
        if match:
            return template.format(*match.groups())
    return None


def contracted_axes(equation):
    """The kernel axes an einsum's input contracts, in the input's order
    (`None`: a `Dense` kernel)."""
    if equation is None:
        return (0,)
    inputs, kernel = equation.split("->")[0].split(",")
    return tuple(kernel.index(c) for c in inputs if c in kernel)


def peft_pair(a, b, kernel_shape, a_axes, b_axes, contracted):
    """`(lora_A, lora_B)` of a Keras adapter `(A, B)` (pure, numpy).

    Args:
        a: `A`, shaped `[kernel_shape[i] for i in a_axes] + [r]`.
        b: `B`, shaped `(r, prod(kernel_shape[i] for i in b_axes))`.
        kernel_shape: the frozen weight's shape.
        a_axes, b_axes: the kernel axes on `A`'s and `B`'s side.
        contracted: the kernel axes the input contracts, in the input's order.

    Returns:
        `lora_A (heads * r, in)` and `lora_B (out, heads * r)`, `in` in
        `contracted`' order and `out` the other kernel axes in kernel order
        (a torch `Linear`'s layout); `heads` is the product of `A`'s
        output axes (1 but for per-head adapters).
    """
    r = b.shape[0]
    heads = [i for i in a_axes if i not in contracted]
    m = int(np.prod([kernel_shape[i] for i in contracted]))
    h = int(np.prod([kernel_shape[i] for i in heads]))
    order = [a_axes.index(i) for i in contracted] + [a_axes.index(i) for i in heads] + [len(a_axes)]
    a = np.transpose(np.asarray(a).reshape([kernel_shape[i] for i in a_axes] + [r]), order)
    lora_a = np.transpose(a.reshape(m, h, r), (1, 2, 0)).reshape(h * r, m)
    blocks = np.zeros((h, b.shape[1], h, r), b.dtype)
    for head in range(h):
        blocks[head, :, head, :] = np.asarray(b).T
    produced = heads + list(b_axes)  # the output axes as the blocks hold them
    out = sorted(produced)
    blocks = blocks.reshape([kernel_shape[i] for i in produced] + [h * r])
    lora_b = np.transpose(blocks, [produced.index(i) for i in out] + [len(produced)])
    return lora_a, lora_b.reshape(-1, h * r)


def keras_pair(lora_a, lora_b, kernel_shape, a_axes, b_axes, contracted):
    """`(A, B)` of a PEFT pair `(lora_A (r, in), lora_B (out, r))`: the
    inverse of `peft_pair` for an adapter whose `A` has only contracted axes.

    Returns `A` shaped `[kernel_shape[i] for i in a_axes] + [r]` and `B`
    shaped `(r, prod(kernel_shape[i] for i in b_axes))`.
    """
    a_axes, b_axes, contracted = list(a_axes), list(b_axes), list(contracted)
    if sorted(a_axes) != sorted(contracted):
        raise ValueError(f"A PEFT pair maps to an adapter whose A holds the contracted axes only. "
                         f"Received: a_axes={a_axes}, contracted={contracted}")
    r = lora_a.shape[0]
    a = np.asarray(lora_a).T.reshape([kernel_shape[i] for i in contracted] + [r])
    a = np.transpose(a, [contracted.index(i) for i in a_axes] + [len(a_axes)])
    out = sorted(b_axes)
    b = np.asarray(lora_b).T.reshape([r] + [kernel_shape[i] for i in out])
    b = np.transpose(b, [0] + [1 + out.index(i) for i in b_axes])
    return a, b.reshape(r, -1)
