"""Every code block of the README and the docs pages, and every docstring
example of the package, runs as written.

Python blocks run in order, one namespace per page, in a fresh working
directory; a KerasHub preset a block names is replaced by a tiny stand-in
written from config (no download). A block whose first line is
`# requires: <modules>` runs only where those modules import. Shell blocks:
every `make` target they name exists, and every script they run is there.
Docstring examples run as doctests, with `keras`, `keras_hub`, `np` and
`keras_hrp` imported and `path` a tiny BERT preset.
"""

import doctest
import importlib
import importlib.util
import io
import os
import pkgutil
import re

import keras
import numpy as np
import pytest

import keras_hrp

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = ["README.md"] + sorted(f"docs/{name}" for name in os.listdir(DOCS) if name.endswith(".md"))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
STANDINS = {
    "bert_tiny_en_uncased": helpers.tiny_bert_preset,
    "llama3.2_instruct_1b": helpers.tiny_llama3_preset,
}


MODULES = sorted(info.name for info in pkgutil.walk_packages(keras_hrp.__path__, "keras_hrp."))


def blocks(page):
    """`[(language, code)]` of the page's fenced blocks, in order."""
    with open(os.path.join(ROOT, page)) as f:
        return [(m[1], m[2]) for m in FENCE.finditer(f.read())]


def _make_targets():
    with open(os.path.join(ROOT, "Makefile")) as f:
        return set(re.findall(r"^([\w-]+):", f.read(), re.M))


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md")) as f:
        assert len(f.read().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES)
def test_code_blocks_run(page, tmp_path, monkeypatch):
    code_blocks = blocks(page)
    targets = _make_targets()
    for language, code in code_blocks:
        if language in ("bash", "sh"):
            for line in code.splitlines():
                words = line.split("#")[0].split()
                if words[:1] == ["make"]:
                    assert set(words[1:]) <= targets, f"{page}: {line}"
                scripts = [w for w in words if w.endswith(".py") and "/" in w]
                assert all(os.path.exists(os.path.join(ROOT, s)) for s in scripts), f"{page}: {line}"
    python = [code for language, code in code_blocks if language == "python"]
    if not python:
        pytest.skip(f"{page} has no Python block")
    presets = {}
    for name, write in STANDINS.items():
        if any(f'"{name}"' in code for code in python):
            presets[name] = write(str(tmp_path / f"preset_{name}"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace = {"__name__": "__docs__"}
    for i, code in enumerate(python):
        required = re.match(r"# requires: (.*)", code)
        if required:
            missing = [m.strip() for m in required[1].split(",") if importlib.util.find_spec(m.strip()) is None]
            if missing:
                continue  # e.g. transformers + PEFT: benchmarks/check_peft_*.py run those against the real thing
        for name, directory in presets.items():
            code = code.replace(f'"{name}"', repr(directory))
        exec(compile(code, f"{page}, block {i + 1}", "exec"), namespace)


def _doctests(module):
    return [t for t in doctest.DocTestFinder().find(module, module.__name__) if t.examples]


def test_public_names_have_docstring_examples():
    undocumented = [name for name in dir(keras_hrp) if not name.startswith("_")
                    and not isinstance(getattr(keras_hrp, name), type(keras_hrp))
                    and "Example:" not in (getattr(keras_hrp, name).__doc__ or "")]
    assert undocumented == []


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    module = importlib.import_module(name)
    tests = _doctests(module)
    if not tests:
        pytest.skip(f"{name} has no docstring example")
    monkeypatch.chdir(tmp_path)
    extra = {"keras": keras, "np": np, "keras_hrp": keras_hrp}
    if any("keras_hub" in example.source for test in tests for example in test.examples):
        import keras_hub

        extra.update(keras_hub=keras_hub, path=helpers.tiny_bert_preset(str(tmp_path / "preset")))
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = io.StringIO()
    for test in tests:
        test.globs.update(extra)
        runner.run(test, out=out.write)
    assert runner.failures == 0, out.getvalue()
