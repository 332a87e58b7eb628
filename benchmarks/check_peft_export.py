"""export_peft against the real thing: transformers + PEFT give Keras' outputs.

On the current Keras backend: the recipe's all-MiniLM-L6-v2 classifier gets
keras-hrp adapters on every linear layer of every block (per-head or full
factorization; per-layer ranks from `rank="auto"`), random nonzero factors and
a random head; `export_peft` writes the adapter. In `benchmarks/.venv-peft`
transformers loads the same pretrained directory, PEFT attaches the
adapter, and the adapter's update of the logits and last hidden states
(with it minus without it) is compared on real sentences. Prints the
largest absolute differences and appends them to `results/peft_export.md`.

With `--export backbone` the backbone alone is exported and attached to the
bare `AutoModel` (the sentence-embedding use); only hidden states compare.

    KERAS_BACKEND=jax python benchmarks/check_peft_export.py [--factorization full] [--export backbone]
"""

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_peft  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_hrp  # noqa: E402
from keras_hrp import lora  # noqa: E402

from common import recipe  # noqa: E402

SENTENCES = ["a fine film with a dull plot", "never quite works, but the acting is great",
             "one of the best of the year", "I wanted my two hours back"]


def keras_side(args, adapter_dir):
    """Exports the adapter; returns the inputs and Keras' logits and hidden states."""
    preset = recipe.default_preset()
    keras.utils.set_random_seed(0)
    task = keras_hub.models.TextClassifier.from_preset(preset, num_classes=2, preprocessor=None)
    targets = list(keras_hrp.hub.LINEAR_LAYER_NAMES["bert"])
    probe = keras_hub.models.TextClassifier.from_preset(preset, num_classes=2, preprocessor=None)
    probe = keras_hrp.enable_hrp(probe, 4, 8, target_layer_names=targets, factorization=args.factorization)
    budget = 4 * sum(sum(lora.weight_matrix_shape(layer)) for layer in probe)  # rank 4's, spent per layer
    layers = keras_hrp.enable_hrp(task, rank="auto", preheat_rank=8, rank_budget=budget,
                                  target_layer_names=targets, factorization=args.factorization, lora_alpha=8.0)
    rng = np.random.default_rng(0)
    for layer in layers:  # a preheated delta of another rank per layer, so auto ranks differ
        b = lora.lora_factors(layer)[1]
        b.assign((rng.normal(size=b.shape) * (np.arange(b.shape[0]) < rng.integers(1, 8))[:, None]).astype("float32"))
    keras_hrp.switch_to_main(task)
    if args.init != "hrp":  # an init that moves part of W into the adapter, then "training"
        keras_hrp.initialize_lora(task, args.init)
    for layer in layers:
        for variable in lora.lora_factors(layer):
            noise = rng.normal(scale=args.factor_std, size=variable.shape).astype("float32")
            variable.assign(variable + noise if args.init != "hrp" else noise)
    head = task.get_layer("logits")
    head.kernel.assign(rng.normal(scale=0.1, size=head.kernel.shape).astype("float32"))
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(preset, sequence_length=24)
    x = {k: np.asarray(v) for k, v in preprocessor(SENTENCES).items()}
    outputs = {"adapted": _outputs(task, x)}
    pretrained = keras_hub.models.TextClassifier.from_preset(preset, num_classes=2, preprocessor=None)
    pretrained.get_layer("logits").set_weights(head.get_weights())  # the base model with the same head
    outputs["base"] = _outputs(pretrained, x)
    exported, base = (task, pretrained) if args.export == "classifier" else (task.backbone, pretrained.backbone)
    config = keras_hrp.export_peft(exported, adapter_dir, base_model_name_or_path=preset,
                                   base_model=base if args.base_model else None)
    inputs = {"input_ids": x["token_ids"].tolist(), "attention_mask": x["padding_mask"].astype("int64").tolist(),
              "token_type_ids": x["segment_ids"].tolist()}
    return preset, inputs, outputs, config


def _outputs(task, x):
    return {"logits": np.asarray(task.predict(x, verbose=0)),
            "hidden": keras.ops.convert_to_numpy(task.backbone(x)["sequence_output"])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factorization", choices=("per_head", "full"), default="per_head")
    parser.add_argument("--factor-std", type=float, default=0.02, help="of the random A and B (0: no update)")
    parser.add_argument("--init", choices=("hrp", "pissa", "olora", "milora"), default="hrp",
                        help="a residual init exports against the pretrained weights")
    parser.add_argument("--base-model", action="store_true",
                        help="export with base_model= (the pretrained model) instead of the init's record")
    parser.add_argument("--export", choices=("classifier", "backbone"), default="classifier",
                        help="export the TextClassifier (PEFT attaches to AutoModelForSequenceClassification) "
                             "or its backbone (to the bare AutoModel: the sentence-embedding use)")
    parser.add_argument("--venv", default=os.path.join(HERE, ".venv-peft"))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "peft_export.md"))
    args = parser.parse_args(argv)
    python = bench_peft.ensure_venv(args.venv)
    with tempfile.TemporaryDirectory() as folder:
        adapter = os.path.join(folder, "adapter")
        preset, inputs, ours, config = keras_side(args, adapter)
        theirs = bench_peft.run_worker(python, {
            "model_dir": preset, "adapter": adapter, "inputs": inputs, "num_labels": 2, "threads": 1,
            "model_class": args.export, "config": {"hidden_act": "gelu_new"}})  # KerasHub's BERT: tanh GELU
    valid = np.asarray(inputs["attention_mask"], bool)  # padded positions differ by design
    gaps = {f"logits{part}": float("nan") for part in ("", " base", " update", " adapted")}
    compared = (("logits", Ellipsis), ("hidden", valid)) if args.export == "classifier" else (("hidden", valid),)
    for name, where in compared:
        theirs_delta = np.asarray(theirs["adapted"][name]) - np.asarray(theirs["base"][name])
        ours_delta = ours["adapted"][name] - ours["base"][name]
        gaps[name] = float(np.abs(theirs_delta - ours_delta)[where].max())
        gaps[f"{name} base"] = float(np.abs(np.asarray(theirs["base"][name]) - ours["base"][name])[where].max())
        gaps[f"{name} update"] = float(np.abs(ours_delta)[where].max())
        gaps[f"{name} adapted"] = float(np.abs(np.asarray(theirs["adapted"][name]) - ours["adapted"][name])[where].max())
    ranks = sorted({config["r"], *config["rank_pattern"].values()})
    init = args.init + (", base_model=" if args.base_model else "")
    if args.export == "backbone":
        init += f"; backbone -> AutoModel ({config['task_type']})"
    line = (f"| {keras.backend.backend()} | {args.factorization} | {init} | {len(config['target_modules'])} | "
            f"{', '.join(map(str, ranks))} | {gaps['logits adapted']:.1e} / {gaps['hidden adapted']:.1e} | "
            f"{gaps['logits update']:.3f} / {gaps['hidden update']:.3f} | {gaps['logits']:.1e} / "
            f"{gaps['hidden']:.1e} | {gaps['logits base']:.1e} / {gaps['hidden base']:.1e} |")
    print(line)
    bench_peft.append_rows(args.out, "# export_peft against transformers + PEFT\n\n"
                           "`KERAS_BACKEND=<backend> python benchmarks/check_peft_export.py --factorization <f> "
                           "[--init pissa [--base-model]] [--export backbone]`: "
                           "all-MiniLM-L6-v2 with keras-hrp LoRA on every linear layer of every block "
                           "(auto ranks), random factors and head (init `hrp`; with `--init pissa` / `olora` "
                           "the init moves part of each frozen weight into the adapter, then random noise on "
                           "the factors stands for training, and the export folds the moved part back — from "
                           "the init's record, or with `--base-model` by comparing with the pretrained model). "
                           "The TextClassifier's export attaches to `AutoModelForSequenceClassification` "
                           "(`task_type` SEQ_CLS); with `--export backbone` the BertBackbone's attaches to the "
                           "bare `AutoModel` (FEATURE_EXTRACTION; no logits: nan). Float32, 4 real sentences; the largest "
                           "|transformers + PEFT − Keras| of the logits / last hidden states (unpadded tokens) "
                           "with the adapter; the adapter's update (output with it minus without it; PEFT: "
                           "`disable_adapter`, the exported head in both) and the largest difference of the two "
                           "updates; and how far the two base models "
                           "(KerasHub's and transformers' MiniLM, no adapter; transformers set to KerasHub's tanh GELU, "
                           "`hidden_act='gelu_new'`) already differ.\n\n"
                           "| backend | factorization | init | adapted modules | PEFT ranks | PEFT − Keras, adapted "
                           "(logits / hidden) | update | update, PEFT − Keras | base models apart |\n"
                           "|---|---|---|---|---|---|---|---|---|\n", [line])
    worst = max(gap for name, gap in gaps.items() if name.endswith("adapted") and not np.isnan(gap))
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
