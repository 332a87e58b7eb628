"""import_peft against the real thing: an adapter PEFT trained gives PEFT's outputs in Keras.

In `benchmarks/.venv-peft`, PEFT trains a LoRA adapter on the recipe's
all-MiniLM-L6-v2 classifier for a few Adam steps (every linear layer of every
block, per-module ranks and alphas, rsLoRA, trained biases, the head) and
saves it with `save_pretrained`. On the current Keras backend the same
pretrained directory loads as a KerasHub classifier, `import_peft` reads the
adapter, and the logits and last hidden states are compared with PEFT's on
real sentences. Prints the largest absolute differences and appends them
to `results/peft_import.md`.

    KERAS_BACKEND=jax python benchmarks/check_peft_import.py
"""

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_peft  # noqa: E402
import check_peft_export  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_hrp  # noqa: E402

from common import recipe  # noqa: E402

SPEC = {"rank": 4, "alpha": 8, "targets": ["query", "key", "value", "attention.output.dense",
                                           "intermediate.dense", "output.dense"],
        "rank_pattern": {"value": 8, "intermediate.dense": 2}, "alpha_pattern": {"query": 16},
        "rslora": True, "bias": "lora_only", "steps": 5, "lr": 1e-2, "labels": [0, 1, 1, 0]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=os.path.join(HERE, ".venv-peft"))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "peft_import.md"))
    args = parser.parse_args(argv)
    python = bench_peft.ensure_venv(args.venv)
    preset = recipe.default_preset()
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(preset, sequence_length=24)
    x = {k: np.asarray(v) for k, v in preprocessor(check_peft_export.SENTENCES).items()}
    inputs = {"input_ids": x["token_ids"].tolist(), "attention_mask": x["padding_mask"].astype("int64").tolist(),
              "token_type_ids": x["segment_ids"].tolist()}
    with tempfile.TemporaryDirectory() as folder:
        adapter = os.path.join(folder, "adapter")
        theirs = bench_peft.run_worker(python, {
            "model_dir": preset, "inputs": inputs, "num_labels": 2, "threads": 1,
            "config": {"hidden_act": "gelu_new"},  # KerasHub's BERT: tanh GELU
            "train_adapter": {**SPEC, "out": adapter}})
        task = keras_hub.models.TextClassifier.from_preset(preset, num_classes=2, preprocessor=None)
        base = check_peft_export._outputs(task, x)
        paths = keras_hrp.import_peft(task, adapter)
        with open(os.path.join(adapter, "adapter_config.json")) as f:
            config = json.load(f)
        ours = check_peft_export._outputs(task, x)
    valid = np.asarray(inputs["attention_mask"], bool)  # padded positions differ by design
    gaps = {}
    for name, where in (("logits", Ellipsis), ("hidden", valid)):
        gaps[name] = float(np.abs(np.asarray(theirs[name]) - ours[name])[where].max())
        gaps[f"{name} update"] = float(np.abs(ours[name] - base[name])[where].max())
    line = (f"| {keras.backend.backend()} | {len(paths)} | {config['r']}, pattern {config['rank_pattern']} | "
            f"{config['use_rslora']} / {config['bias']} | {gaps['logits']:.1e} / {gaps['hidden']:.1e} | "
            f"{gaps['logits update']:.3f} / {gaps['hidden update']:.3f} |")
    print(line)
    bench_peft.append_rows(args.out, "# import_peft against transformers + PEFT\n\n"
                           "`KERAS_BACKEND=<backend> python benchmarks/check_peft_import.py`: PEFT (torch, "
                           "`benchmarks/.venv-peft`) trains a LoRA adapter on all-MiniLM-L6-v2 for "
                           f"{SPEC['steps']} Adam steps (lr {SPEC['lr']}) on 4 real sentences — every linear layer "
                           "of every block, per-module ranks and alphas, rsLoRA, trained biases and the "
                           "classifier head — and saves it; Keras loads the same pretrained directory, "
                           "`import_peft` reads the adapter. Largest |PEFT − Keras| of the logits / last hidden "
                           "states (unpadded tokens), float32, and how far the imported adapter (with the "
                           "trained head) moved Keras' outputs.\n\n"
                           "| backend | imported layers | PEFT ranks | rsLoRA / bias | PEFT − Keras (logits / hidden) "
                           "| update (logits / hidden) |\n|---|---|---|---|---|---|\n", [line])
    return 0 if max(gaps["logits"], gaps["hidden"]) <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
