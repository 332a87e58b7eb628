"""The decoder tasks (`benchmarks/common/instructions.py`): real pairs,
pinned, cached, split, and encoded with the loss on the response only."""

import ast
import os
import sys

import numpy as np
import pytest

from tests.helpers import BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
CACHE = os.path.join(ROOT, ".data")

from common import instructions  # noqa: E402
from common import recipe  # noqa: E402
from common import smollm  # noqa: E402

once = pytest.mark.skipif(BACKEND != "jax", reason="the data is backend-independent; once per CI, on JAX")
VERSION = ".".join(map(str, sys.version_info[:3]))


@once
def test_docstring_pairs_are_the_pinned_real_functions(tmp_path):
    if VERSION not in instructions.STDLIB_DIGESTS:
        pytest.skip(f"no digest pinned for Python {VERSION}")
    pairs = instructions.docstrings(str(tmp_path))
    assert instructions.digest(pairs) == instructions.STDLIB_DIGESTS[VERSION]
    assert len(pairs) == 2256  # Python 3.11.7
    assert instructions.docstrings(str(tmp_path)) == pairs  # the cached TSV, newlines and tabs intact
    modules = set()
    for instruction, response in pairs:
        function = ast.parse(response).body[0]
        assert isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)), response
        assert f"`{function.name}`" in instruction and ast.get_docstring(function) is None
        assert len(response) <= instructions.MAX_RESPONSE_CHARS
        modules.add(instruction.split("`")[3])
    assert {"json.decoder", "inspect", "collections"} <= modules and len(modules) > 100
    assert ("Write the Python function `signature` of the module `inspect`: "
            "Get a signature object for the passed callable.") in dict(pairs)


def test_a_changed_standard_library_is_refused(monkeypatch):
    monkeypatch.setitem(instructions.STDLIB_DIGESTS, VERSION, "0" * 64)
    monkeypatch.setattr(instructions, "docstring_pairs", lambda: [("Write f.", "def f():\n    pass")])
    with pytest.raises(recipe.SetupError, match=f"Python {VERSION}'s standard library gives other docstring pairs"):
        instructions._checked_docstrings()
    monkeypatch.delitem(instructions.STDLIB_DIGESTS, VERSION)
    with pytest.warns(UserWarning, match="gives 1 docstring pairs"):
        assert instructions._checked_docstrings() == [("Write f.", "def f():\n    pass")]


@pytest.mark.parametrize("score, mood", [(-2.5, "very negative"), (-2.0, "negative"), (-0.6, "negative"),
                                         (-0.4, None), (0.49, None), (0.5, "positive"), (2.0, "very positive")])
def test_moods_follow_the_mean_rating(score, mood):
    assert instructions._mood(score) == mood


@once
def test_review_pairs_come_from_every_source_and_mood():
    pairs = instructions.reviews(CACHE)
    assert len(pairs) == 19121
    assert len({instruction for instruction, _ in pairs}) == 16  # 4 sources x 4 moods
    assert max(len(response) for _, response in pairs) <= instructions.MAX_RESPONSE_CHARS
    scores = {" ".join(text.split()): float(score) for _, score, text in recipe.ground_truth(CACHE, "movieReviewSnippets")}
    movies = [(instruction, response) for instruction, response in pairs if "movie review" in instruction]
    assert len(movies) == 9978
    for instruction, response in movies:
        assert instruction == f"Write one {instructions._mood(scores[response])} sentence from a movie review."


def test_splits_are_fixed_and_disjoint():
    pairs = [(f"i{k}", f"r{k}") for k in range(100)]
    train, val, test = instructions.split(pairs, seed=3, val_size=10, test_size=20)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(train + val + test) == sorted(pairs)
    assert instructions.split(pairs, seed=3, val_size=10, test_size=20)[2] == test
    assert instructions.split(pairs, seed=4, val_size=10, test_size=20)[2] != test


try:
    smollm.gguf_path()
    TOKENIZER = True
except smollm.SetupError:
    TOKENIZER = False


@once
@pytest.mark.skipif(not TOKENIZER, reason=f"the decoder ({smollm.PACKAGE}) is not installed")
def test_encoding_weighs_the_response_and_end_only():
    tokenizer = smollm.tokenizer(smollm.read_metadata())
    pairs = [("Say hi.", "Hi there!"), ("Write a long one.", "word " * 40), ("Name a color.", "Blue.")]
    x, y, weight, kept = instructions.encode(tokenizer, pairs, sequence_length=24)
    np.testing.assert_array_equal(kept, [0, 2])  # the long pair does not fit 24 tokens
    assert x["token_ids"].shape == y.shape == weight.shape == x["padding_mask"].shape == (2, 24)
    np.testing.assert_array_equal(x["token_ids"][:, 1:], y[:, :-1])  # next-token targets
    assert (x["token_ids"][:, 0] == tokenizer.token_to_id(smollm.START)).all()
    for row, (instruction, response) in enumerate(pairs[i] for i in kept):
        target = y[row][weight[row] > 0]
        assert tokenizer.detokenize(target) == response + smollm.END
        prompt = tokenizer.detokenize(x["token_ids"][row][: int(np.argmax(weight[row])) + 1])
        assert prompt == smollm.chat_prompt(instruction)
        assert weight[row].sum() == len(tokenizer(response)) + 1
        assert x["padding_mask"][row].sum() == len(tokenizer(prompt)) + weight[row].sum() - 1
        assert not (weight[row] * ~x["padding_mask"][row]).any()
