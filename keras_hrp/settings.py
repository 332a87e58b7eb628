"""Argument validation shared by every public entry point.

Each check raises `ValueError(f"{owner}: {message}. Received: name=value")`
(or `TypeError` for a value of the wrong kind), so an error names the
function or layer, the argument and the value it got. numpy integers and
booleans are accepted wherever Python ones are.
"""

import math
import numbers
import os
import re

import numpy as np

VARIANTS = ("classic", "asymmetric")
PHASES = ("preheat", "main")
# How an EinsumDense adapter factors its kernel: Keras' own (A keeps every
# kernel axis but the last, e.g. one A per attention head) or standard LoRA
# (A on the contracted input axes, B on every output axis).
FACTORIZATIONS = ("per_head", "full")
RANK_ALLOCATIONS = ("spectrum", "uniform")
# How the main-rank adapter starts: the paper's reading (top directions into
# A, B = 0) or the preheated delta truncated to rank r.
SWITCH_INITS = ("directions", "truncated_delta")


def fail(owner, message, error=ValueError, **received):
    """Raises `error(f"{owner}: {message}. Received: k=v, ...")`."""
    shown = ", ".join(f"{key}={value!r}" for key, value in received.items())
    raise error(f"{owner}: {message}. Received: {shown}")


def is_integer(value):
    """Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def integer(owner, name, value, minimum=None, optional=False):
    """`value` as a Python int (numpy integers accepted; bools refused)."""
    if value is None and optional:
        return None
    if not is_integer(value):
        fail(owner, f"`{name}` must be an integer", **{name: value})
    value = int(value)
    if minimum is not None and value < minimum:
        fail(owner, f"`{name}` must be an integer >= {minimum}", **{name: value})
    return value


def rank(owner, value, maximum, context):
    """A rank in `[1, maximum]` as a Python int; `context` says why that
    maximum (e.g. the shapes), in the error."""
    if not is_integer(value) or not 1 <= int(value) <= maximum:
        shown = int(value) if is_integer(value) else value
        fail(owner, f"`rank` must be an integer in [1, {maximum}] for {context}", rank=shown)
    return int(value)


def positive_number(owner, name, value, optional=False):
    """`value` as a finite, positive Python float."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        fail(owner, f"`{name}` must be a positive number", **{name: value})
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        fail(owner, f"`{name}` must be a positive, finite number", **{name: value})
    return value


def boolean(owner, name, value):
    if not isinstance(value, (bool, np.bool_)):
        fail(owner, f"`{name}` must be True or False", **{name: value})
    return bool(value)


def choice(owner, name, value, options):
    if not isinstance(value, str) or value not in options:
        fail(owner, f"`{name}` must be one of {options}", **{name: value})
    return value


def path(owner, name, value):
    """A file path: `str` or `os.PathLike`, returned as `str`."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        fail(owner, f"`{name}` must be a file path (str or os.PathLike)", **{name: value})
    return os.fspath(value)


def patterns(owner, name, value):
    """Layer names or regular expressions: one string or a list of strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(
        isinstance(item, str) and item for item in items
    ):
        fail(owner, f"`{name}` must be a non-empty string or list of strings", **{name: value})
    for item in items:
        try:
            re.compile(item)
        except re.error as error:
            fail(owner, f"`{name}` holds an invalid regular expression ({error})", **{name: item})
    return list(items)


def check_variant(owner, variant):
    return choice(owner, "variant", variant, VARIANTS)


def check_hrp_settings(owner, rank, preheat_rank, variant, lora_alpha=None):
    """Validated `(rank, preheat_rank, variant, lora_alpha)`."""
    variant = check_variant(owner, variant)
    rank = integer(owner, "rank", rank, minimum=1)
    preheat_rank = integer(owner, "preheat_rank", preheat_rank, optional=True)
    if preheat_rank is not None and preheat_rank <= rank:
        fail(
            owner,
            "`preheat_rank` must be an integer larger than `rank`",
            preheat_rank=preheat_rank,
            rank=rank,
        )
    lora_alpha = positive_number(owner, "lora_alpha", lora_alpha, optional=True)
    return rank, preheat_rank, variant, lora_alpha


def check_switch_settings(owner, init, warmup_steps, restore_weights=True):
    """Validated `(init, warmup_steps, restore_weights)`."""
    init = choice(owner, "init", init, SWITCH_INITS)
    warmup_steps = integer(owner, "warmup_steps", warmup_steps, minimum=0)
    restore_weights = boolean(owner, "restore_weights", restore_weights)
    return init, warmup_steps, restore_weights
