"""Safetensors files, read and written without torch: the tensor-file format of Hugging Face
checkpoints (hf.py) and of our own checkpoint shards (checkpoint.py).

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
range), then the raw little-endian tensors. Reading goes through numpy memory maps of the raw file,
so bf16 works without torch and a slice of a tensor reads only the bytes it covers: a 70B
checkpoint loads into sharded params on hosts with far less memory, each process touching only its
own slices. Writing streams one tensor at a time into a temporary file, fsynced, then renamed.
"""
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "U32": np.uint32, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsDir:
    """Every tensor of a directory of *.safetensors files, as lazily read numpy memory maps."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files (other formats: convert them "
                                    "with transformers' save_pretrained(safe_serialization=True))")
        self.entries = {}  # name -> (file, dtype, shape, byte offset)
        for name in files:
            file = os.path.join(path, name)
            with open(file, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            for tensor, info in header.items():
                if tensor == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise ValueError(f"{file}: tensor {tensor}: unsupported dtype {info['dtype']}")
                self.entries[tensor] = (file, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + info["data_offsets"][0])

    def shape(self, name):
        return self.entries[name][2]

    def get_slice(self, name, index=()):
        """tensor[index] as a numpy array, reading only the bytes the slice covers."""
        file, dtype, shape, offset = self.entries[name]
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype)[index]
        return np.array(np.memmap(file, dtype, "r", offset=offset, shape=shape)[index])


def write_safetensors(file: str, tensors: list):
    """tensors: [(name, shape, dtype, produce)], produce() -> array; written one at a time."""
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(header, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8-byte alignment
    tmp = file + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for name, shape, dtype, produce in tensors:
            array = np.asarray(np.asarray(produce()).astype(dtype), order="C")
            assert array.shape == tuple(shape), (name, array.shape, shape)
            f.write(array.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)
