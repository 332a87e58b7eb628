"""PEFT adapter directories on disk: `adapter_config.json` and
`adapter_model.safetensors`, read and written without torch (pure numpy)."""

import json
import os
import tempfile

import numpy as np

from keras_hrp import files

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix of every tensor name
_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}


def safetensors_bytes(tensors):
    """`tensors` (name -> array) in the safetensors format, as float32."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def read_safetensors(path):
    """The tensors of a safetensors file as float32 numpy arrays (F32, F16,
    BF16 or F64 in the file); `ValueError` naming the tensor otherwise."""
    with open(path, "rb") as stream:
        raw = stream.read()
    size = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8 : 8 + size]), raw[8 + size :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        data = body[slice(*info["data_offsets"])]
        if info["dtype"] == "BF16":  # the high half of a float32
            value = (np.frombuffer(data, "<u2").astype("<u4") << 16).view("<f4")
        elif info["dtype"] in _DTYPES:
            value = np.frombuffer(data, _DTYPES[info["dtype"]])
        else:
            raise ValueError(f"{path}: tensor '{name}' has dtype {info['dtype']}, not a float. "
                             f"Received: dtype={info['dtype']!r}")
        tensors[name] = value.astype("float32").reshape(info["shape"])
    return tensors


def write_atomic(path, data):
    """Writes `data` (bytes) to `path` through a temporary file in its folder."""
    handle, temporary = tempfile.mkstemp(prefix=files.temporary_prefix(), dir=os.path.dirname(path))
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
