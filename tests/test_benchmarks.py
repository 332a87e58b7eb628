"""The benchmark scripts: their claims' invariants on tiny settings."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import keras_hrp
from keras_hrp import internals
from tests import helpers
from tests.helpers import BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".data")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from common import recipe  # noqa: E402
from common import timing  # noqa: E402
from common.runs import RunCache  # noqa: E402
SCRIPTS = ["bench_core.py", "bench_theory.py", "bench_quality.py", "bench_speed.py", "bench_peft.py",
           "bench_switch.py", "bench_layers.py", "bench_floor.py", "bench_eager.py", "bench_lm.py", "bench_wholerun.py"]


def _load(name):
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(BACKEND != "jax", reason="argument parsing is backend-independent; once")
@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--help"],
        capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": BACKEND},
    )
    assert out.returncode == 0 and "--quick" in out.stdout


def test_theory_claims_on_a_small_setting(tmp_path):
    theory = _load("bench_theory")
    args = theory.parse(["--dim", "16", "--rank", "2", "--seeds", "3", "--steps", "60",
                         "--preheat-steps", "20", "--spectra", "power-law", "flat",
                         "--ablation-steps", "2", "20", "--out", str(tmp_path)])
    rows = {(spectrum, variant): cells for spectrum, variant, cells in theory.main_table(args)}
    asym = rows["power-law", "asymmetric"]
    # Preheating at rank r with A frozen keeps span(A): exactly random init.
    np.testing.assert_allclose(asym["HRP R=2"], asym["random"], rtol=1e-5)
    assert asym["HRP R=16"][0] < asym["HRP R=4"][0] < asym["random"][0]
    assert rows["power-law", "classic"]["HRP R=16"][0] < rows["power-law", "classic"]["random"][0]
    np.testing.assert_allclose(rows["power-law", "classic"]["oracle"][0], 1.0, atol=0.02)
    for cells in (rows["flat", "classic"], rows["flat", "asymmetric"]):
        np.testing.assert_allclose([v[0] for v in cells.values()], 1.0, atol=1e-3)
    assert theory.preheat_ranks(args) == [2, 4, 8, 16]


def test_quality_splits_and_run_cache(tmp_path):
    quality = _load("bench_quality")
    train, val, test = recipe.split_indices(200, 1234, val_size=30, test_size=50)
    assert (len(train), len(val), len(test)) == (120, 30, 50)
    assert len(set(train) | set(val) | set(test)) == 200
    again = recipe.split_indices(200, 1234, val_size=30, test_size=50)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test)))
    x, y = {"ids": np.arange(10)[:, None]}, np.arange(10)
    xb, yb = recipe.train_batches((x, y), seed=0, steps=3, batch_size=4)  # 12 of 10: repeats
    assert yb.shape == (12,) and np.array_equal(xb["ids"][:, 0], yb) and sorted(yb[:10]) == list(range(10))
    calls = []
    path = os.path.join(tmp_path, "runs.jsonl")
    first = RunCache(path).get("k", lambda: calls.append(1) or {"val": 0.5})
    resumed = RunCache(path).get("k", lambda: calls.append(1) or {"val": 0.0})
    assert first == resumed == {"val": 0.5} and calls == [1]
    with open(path) as f:
        assert json.loads(f.readline())["key"] == "k"


def test_quality_grid_extends_past_an_edge_pick():
    beyond = _load("bench_quality").rate_beyond_edge
    assert beyond({5e-4: 0.80, 2e-3: 0.82}) == 8e-3
    assert beyond({5e-4: 0.83, 2e-3: 0.82}) == 1.25e-4
    assert beyond({3e-5: 0.84, 1e-4: 0.83}) == 9e-6
    assert beyond({5e-4: 0.80, 2e-3: 0.84, 8e-3: 0.81}) is None
    assert beyond({2e-3: 0.84}) is None


def test_quality_ablation_runs_the_chosen_variants_and_reports_every_cached_one(tmp_path, monkeypatch):
    quality = _load("bench_quality")
    args = quality.parse(["--ablation", "--ablation-seeds", "1", "--ablation-variants", "asymmetric",
                          "--out", str(tmp_path)])
    cache = RunCache(os.path.join(tmp_path, "runs.jsonl"))
    truncated = json.dumps(quality.ABLATION["truncated delta"], sort_keys=True)
    for seed in (0, 1):  # an earlier run's two seeds of a variant not chosen now
        cache.put(quality._key(args, "hrp", 1e-3, seed, variant=truncated), {"val": [0.7, 0.8][seed]})
    ran = []
    monkeypatch.setattr(quality, "run", lambda method, lr, seed, *rest: ran.append((seed, rest[-1])) or {"val": 0.5})
    rows = quality.ablation(args, cache, None, None, 1e-3)
    assert ran == [(0, quality.ABLATION["asymmetric"])]  # only the chosen variant runs, one seed
    assert [r["val"] for r in rows["asymmetric"]] == [0.5]
    assert [r["val"] for r in rows["truncated delta"]] == [0.7, 0.8]  # from the cache, not run
    assert "auto preheat (switch when the subspaces settle)" not in rows  # neither chosen nor cached


def test_peft_configs_and_table(tmp_path):
    peft = _load("bench_peft")
    args = peft.parse(["--out", str(tmp_path)])
    assert ("default", 8) in args.configs and ("full", 0) in args.configs
    assert {init for init, rank in args.configs if rank == 48} == {"default", "pissa", "olora", "lora_ga", "eva"}
    assert peft.parse(["--configs", "gaussian:16", "full"]).configs == [("gaussian", 16), ("full", 0)]
    for bad in ("pissa", "lora:8", "eva:0"):
        with pytest.raises(peft.argparse.ArgumentTypeError, match=f"Received: '{bad}'"):
            peft.parse_config(bad)
    runs = [{"test": t, "val": 0.8, "params": 73_728, "step_ms": ms, "threads": 2}
            for t, ms in ((0.80, 100.0), (0.82, 120.0))]
    path = os.path.join(tmp_path, "peft.md")
    table = {"PEFT LoRA r=48, init pissa": {"lr": 5e-4, "runs": runs}}
    peft.write_markdown(args, table, path)
    peft.plot(table, path[:-3] + ".png")
    rows = [line for line in open(path).read().splitlines() if line.startswith("| PEFT")]
    assert rows == ["| PEFT LoRA r=48, init pissa | 0.0005 | 2 | 81.00 ± 1.00 | 73,728 | 110 | 2 |"]
    assert os.path.getsize(path[:-3] + ".png") > 1000


@pytest.mark.skipif(BACKEND != "jax", reason="a real MiniLM run is minutes; once per CI, on JAX")
def test_quality_quick_real_run(tmp_path):
    quality = _load("bench_quality")
    code = quality.main(["--quick", "--methods", "lora_ga", "hrp", "--factorization", "full", "--task", "sources",
                         "--out", str(tmp_path), "--cache", os.path.join(ROOT, ".data")])
    assert code == 0
    with open(os.path.join(tmp_path, "quality_jax_sources_quick.md")) as f:
        text = f.read()
    assert "| lora_ga |" in text and "| hrp |" in text and "factorization full" in text
    assert "the source of a sentence (4 classes)" in text
    runs = [json.loads(line)["result"] for line in open(os.path.join(tmp_path, "quality_jax_sources_quick_runs.jsonl"))]
    assert len(runs) == 2
    assert sorted(len(r["curve"]) for r in runs) == [5, 6]  # LoRA-GA's batch counts as a step
    assert all(0.0 <= r["test"] <= 1.0 for r in runs)


@pytest.mark.skipif(BACKEND != "jax", reason="minutes on MiniLM; once per CI, on JAX")
def test_quality_probe_and_all_linear_targets(tmp_path):
    quality = _load("bench_quality")
    argv = ["--quick", "--methods", "keras", "eva", "--targets", "all", "--probe-steps", "2", "--tag", "_probe",
            "--out", str(tmp_path), "--cache", CACHE]
    assert quality.main(argv) == 0
    with open(os.path.join(tmp_path, "quality_jax_quick_probe.json")) as f:
        summary = json.load(f)
    assert summary["setting"]["targets"] == "all" and summary["setting"]["probe_steps"] == 2
    runs = [json.loads(line)["result"] for line in open(os.path.join(tmp_path, "quality_jax_quick_probe_runs.jsonl"))]
    assert [len(r["curve"]) for r in runs] == [4, 4]  # 6 steps, the probe's 2 counted; EVA's batches are not
    # rank-8 adapters on the 6 linear layers of 6 blocks, their biases (q, k, v, o, out: 384; in: 1536), the head
    adapters = quality._rank_budget(quality.parse(argv), recipe.default_preset())
    expected = adapters + 6 * (5 * 384 + 1536) + (384 * 2 + 2)
    assert summary["methods"]["keras"]["params"] == summary["methods"]["eva"]["params"] == [expected]
    text = open(os.path.join(tmp_path, "quality_jax_quick_probe.md")).read()
    assert "every linear layer of each block" in text and "Linear probe first" in text
    with pytest.raises(SystemExit):  # a probe trains a head; the head-free objective has none
        quality.parse(["--objective", "prototypes", "--probe-steps", "2"])


def test_quality_summary_differences(tmp_path):
    summary = _load("quality_summary")
    setting = {"task": "movies", "objective": "prototypes", "rank": 4, "targets": "qv", "factorization": "full",
               "preheat_rank": 32, "preheat_steps": 20, "probe_steps": 0, "steps": 200, "tag": "", "command": ""}
    methods = {"keras": {"test": [0.80, 0.82]}, "hrp": {"test": [0.83, 0.85]}, "pissa": {"test": [0.79]},
               "milora": {"test": [0.81]}, "full": {"test": [0.9]}}
    for name, item in (("quality_jax_x", {"setting": setting, "methods": methods}),
                       ("quality_jax_x_quick", {"setting": setting, "methods": methods}),  # left out
                       ("quality_jax_old", methods)):  # no setting: left out
        with open(os.path.join(tmp_path, f"{name}.json"), "w") as f:
            json.dump(item, f)
    assert summary.main(["--out", str(tmp_path)]) == 0
    text = open(os.path.join(tmp_path, "quality_summary.md")).read()
    [row] = [line for line in text.splitlines() if line.startswith("| movies")]
    # HRP - random: +3.00 points, standard error sqrt(2 * 0.01414^2 / 2) = 1.41 points
    assert "movies, head-free | r 4, q/v, full, R 32 | 81.00 ± 1.00 (2) | 84.00 ± 1.00 (2) | +3.00 ± 1.41" in row
    assert "| milora 81.00 (1) | +0.00 (1 seed) | 90.00 (1) |" in row
    assert os.path.getsize(os.path.join(tmp_path, "quality_summary.png")) > 0
    os.remove(os.path.join(tmp_path, "quality_jax_x.json"))
    assert summary.main(["--out", str(tmp_path)]) == 2


def test_lm_packed_loss_is_the_weighted_response_loss():
    bench_lm = _load("bench_lm")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype("float32")
    ids = rng.integers(0, 11, size=(3, 5))
    weight = (rng.random((3, 5)) > 0.4).astype("float32")
    packed = np.stack([ids, weight], -1).astype("float32")
    expected = bench_lm.instructions.response_loss()(ids, logits, sample_weight=weight)
    got = bench_lm.packed_loss(keras.ops.convert_to_tensor(packed), keras.ops.convert_to_tensor(logits))
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    by_hand = -(np.take_along_axis(log_p, ids[..., None], -1)[..., 0] * weight).sum() / weight.sum()
    np.testing.assert_allclose(float(got), by_hand, rtol=1e-5)


def test_defaults_rule_skips_a_candidate_worse_on_one_task(tmp_path):
    defaults = _load("defaults")
    setting = {"task": "movies", "objective": "head", "rank": 8, "targets": "qv", "factorization": "per_head",
               "preheat_rank": 32, "preheat_steps": 20, "probe_steps": 0, "steps": 200, "tag": "", "command": ""}
    quality = {"keras": {"lr": 0.002, "test": [0.80, 0.81, 0.82]}, "hrp": {"lr": 0.002, "test": [0.80, 0.81, 0.82]}}
    with open(os.path.join(tmp_path, "quality_jax.json"), "w") as f:
        json.dump({"setting": setting, "methods": quality}, f)
    suffix = "steps=200|bs=32"
    with open(os.path.join(tmp_path, "quality_jax_runs.jsonl"), "w") as f:
        for seed, test in enumerate([0.85, 0.86, 0.87]):  # keeping the preheat: +5 points on MiniLM
            variant = json.dumps({"init": "truncated_delta", "restore_weights": False}, sort_keys=True)
            f.write(json.dumps({"key": f"jax|hrp|{variant}|lr=0.002|seed={seed}|{suffix}", "result": {"test": test}}))
            f.write("\n" + json.dumps({"key": f"jax|keras||lr=0.002|seed={seed}|{suffix}", "result": {}}) + "\n")
            f.write(json.dumps({"key": f"jax|hrp|{variant}|lr=0.002|seed={seed}|steps=9|bs=32",  # another setting
                                "result": {"test": 0.1}}) + "\n")
    lm = {"setting": {"task": "reviews", "rank": 8, "targets": "all", "lrs": [1e-4]},
          "methods": {"keras": {"test": [4.00, 4.01, 4.02]}, "hrp": {"test": [3.99, 4.00, 4.01]},
                      "hrp_keep": {"test": [4.03, 4.04, 4.05]}}}  # NLL: keeping the preheat is worse here
    with open(os.path.join(tmp_path, "lm_jax_reviews.json"), "w") as f:
        json.dump(lm, f)
    evidence = defaults.quality_evidence(str(tmp_path)) + defaults.lm_evidence(str(tmp_path))
    keep = "keep the preheat (truncated delta, no roll back)"
    assert [len(e[4][keep]) for e in evidence] == [3, 3]  # the other setting's run left out
    summary, chosen = defaults.choose(evidence)
    paper = "paper (directions, B = 0, roll back)"
    assert summary[keep]["worse"] == 1 and not summary[keep]["eligible"]
    assert summary[keep]["mean"] > summary[paper]["mean"]  # best on average, yet refused
    np.testing.assert_allclose(summary[paper]["mean"], 0.5, rtol=1e-6)  # (0 + 0.01 / 0.01) / 2 stds
    assert chosen == paper and summary[paper]["settings"] == 2 and summary[paper]["tasks"] == "2 / 2"
    lm["methods"]["hrp_rank_auto"] = {"test": [3.0, 3.01, 3.02]}  # far ahead, on one task of two
    with open(os.path.join(tmp_path, "lm_jax_reviews.json"), "w") as f:
        json.dump(lm, f)
    summary, chosen = defaults.choose(defaults.quality_evidence(str(tmp_path)) + defaults.lm_evidence(str(tmp_path)))
    assert summary['rank="auto"']["tasks"] == "1 / 2" and not summary['rank="auto"']["eligible"]
    assert chosen == paper
    assert defaults.main(["--out", str(tmp_path)]) == 0
    text = open(os.path.join(tmp_path, "defaults.md")).read()
    assert "+5.000 ± 0.816 (3)" in text and "-0.030 ± 0.008 (3) **worse**" in text
    assert "SmolLM2 reviews; r 8, all linear, lr 0.0001 (untuned) ([lm_jax_reviews]" in text
    assert f"Chosen by the rule: **{paper}**" in text


@pytest.mark.skipif(BACKEND != "torch", reason="minutes on MiniLM; once per CI, on torch")
def test_speed_quick_run_reports_both_phases(tmp_path):
    speed = _load("bench_speed")
    args = speed.parse(["--quick", "--out", str(tmp_path)])
    hrp = speed._subprocess_run(args, "minilm:qv", "hrp", args.run_steps)
    stock = speed._subprocess_run(args, "minilm:qv", "stock", args.run_steps)
    assert 0 < hrp["switch_seconds"] < hrp["seconds"]
    # Preheat: rank-32 adapters, their Adam slots and the roll-back snapshot.
    assert hrp["first_state_bytes"] > 2 * hrp["final_state_bytes"]
    assert hrp["final_state_bytes"] == stock["final_state_bytes"]  # same model after the switch
    for run in (hrp, stock):
        assert 0 < run["rest_mib"] <= run["run_peak_mib"] and run["step_peak_mib"] <= run["run_peak_mib"]


@pytest.mark.skipif(BACKEND != "jax", reason="numpy data and argument plumbing; once")
def test_speed_decoder_setting_matches_the_recipe_and_peft():
    from common import smollm

    try:
        smollm.gguf_path()
    except smollm.SetupError as error:
        pytest.skip(str(error))
    speed = _load("bench_speed")
    args = speed.parse(["--settings", "smollm:all"])
    assert speed.batch_size("smollm:all", args) == 8 and speed.batch_size("gemma:all", args) == 1
    x, y = speed.data("smollm:all", args, 5)
    assert x["token_ids"].shape == y.shape == (5, args.seq_len)
    np.testing.assert_array_equal(x["token_ids"][:, 1:], y[:, :-1])  # next-token targets
    assert 0 < x["token_ids"].min() and y.max() < 49152  # SmolLM2's vocabulary
    # The same seven projections of every block on both sides.
    assert len(speed.PEFT_TARGETS["smollm"]) == len(speed._targets("smollm:all")) == 7


def test_interleaved_timing_alternates_the_order():
    calls = []
    times = timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [len(t) for t in times.values()] == [3, 3]
    assert timing.medians({"a": [3.0, 1.0, 2.0]}, per=2) == {"a": 1.0}


def test_fit_epoch_times_each_step_not_the_epoch():
    x, y = helpers.regression_data(n=24)
    model = helpers.hrp_mlp()
    model.compile(optimizer="sgd", loss="mse")
    stall = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: time.sleep(0.5))
    fit = timing.fit_epoch(model, x, y, batch_size=8)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[stall])  # compile
    times = timing.interleaved({"fit": fit, "wall": lambda: time.sleep(0.01)}, 2)
    assert len(times["fit"]) == 6 and all(0 < t < 0.5 for t in times["fit"])
    assert len(times["wall"]) == 2 and all(t >= 0.01 for t in times["wall"])


def test_floor_model_adapts_only_the_first_query():
    floor = _load("bench_floor")
    args = floor.bench_speed.parse(["--quick"])
    task = floor.floor_model("minilm:all", args)
    adapted = [layer for layer in internals.all_layers(task) if getattr(layer, "lora_enabled", False)]
    assert [layer.lora_rank for layer in adapted] == [1]
    assert "transformer_layer_0/" in adapted[0].path and adapted[0].path.endswith("query")

    full = floor.bench_speed.model("minilm:qv", "keras-hrp, full", args)
    queries = [layer for layer in internals.all_layers(full) if getattr(layer, "lora_enabled", False)]
    assert queries and all(layer.hrp_state.factorization == "full" for layer in queries)
    assert tuple(queries[0].lora_kernel_a.shape) == (384, args.rank)  # hidden -> r, not per head


def test_peak_memory_reset_sees_a_new_allocation():
    import mmap

    timing.reset_peak()
    before = timing.peak_rss_mib()
    block = mmap.mmap(-1, 64 * 2**20)  # fresh pages (a numpy array may reuse freed heap memory)
    block.write(b"\1" * len(block))  # touched
    assert timing.peak_rss_mib() - before > 50
    block.close()
    timing.reset_peak()
    assert timing.peak_rss_mib() < before + 50


@pytest.mark.skipif(BACKEND != "torch", reason="the same switch on every backend; once per CI")
def test_switch_benchmark_quick(tmp_path):
    switch = _load("bench_switch")
    assert switch.main(["--quick", "--out", str(tmp_path)]) == 0
    text = open(os.path.join(tmp_path, "switch_torch_quick.md")).read()
    assert "16 matrices 1024 x 1024, R=64 -> r=8" in text


@pytest.mark.skipif(BACKEND != "torch", reason="the same layers on every backend; once per CI")
def test_layers_benchmark_quick_reports_each_form(tmp_path):
    layers = _load("bench_layers")
    assert layers.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = [line.split(" | ") for line in open(os.path.join(tmp_path, "layers_torch_cpu_float32_quick.md"))
            if line.startswith("| MiniLM")]
    assert [row[0] for row in rows] == ["| MiniLM q (per head)", "| MiniLM MLP in"]
    assert all(row[6] == "merged" and float(row[3].strip("*")) > 0 for row in rows)
    frozen, over_frozen = (np.array([float(row[i].strip(" |\n")) for row in rows]) for i in (7, 8))
    assert np.all(frozen > 0) and np.all(over_frozen > 0)


@pytest.mark.skipif(BACKEND != "torch", reason="plain PyTorch products, no Keras: once, in the torch run")
def test_eager_benchmark_forms_compute_the_same_step(tmp_path):
    eager = _load("bench_eager")
    import torch

    gen = torch.Generator().manual_seed(0)
    x, dy, w = torch.randn(6, 5, generator=gen), torch.randn(6, 7, generator=gen), torch.randn(5, 7, generator=gen)
    a, b = torch.randn(5, 2, generator=gen), torch.randn(2, 7, generator=gen)
    frozen = eager.step("frozen", x, w, a, b, dy)
    steps = {form: eager.step(form, x, w, a, b, dy) for form in eager.FORMS[1:]}
    for form, (y, dx, da, db) in steps.items():  # y, dx of the merged weight; the factors' gradients
        torch.testing.assert_close(y, x @ (w + a @ b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, dy @ (w + a @ b).T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(da, x.T @ dy @ b.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(db, a.T @ x.T @ dy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frozen[0], x @ w)
    assert eager.main(["--quick", "--out", str(tmp_path)]) == 0
    row = [line for line in open(os.path.join(tmp_path, "eager_torch_quick.md")) if line.startswith("| tiny")][0]
    ratios = [float(cell) for cell in row.strip(" |\n").split(" | ")[2:]]
    assert len(ratios) == 4 and all(r > 0 for r in ratios)  # frozen ms, then three forms / frozen


def test_snippet_sources_are_balanced_fixed_and_from_four_sources():
    texts, labels = recipe.snippet_sources(CACHE)
    assert len(texts) == 14_800 and [labels.count(i) for i in range(4)] == [3700] * 4
    again = recipe.snippet_sources(CACHE, per_source=3700)  # the cached table
    assert again == (texts, labels)
    movies, _ = recipe.movie_reviews(CACHE)
    assert set(texts[labels.index(3):]) <= set(movies)  # label 3: the movie-review sentences


def test_prototype_classifier_has_no_new_head():
    keras_hub = pytest.importorskip("keras_hub", reason="needs the [hub] extra (keras-hub)")
    descriptions = recipe.DESCRIPTIONS["sources"]
    model = recipe.prototype_classifier(recipe.default_preset(), descriptions, 16, scale=20.0)
    head = model.get_layer("prototypes")
    assert not head.trainable
    np.testing.assert_allclose(np.linalg.norm(keras.ops.convert_to_numpy(head.kernel), axis=0), 20.0, rtol=1e-5)
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(recipe.default_preset(),
                                                                        sequence_length=16)
    x = {k: np.asarray(v) for k, v in preprocessor(list(descriptions)).items()}
    logits = model.predict(x, verbose=0)
    np.testing.assert_allclose(np.diag(logits), 20.0, rtol=1e-4)  # each description is its own prototype
    assert np.all(logits <= 20.0 + 1e-3)
    keras_hrp.enable_hrp(model, rank=2, preheat_rank=4)
    names = [v.path for v in model.trainable_variables]
    # 6 blocks x q, v x (A, B, bias: KerasHub's enable_lora trains the biases too); nothing else
    assert len(names) == 36 and all(name.split("/")[-2] in ("query", "value") for name in names)
