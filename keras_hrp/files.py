"""keras-hrp's own files: one `.npz` (no pickle) with a JSON header.

Writes are atomic (a temporary file in the same folder, then a rename), so
an interrupted save never leaves a half-written file at the path. Reads
check the kind and version and turn every way a file can be damaged into
one error that names the caller and the path.
"""

import json
import os
import tempfile
import zipfile

import numpy as np

from keras_hrp import settings

HEADER = "__keras_hrp__"
LEGACY_HEADER = "__keras_hrp_adapters__"  # adapter files of format 1


def write(path, kind, version, header, arrays):
    """Writes `arrays` and `{"kind", "version", **header}` to `path`, atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    meta = {"kind": kind, "version": version, **header}
    arrays = dict(arrays)
    arrays[HEADER] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    handle, temporary = tempfile.mkstemp(prefix=".keras_hrp_", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def read(path, kind, versions, owner):
    """`(header, arrays)` of a keras-hrp file of `kind`, or a clear error.

    Args:
        path: the file.
        kind: the kind of file expected (`"adapters"`, `"checkpoint"`).
        versions: the format versions this release reads.
        owner: the caller, named in every error.
    """
    if not os.path.isfile(path):
        settings.fail(owner, "no such file", error=FileNotFoundError, path=path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        key = HEADER if HEADER in arrays else LEGACY_HEADER
        header = json.loads(arrays.pop(key).tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        settings.fail(
            owner,
            f"not a readable keras-hrp {kind} file (damaged, truncated or foreign: "
            f"{type(error).__name__}: {error})",
            path=path,
        )
    found = header.get("kind", "adapters") if isinstance(header, dict) else None
    if found != kind:
        settings.fail(owner, f"not a keras-hrp {kind} file (it holds {found!r})", path=path)
    version = header.get("version", header.get("format"))
    if version not in versions:
        settings.fail(
            owner,
            f"format version {version!r} is not one this release reads ({list(versions)}); "
            "it may come from a newer keras-hrp",
            path=path,
        )
    return header, arrays
