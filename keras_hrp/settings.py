"""Validation of the HRP settings shared by `HRPDense` and `enable_hrp`."""

VARIANTS = ("classic", "asymmetric")
# How the main-rank adapter starts: the paper's reading (top directions into
# A, B = 0) or the preheated delta truncated to rank r.
SWITCH_INITS = ("directions", "truncated_delta")


def fail(owner, message, **received):
    """Raises `ValueError(f"{owner}: {message}. Received: k=v, ...")`."""
    shown = ", ".join(f"{key}={value!r}" for key, value in received.items())
    raise ValueError(f"{owner}: {message}. Received: {shown}")


def check_variant(owner, variant):
    if variant not in VARIANTS:
        fail(owner, f"`variant` must be one of {VARIANTS}", variant=variant)


def check_hrp_settings(owner, rank, preheat_rank, variant):
    """Raises a `ValueError` naming `owner` for an invalid HRP setting."""
    check_variant(owner, variant)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        fail(owner, "`rank` must be a positive integer", rank=rank)
    if preheat_rank is not None and (
        not isinstance(preheat_rank, int) or preheat_rank <= rank
    ):
        fail(
            owner,
            "`preheat_rank` must be an integer larger than `rank`",
            preheat_rank=preheat_rank,
            rank=rank,
        )


def check_switch_settings(owner, init, warmup_steps):
    """Raises a `ValueError` naming `owner` for an invalid switch option."""
    if init not in SWITCH_INITS:
        fail(owner, f"`init` must be one of {SWITCH_INITS}", init=init)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        fail(owner, "`warmup_steps` must be a non-negative integer", warmup_steps=warmup_steps)
