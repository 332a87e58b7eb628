"""Real instruction -> response tasks for the decoder recipe and `bench_lm`.

Two tasks of different kinds, each a list of `(instruction, response)` pairs
cached as TSV, with fixed seeded splits (`split`):

- `reviews`: write one sentence of a given sentiment and source. The
  sentences and their mean human ratings (-4..4) are the four
  `*_GroundTruth.txt` files of the pinned `vaderSentiment==3.3.2` sdist
  (MIT; see `recipe`): tweets, New York Times editorials, Amazon product
  reviews and movie reviews. Near-neutral ratings (|mean| < 0.5) are left out.
- `docstrings`: write a standard-library function from its name, module and
  docstring summary. The functions are the running Python's own standard
  library sources (PSF-2.0), read with `ast`; the response is the function
  without its docstring, as `ast.unparse` prints it. The pairs depend on the
  Python version, so their digest is pinned per version (`STDLIB_DIGESTS`).

`encode` turns pairs into ChatML token ids with a loss weight on the
response tokens (and the end token) only.
"""

import ast
import csv
import hashlib
import os
import sys
import sysconfig
import warnings

import numpy as np

from common import recipe

MAX_RESPONSE_CHARS = 240
MAX_SUMMARY_CHARS = 160
MOODS = ((-99.0, -2.0, "very negative"), (-2.0, -0.5, "negative"), (0.5, 2.0, "positive"), (2.0, 99.0, "very positive"))
SOURCE_NAMES = {"tweets": "a tweet", "nytEditorialSnippets": "a New York Times editorial",
                "amazonReviewSnippets": "an Amazon product review", "movieReviewSnippets": "a movie review"}
SKIPPED_PACKAGES = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip",
                    "site-packages", "dist-packages", "__pycache__", "pydoc_data", "venv"}
# sha256 of the `docstrings` pairs, per Python version; a mismatch is refused.
STDLIB_DIGESTS = {"3.11.7": "11979efe286bc182a85eff091d1a2a09c0a3091f5deac5acd2c3b098fd2ca323"}


def _mood(score):
    for low, high, name in MOODS:
        if low <= score < high:
            return name
    return None


def review_pairs(cache):
    """`[(instruction, response)]` of the sentiment-conditioned sentences."""
    pairs = []
    for source, name in SOURCE_NAMES.items():
        for _, score, text in recipe.ground_truth(cache, source):
            mood, text = _mood(float(score)), " ".join(text.split())
            if mood and len(text) <= MAX_RESPONSE_CHARS:
                pairs.append((f"Write one {mood} sentence from {name}.", text))
    return pairs


def _summary(docstring):
    """The first paragraph of a docstring, on one line."""
    return " ".join(docstring.strip().split("\n\n")[0].split())


def _stdlib_files():
    root = sysconfig.get_paths()["stdlib"]
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_PACKAGES and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                yield path, os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")


def docstring_pairs():
    """`[(instruction, response)]` of the standard library's documented
    public functions whose summary and undocumented source are short."""
    pairs, seen = [], set()
    for path, module in _stdlib_files():
        try:
            with open(path, encoding="utf-8") as stream:
                tree = ast.parse(stream.read())
        except (SyntaxError, UnicodeDecodeError):  # a few sources are fixtures, not Python 3
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            docstring = ast.get_docstring(node)
            if not docstring or len(node.body) < 2:
                continue
            summary = _summary(docstring)
            node.body, node.decorator_list = node.body[1:], []
            response = ast.unparse(node)
            if len(summary) > MAX_SUMMARY_CHARS or len(response) > MAX_RESPONSE_CHARS or response in seen:
                continue
            seen.add(response)
            pairs.append((f"Write the Python function `{node.name}` of the module `{module}`: {summary}", response))
    return pairs


def digest(pairs):
    """The sha256 of `pairs` (one instruction and response per line)."""
    text = "".join(f"{instruction}\t{response}\n" for instruction, response in pairs)
    return hashlib.sha256(text.encode()).hexdigest()


def _checked_docstrings():
    pairs = docstring_pairs()
    version = ".".join(map(str, sys.version_info[:3]))
    expected, found = STDLIB_DIGESTS.get(version), digest(pairs)
    if expected is None:
        warnings.warn(f"Python {version}'s standard library gives {len(pairs)} docstring pairs (digest "
                      f"{found[:12]}); results pinned for {sorted(STDLIB_DIGESTS)} may differ.", stacklevel=3)
    elif found != expected:
        raise recipe.SetupError(f"Python {version}'s standard library gives other docstring pairs than "
                                f"the pinned ones (sha256 {found[:12]}, expected {expected[:12]}).")
    return pairs


def _cached_pairs(cache, name, make):
    path = os.path.join(cache, name)
    if not os.path.exists(path):
        pairs = make()
        os.makedirs(cache, exist_ok=True)
        with open(path + f".{os.getpid()}.tmp", "w", newline="", encoding="utf-8") as stream:
            csv.writer(stream, delimiter="\t", lineterminator="\n").writerows(pairs)
        os.replace(path + f".{os.getpid()}.tmp", path)
    with open(path, newline="", encoding="utf-8") as stream:
        return [tuple(row) for row in csv.reader(stream, delimiter="\t", lineterminator="\n")]


def reviews(cache):
    """The `reviews` pairs, cached in `cache`."""
    return _cached_pairs(cache, "instructions_reviews.tsv", lambda: review_pairs(cache))


def docstrings(cache):
    """The `docstrings` pairs of this Python version, cached in `cache`."""
    version = "".join(map(str, sys.version_info[:3]))
    return _cached_pairs(cache, f"instructions_docstrings_py{version}.tsv", _checked_docstrings)


TASKS = {"reviews": reviews, "docstrings": docstrings}


def split(pairs, seed=0, val_size=200, test_size=400):
    """Fixed seeded `(train, validation, test)` lists of `pairs`."""
    return tuple([pairs[i] for i in part] for part in recipe.split_indices(len(pairs), seed, val_size, test_size))


def encode(tokenizer, pairs, sequence_length, prompt=None):
    """`(x, y, sample_weight, kept)`: next-token inputs and targets of the
    ChatML conversations `prompt(instruction) + response + end`, weighted on
    the response and end tokens only. Pairs longer than `sequence_length + 1`
    tokens are left out; `kept` indexes the rest."""
    from common import smollm

    prompt = prompt or smollm.chat_prompt
    prompts = tokenizer([prompt(instruction) for instruction, _ in pairs])
    responses = tokenizer([response for _, response in pairs])
    end = tokenizer.end_token_id
    rows, kept = [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = [int(t) for t in p] + [int(t) for t in r] + [end]
        if len(ids) <= sequence_length + 1:
            rows.append((ids, len(p)))
            kept.append(i)
    n = len(rows)
    ids = np.full((n, sequence_length + 1), tokenizer.pad_token_id, "int32")
    weight = np.zeros((n, sequence_length), "float32")
    mask = np.zeros((n, sequence_length), bool)
    for row, (tokens, prompt_length) in enumerate(rows):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens) - 1] = True
        weight[row, prompt_length - 1 : len(tokens) - 1] = 1.0  # targets from the first response token
    return {"token_ids": ids[:, :-1], "padding_mask": mask}, ids[:, 1:], weight, np.asarray(kept, "int64")


def training_arrays(tokenizer, pairs, sequence_length, steps, batch_size, seed):
    """`(x, y, sample_weight)` of exactly `steps` batches of `pairs` in a
    seeded order (pairs too long for `sequence_length` skipped; repeated
    when too few)."""
    needed = steps * batch_size
    order = np.random.default_rng(seed).permutation(len(pairs))[: needed + needed // 4 + 64]
    x, y, weight, kept = encode(tokenizer, [pairs[i] for i in order], sequence_length)
    repeat = np.resize(np.arange(len(kept)), needed)
    return {k: v[repeat] for k, v in x.items()}, y[repeat], weight[repeat]


def response_loss():
    """The training loss: cross-entropy averaged over the response tokens
    (their sample weights), not over every position."""
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")


def evaluate(lm, data, batch_size=16):
    """`{"nll", "token_accuracy"}` of `lm` on `data` (`encode`'s first three
    arrays): the response loss in nats per token and the teacher-forced
    next-token accuracy. Recompiles `lm` (greedy sampler): call it after
    training."""
    import keras

    lm.compile(loss=response_loss(), sampler="greedy", weighted_metrics=[
        keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="nll"),
        keras.metrics.SparseCategoricalAccuracy(name="token_accuracy")])
    x, y, weight = data
    scores = keras.Model.evaluate(lm, x, y, sample_weight=weight, batch_size=batch_size, verbose=0, return_dict=True)
    return {"nll": float(scores["nll"]), "token_accuracy": float(scores["token_accuracy"])}
