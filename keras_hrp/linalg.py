"""Pure linear-algebra helpers, written in `keras.ops` for every backend."""

from keras import ops


def _as_matrix(x, name):
    x = ops.convert_to_tensor(x, dtype="float32")
    if len(x.shape) != 2:
        raise ValueError(
            f"svd_of_product: `{name}` must be a 2D matrix. "
            f"Received: {name}.shape={tuple(x.shape)}"
        )
    return x


def svd_of_product(a, b, rank=None):
    """Truncated SVD of `a @ b`, computed from the factors.

    The product is never formed: `a = Qa Ra` and `b.T = Qb Rb` (reduced QR),
    so `a @ b = Qa (Ra Rb^T) Qb^T` and only the small core `Ra Rb^T` is
    decomposed. For `a` of shape `(m, k)` and `b` of shape `(k, n)` this costs
    O((m + n) k^2) instead of O(m n min(m, n)). Everything runs in float32.

    Args:
        a: matrix of shape `(m, k)`.
        b: matrix of shape `(k, n)`.
        rank: number of singular triplets to return, at most
            `min(m, n, k)`. `None` returns all of them.

    Returns:
        `(u, s, v)` with `u` of shape `(m, rank)`, `s` of shape `(rank,)` in
        descending order and `v` of shape `(n, rank)`, such that
        `u @ diag(s) @ v.T` is the best rank-`rank` approximation of `a @ b`.

    Example:

    >>> a = np.random.randn(512, 16); b = np.random.randn(16, 256)
    >>> u, s, v = svd_of_product(a, b, rank=4)
    >>> u.shape, s.shape, v.shape
    ((512, 4), (4,), (256, 4))
    """
    a = _as_matrix(a, "a")
    b = _as_matrix(b, "b")
    (m, k), (k_b, n) = a.shape, b.shape
    if k != k_b:
        raise ValueError(
            "svd_of_product: inner dimensions differ. "
            f"Received: a.shape={(m, k)}, b.shape={(k_b, n)}"
        )
    max_rank = min(m, n, k)
    if rank is None:
        rank = max_rank
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise ValueError(
            f"svd_of_product: `rank` must be an integer in [1, {max_rank}] "
            f"for a.shape={(m, k)}, b.shape={(k, n)}. Received: rank={rank}"
        )
    q_a, r_a = ops.qr(a, mode="reduced")
    q_b, r_b = ops.qr(ops.transpose(b), mode="reduced")
    core = ops.matmul(r_a, ops.transpose(r_b))
    u_core, s, vt_core = ops.svd(core, full_matrices=False)
    u = ops.matmul(q_a, u_core[:, :rank])
    v = ops.matmul(q_b, ops.transpose(vt_core[:rank, :]))
    return u, s[:rank], v
