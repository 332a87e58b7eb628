"""keras-hrp's own files: one `.npz` (no pickle) with a JSON header.

Writes are atomic (a temporary file in the same folder, then a rename), so
an interrupted save never leaves a half-written file at the path; the
temporaries are named after the host and process that write them, so a
later save removes those a killed process left (`remove_strays`). Reads
check the kind and version and turn every way a file can be damaged into
one error that names the caller and the path.
"""

import json
import os
import re
import socket
import tempfile
import zipfile
import zlib

import numpy as np

from keras_hrp import settings

HEADER = "__keras_hrp__"
LEGACY_HEADER = "__keras_hrp_adapters__"  # adapter files of format 1


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_STRAY = re.compile(r"\.keras_hrp_(?P<host>[A-Za-z0-9-]+)_(?P<pid>\d+)_")


def temporary_prefix():
    """The name prefix of this process's temporary files (host and pid)."""
    return f".keras_hrp_{_HOST}_{os.getpid()}_"


def remove_strays(folder):
    """Removes the temporary files that processes of this host, no longer
    running (killed mid-save), left in `folder`; returns their names."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _STRAY.match(name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        try:
            os.remove(os.path.join(folder, name))
            removed.append(name)
        except OSError:  # another process removed it first, or a folder
            pass
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fingerprint(path):
    """`{"size", "mtime_ns", "crc32"}` of the file at `path`, or `None`
    where it is no regular file (a folder, a missing path)."""
    if not os.path.isfile(path):
        return None
    info = os.stat(path)
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "crc32": _crc32(path)}


def matches(saved, path):
    """Whether the file at `path` is the one `fingerprint` described as
    `saved`: same size, and same modification time (a rename keeps it) or,
    for a copy, the same checksum."""
    if not os.path.isfile(path):
        return False
    info = os.stat(path)
    if info.st_size != saved["size"]:
        return False
    return info.st_mtime_ns == saved["mtime_ns"] or _crc32(path) == saved["crc32"]


def _crc32(path):
    crc = 0
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 24), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def read_header(path):
    """The JSON header of a keras-hrp file (its arrays unread), or `None`
    where it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(data[HEADER].tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError):
        return None


def write(path, kind, version, header, arrays):
    """Writes `arrays` and `{"kind", "version", **header}` to `path`, atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    meta = {"kind": kind, "version": version, **header}
    arrays = dict(arrays)
    arrays[HEADER] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    handle, temporary = tempfile.mkstemp(prefix=temporary_prefix(), suffix=".tmp", dir=folder)
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
