"""Layer and variable paths that survive auto-generated names.

keras-hrp's files name layers by `layer.path`, which includes names Keras
makes up (`sequential_1/dense_2`): a second identical model in the same
process, or one rebuilt by `keras.saving.load_model`, has other paths. The
files therefore also record each path's *position*: the chain, from the
model down, of each layer's class name and its index among its siblings
of that class (`dense/dense_1`, as Keras' own weights files count them).
Loading matches a saved path exactly where the model has it, and by its
position where it does not, if the two paths differ only in such names:
their numbering (`_1`) and the model's own name in front.
"""

import re

from keras_hrp import internals


def _snake(name):
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def positions(model):
    """`{path: position}` of every layer under `model` and of every variable
    the layers own (a variable's position is its layer's plus its name)."""
    found, seen = {}, set()

    def walk(layer, prefix):
        counts = {}
        for child in internals.child_layers(layer):
            name = _snake(type(child).__name__)
            index = counts.get(name, 0)
            counts[name] = index + 1
            if id(child) in seen:  # a shared layer keeps its first position
                continue
            seen.add(id(child))
            position = f"{prefix}{name}" + (f"_{index}" if index else "")
            found.setdefault(child.path, position)
            for variable in internals.own_variables(child):
                found.setdefault(variable.path, f"{position}/{variable.name}")
            walk(child, position + "/")

    found[model.path] = ""
    walk(model, "")
    for variable in internals.own_variables(model):
        found.setdefault(variable.path, variable.name)
    return found


def of(model, saved_paths):
    """`{path: position}` for the paths a file is about to hold."""
    known = positions(model)
    return {path: known[path] for path in saved_paths if path in known}


def _unnumbered(path):
    return [re.sub(r"_\d+$", "", segment) for segment in path.split("/")]


def same_but_auto_names(saved_path, path):
    """Whether two paths differ only in numbering and a leading model name."""
    a, b = _unnumbered(saved_path), _unnumbered(path)
    short, long = sorted((a, b), key=len)
    return len(long) - len(short) <= 1 and long[len(long) - len(short):] == short


class Resolver:
    """Maps the paths a file holds to the paths of `model`.

    Args:
        model: the model loading the file.
        saved_positions: the file's `{path: position}` (empty for files
            written before positions were recorded: exact paths only).
    """

    def __init__(self, model, saved_positions):
        self._saved = dict(saved_positions or {})
        self._here = positions(model)
        self._by_position = {position: path for path, position in self._here.items()}

    def __call__(self, saved_path):
        """The model's path for `saved_path` (itself when the model has no
        match, so the caller reports it)."""
        if saved_path in self._here:
            return saved_path
        found = self._by_position.get(self._saved.get(saved_path))
        return found if found is not None and same_but_auto_names(saved_path, found) else saved_path

    def why(self, saved_path):
        """Why `saved_path` has no match here, naming both sides."""
        position = self._saved.get(saved_path)
        if position is None:
            return "the model has no layer or variable at this path"
        if position not in self._by_position:
            return f"the model has no layer or variable at this path, nor at its position '{position}'"
        return (f"at its position '{position}' the model has '{self._by_position[position]}', "
                "another layer")


def set_trainable(model, saved, resolve):
    """Gives `model`'s layers the trainable flags a file saved (`{path:
    flag}`, parents first: a frozen backbone, then the layers trained
    inside it); `resolve` maps the file's paths to the model's. Returns
    whether any flag changed."""
    flags = {resolve(path): flag for path, flag in (saved or {}).items()}
    changed = False
    for layer in internals.all_layers(model):
        if layer.path in flags and layer.trainable != flags[layer.path]:
            layer.trainable = flags[layer.path]
            changed = True
    return changed
