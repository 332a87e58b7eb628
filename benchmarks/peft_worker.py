"""The PEFT side of bench_peft.py and bench_speed.py; runs inside benchmarks/.venv-peft.

Imports torch, transformers and peft only (no Keras). Reads a job file
(model directory, the split texts and labels, the runs to do) and prints one
JSON line per finished run; a job with `"speed"` times PEFT LoRA training
steps instead, one with `"adapter"` prints the outputs of the base model
with that PEFT adapter directory attached (a classifier, or the bare model
for a backbone's adapter), and one with `"train_adapter"`
trains a PEFT LoRA adapter a few steps, saves it and prints its outputs; one
with `"decoder"` does either for a small random transformers decoder (which
it first creates and saves, for KerasHub to load).

    benchmarks/.venv-peft/bin/python benchmarks/peft_worker.py JOB.json
"""

import json
import os
import sys
import time

import numpy as np
import torch
from peft import EvaConfig
from peft import LoraConfig
from peft import get_peft_model
from peft import initialize_lora_eva_weights
from peft.tuners.lora import LoraGAConfig
from peft.tuners.lora import preprocess_loraga
from transformers import AutoModelForSequenceClassification
from transformers import AutoTokenizer

INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora",
         "lora_ga": "lora_ga", "eva": "eva"}


def encode(tokenizer, texts, seq_len):
    out = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len,
                    return_tensors="pt")
    return {k: out[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def batches(x, y, order, batch_size):
    for start in range(0, len(order), batch_size):
        idx = torch.as_tensor(order[start : start + batch_size])
        yield {k: v[idx] for k, v in x.items()}, y[idx]


def accuracy(model, x, y):
    model.eval()
    correct = 0
    with torch.no_grad():
        for xb, yb in batches(x, y, np.arange(len(y)), 256):
            correct += int((model(**xb).logits.argmax(-1) == yb).sum())
    return correct / len(y)


def build(run, job, x, y, order):
    """The model for `run`, and how many of the steps its init used."""
    model = AutoModelForSequenceClassification.from_pretrained(job["model_dir"], num_labels=2)
    if run["init"] == "full":
        return model, 0
    rank, bs = run["rank"], job["batch_size"]
    config = LoraConfig(
        task_type="SEQ_CLS", r=rank, lora_alpha=rank, target_modules=["query", "value"],
        init_lora_weights=INITS[run["init"]],
        lora_ga_config=LoraGAConfig() if run["init"] == "lora_ga" else None,
        eva_config=EvaConfig(rho=1.0) if run["init"] == "eva" else None,
    )
    init_steps = 0
    if run["init"] == "lora_ga":
        init_steps = job["ga_batches"]
        head = order[: init_steps * bs]

        def train_step():  # gradients accumulate over the batches
            for xb, yb in batches(x, y, head, bs):
                torch.nn.functional.cross_entropy(model(**xb).logits, yb).backward()

        preprocess_loraga(model, config, train_step)
    model = get_peft_model(model, config)
    if run["init"] == "eva":
        loader = [xb for xb, _ in batches(x, y, order[: job["ga_batches"] * bs], bs)]
        initialize_lora_eva_weights(model, loader)
    return model, init_steps


def timed_step(model, optimizer, x, y):
    """One optimizer step: `(seconds, loss)`."""
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(**x).logits, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start, float(loss)


def train(run, job, data):
    torch.manual_seed(run["seed"])
    (x, y), val, test = data
    order = np.resize(np.random.default_rng(run["seed"]).permutation(len(y)),
                      job["steps"] * job["batch_size"])
    model, init_steps = build(run, job, x, y, order)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=run["lr"], eps=1e-7)  # Keras Adam's epsilon
    model.train()
    times, losses = [], []
    for xb, yb in batches(x, y, order[init_steps * job["batch_size"] :], job["batch_size"]):
        seconds, loss = timed_step(model, optimizer, xb, yb)
        times.append(seconds)
        losses.append(loss)
    return {"val": accuracy(model, *val), "test": accuracy(model, *test), "params": params,
            "step_ms": 1e3 * float(np.median(times[2:] or times)), "curve": losses,
            "threads": torch.get_num_threads()}


def _memory_mib(field):
    """`VmRSS` / `VmHWM` of this process (Linux), MiB."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kib / 1024


def _speed_model(job):
    """`(PEFT model, one batch's loss function)` of a speed job: the MiniLM
    classifier on `job["texts"]`, or a causal LM from `speed["gguf"]` (the
    next-token loss on `speed["token_ids"]`)."""
    spec = job["speed"]
    if "gguf" in spec:
        from transformers import AutoModelForCausalLM

        folder, name = os.path.split(spec["gguf"])
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=spec["rank"], lora_alpha=spec["rank"],
                                                 target_modules=spec["targets"]))
        ids = torch.as_tensor(spec["token_ids"])
        return model, lambda: model(input_ids=ids, labels=ids).loss
    model = AutoModelForSequenceClassification.from_pretrained(job["model_dir"], num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=spec["rank"], lora_alpha=spec["rank"],
                                             target_modules=spec["targets"]))
    x = encode(AutoTokenizer.from_pretrained(job["model_dir"]), job["texts"], job["seq_len"])
    y = torch.as_tensor(job["labels"])
    return model, lambda: torch.nn.functional.cross_entropy(model(**x).logits, y)


def speed(job):
    """Median milliseconds per PEFT LoRA training step, and memory measured as
    bench_speed measures Keras': the peak resident memory of the steps after
    the first above the model at rest, and the run's whole peak (MiB)."""
    model, loss_fn = _speed_model(job)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times, rest_mib, first_peak_mib = [], None, None
    for _ in range(job["speed"]["repeats"]):
        start = time.perf_counter()
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        if rest_mib is None:
            rest_mib, first_peak_mib = _memory_mib("VmRSS"), _memory_mib("VmHWM")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
    return {"step_ms": 1e3 * float(np.median(times[2:])), "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "rest_mib": rest_mib, "step_peak_mib": _memory_mib("VmHWM"),
            "run_peak_mib": max(first_peak_mib, _memory_mib("VmHWM"))}


def _tensors(inputs):
    return {k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()}


def adam_steps(model, steps, lr, loss_fn):
    """`steps` Adam steps on `model`'s trainable parameters; the last loss."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss)


def with_and_without(model, x):
    """Logits and last hidden states of a PEFT `model` on `x` with its adapter
    (`"adapted"`) and without (`"base"`), in eval mode."""
    model.eval()
    with torch.no_grad():
        adapted = model(**x, output_hidden_states=True)
        with model.disable_adapter():
            base = model(**x, output_hidden_states=True)
    return {name: {"logits": out.logits.tolist() if "logits" in out else None,
                   "hidden": out.hidden_states[-1].tolist()}
            for name, out in (("adapted", adapted), ("base", base))}


def adapter_outputs(job):
    """Logits and last hidden states of the base model with a PEFT adapter
    directory attached (`PeftModel.from_pretrained`) and with it disabled.
    The base is `AutoModelForSequenceClassification` (the adapter's head
    copied into it first, so both share it), or the bare `AutoModel` where
    `job["model_class"]` is `"backbone"` (no logits then)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    if job.get("model_class") == "backbone":
        model = AutoModel.from_pretrained(job["model_dir"], **job.get("config", {}))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            job["model_dir"], num_labels=job["num_labels"], **job.get("config", {}))
        saved = load_file(f"{job['adapter']}/adapter_model.safetensors")
        with torch.no_grad():
            for name in ("weight", "bias"):
                getattr(model.classifier, name).copy_(saved[f"base_model.model.classifier.{name}"])
    model = PeftModel.from_pretrained(model, job["adapter"])
    return with_and_without(model, _tensors(job["inputs"]))


def trained_adapter(job):
    """Trains a PEFT LoRA adapter (and the head) a few Adam steps on the job's
    inputs, saves it with `save_pretrained`, returns its logits and last
    hidden states."""
    spec = job["train_adapter"]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        job["model_dir"], num_labels=job["num_labels"], **job.get("config", {}))
    config = LoraConfig(task_type="SEQ_CLS", r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                        target_modules=spec["targets"], rank_pattern=spec["rank_pattern"],
                        alpha_pattern=spec["alpha_pattern"], use_rslora=spec["rslora"], bias=spec["bias"])
    model = get_peft_model(model, config)
    x, y = _tensors(job["inputs"]), torch.as_tensor(spec["labels"])
    loss = adam_steps(model, spec["steps"], spec["lr"],
                      lambda: torch.nn.functional.cross_entropy(model(**x).logits, y))
    model.save_pretrained(spec["out"])
    model.eval()
    with torch.no_grad():
        out = model(**x, output_hidden_states=True)
    return {"logits": out.logits.tolist(), "hidden": out.hidden_states[-1].tolist(), "loss": loss}


def decoder_job(job):
    """A small random causal LM (`job["decoder"]`): `"make"` creates and saves
    it, trains a PEFT LoRA adapter on it a few steps and saves that;
    `"attach"` loads it with the adapter directory `job["adapter"]`. Returns
    the last hidden states and logits with the adapter and without."""
    from peft import PeftModel
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM

    spec = job["decoder"]
    x = _tensors(job["inputs"])
    if spec["mode"] == "make":
        torch.manual_seed(0)
        config = AutoConfig.for_model(spec["model_type"], **spec["config"])
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # random norms, so a swapped or missed norm shows
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.3)
        model.save_pretrained(spec["model_dir"])
        model = get_peft_model(model, LoraConfig(
            r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules=spec["targets"],
            rank_pattern=spec["rank_pattern"], init_lora_weights="gaussian"))
        adam_steps(model, spec["steps"], spec["lr"], lambda: model(**x, labels=x["input_ids"]).loss)
        model.save_pretrained(spec["adapter"])
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
        model = PeftModel.from_pretrained(model, spec["adapter"])
    return with_and_without(model, x)


def main(path):
    with open(path) as f:
        job = json.load(f)
    torch.set_num_threads(job["threads"])
    one_result = {"speed": speed, "decoder": decoder_job, "train_adapter": trained_adapter,
                  "adapter": adapter_outputs}  # the job's key -> what runs it (first match)
    for key, run_job in one_result.items():
        if key in job:
            print(json.dumps(run_job(job)), flush=True)
            return
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    data = tuple(
        (encode(tokenizer, part["texts"], job["seq_len"]), torch.as_tensor(part["labels"]))
        for part in (job["train"], job["val"], job["test"])
    )
    for run in job["runs"]:
        print(json.dumps({"run": run, "result": train(run, job, data)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
