"""Where KerasHub layers live in transformers models: one table per family (pure).

Each row maps a KerasHub layer path (a regular expression, matched whole) to
the transformers module that holds the same weight; `{0}`, `{1}`, ... take
the expression's groups (block indices). The tables cover the layers a LoRA
adapter or a trained head can sit on.
"""

import re

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
FAMILIES = {"bert": BERT}


def module_name(table, path):
    """The transformers module of the KerasHub layer at `path` (matched
    whole, after any leading model names), or `None`."""
    for pattern, template in table:
        match = re.fullmatch(r"(?:.*/)?" + pattern, path)
        if match:
            return template.format(*match.groups())
    return None
