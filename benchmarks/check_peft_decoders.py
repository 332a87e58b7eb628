"""PEFT export and import for Gemma and Llama decoders, against transformers + PEFT.

In `benchmarks/.venv-peft` transformers creates a small random Gemma or Llama
causal LM (random norms too) and saves it; PEFT trains a LoRA adapter on
every linear layer of every block (per-module ranks) for a few Adam steps
and saves it. On the current Keras backend KerasHub loads the saved
transformers model with its own converter, and:

- import: `import_peft` loads PEFT's adapter; the last hidden states and
  logits are compared with PEFT's;
- export: keras-hrp adapters (random factors) on every linear layer,
  `export_peft`, attached by PEFT to the same model; compared again.

Prints the largest absolute differences and appends them to
`results/peft_decoders.md`.

    KERAS_BACKEND=jax python benchmarks/check_peft_decoders.py [--family gemma llama]
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
              rms_norm_eps=1e-6)
FAMILIES = {
    "gemma": ("gemma", keras_hub.models.GemmaBackbone, dict(COMMON, hidden_activation="gelu_pytorch_tanh")),
    "llama": ("llama", keras_hub.models.LlamaBackbone, dict(COMMON, tie_word_embeddings=False)),
}
SPEC = {"rank": 4, "alpha": 8, "rank_pattern": {"v_proj": 2, "down_proj": 6}, "steps": 3, "lr": 1e-2}


def _outputs(backbone, x):
    hidden = backbone({"token_ids": x["input_ids"], "padding_mask": x["attention_mask"].astype(bool)})
    logits = backbone.token_embedding(hidden, reverse=True)
    return {"hidden": keras.ops.convert_to_numpy(hidden), "logits": keras.ops.convert_to_numpy(logits)}


def _gap(theirs, ours):
    return {name: float(np.abs(np.asarray(theirs[name]) - ours[name]).max()) for name in ("hidden", "logits")}


def check(family, python, folder):
    model_type, backbone_cls, config = FAMILIES[family]
    rng = np.random.default_rng(0)
    x = {"input_ids": rng.integers(1, config["vocab_size"], size=(2, 12)).astype("int32"),
         "attention_mask": np.ones((2, 12), "int64")}
    inputs = {k: v.tolist() for k, v in x.items()}
    model_dir, peft_dir, ours_dir = (os.path.join(folder, n) for n in ("model", "peft", "keras"))
    made = bench_peft.run_worker(python, {"threads": 1, "inputs": inputs, "decoder": {
        "mode": "make", "model_type": model_type, "config": config, "model_dir": model_dir,
        "adapter": peft_dir, "targets": TARGETS, **SPEC}})
    rows = {}
    backbone = backbone_cls.from_preset(model_dir)
    rows["base models apart"] = _gap(made["base"], _outputs(backbone, x))
    keras_hrp.import_peft(backbone, peft_dir, family=family)
    rows["import"] = _gap(made["adapted"], _outputs(backbone, x))
    update = _gap(made["adapted"], {k: np.asarray(v) for k, v in made["base"].items()})

    backbone = backbone_cls.from_preset(model_dir)
    layers = keras_hrp.enable_hrp(backbone, rank=4, target_layer_names=list(keras_hrp.hub.LINEAR_LAYER_NAMES[family]),
                                  factorization="per_head", lora_alpha=8.0)
    for layer in layers:
        for variable in lora.lora_factors(layer):
            variable.assign(rng.normal(scale=0.1, size=variable.shape).astype("float32"))
    ours = _outputs(backbone, x)
    keras_hrp.export_peft(backbone, ours_dir, base_model_name_or_path=model_dir, family=family)
    attached = bench_peft.run_worker(python, {"threads": 1, "inputs": inputs, "decoder": {
        "mode": "attach", "model_dir": model_dir, "adapter": ours_dir}})
    rows["export (per head)"] = _gap(attached["adapted"], ours)
    return rows, update, len(layers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", choices=tuple(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--venv", default=os.path.join(HERE, ".venv-peft"))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "peft_decoders.md"))
    args = parser.parse_args(argv)
    python = bench_peft.ensure_venv(args.venv)
    worst = 0.0
    lines = []
    for family in args.family:
        with tempfile.TemporaryDirectory() as folder:
            rows, update, count = check(family, python, folder)
        cells = " | ".join(f"{r['hidden']:.1e} / {r['logits']:.1e}" for r in rows.values())
        lines.append(f"| {keras.backend.backend()} | {family} | {count} | {cells} | "
                     f"{update['hidden']:.3f} / {update['logits']:.3f} |")
        worst = max(worst, rows["import"]["hidden"], rows["export (per head)"]["hidden"])
        print(lines[-1], flush=True)
    bench_peft.append_rows(args.out, "# PEFT export and import for Gemma and Llama\n\n"
                           "`KERAS_BACKEND=<backend> python benchmarks/check_peft_decoders.py`: a random "
                           "transformers decoder (hidden 64, 2 blocks, 4 query / 2 key-value heads of 16, MLP 128, "
                           "random norms), saved and loaded by KerasHub's converter. Import: PEFT trains LoRA "
                           f"(r {SPEC['rank']}, rank pattern {SPEC['rank_pattern']}) on every linear layer "
                           f"{SPEC['steps']} Adam steps, `import_peft` loads it. Export: keras-hrp per-head "
                           "adapters with random factors on the same layers, attached by PEFT. Largest "
                           "|transformers + PEFT − Keras| of the last hidden states / logits, float32; "
                           "and how far PEFT's trained adapter moved them.\n\n"
                           "| backend | family | adapted layers | base models apart | import | export (per head) "
                           "| PEFT adapter's update |\n|---|---|---|---|---|---|---|\n", lines)
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
