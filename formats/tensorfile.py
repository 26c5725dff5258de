"""Safetensors files, read and written without torch: the tensor-file format of Hugging Face
checkpoints (hf.py) and of our own checkpoint shards (checkpoint.py).

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
range), then the raw little-endian tensors. A slice of a tensor reads only the bytes it covers
(`byte_runs`): through a numpy memory map on a disk, as byte-range requests on an object store
(storage.py), so bf16 works without torch and a 70B checkpoint loads into sharded params on hosts
with far less memory, each process fetching only its own slices. Writing streams one tensor at a
time into a file that appears whole or not at all (storage.writer), and can checksum each tensor in fixed-size chunks as it goes (CRC-32), so a reader can verify just
the chunks a slice touches (checkpoint.py). A file cut short or with a garbled header is an error
naming the file.
"""
import itertools
import json
import math
import struct
import zlib

import jax
import ml_dtypes
import numpy as np

from formats import storage

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "U32": np.uint32, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsDir:
    """Every tensor of a directory of *.safetensors files, as lazily read numpy memory maps."""

    def __init__(self, path: str):
        index = storage.join(path, "model.safetensors.index.json")
        if storage.isfile(index):
            files = sorted(set(json.loads(storage.read_bytes(index))["weight_map"].values()))
        else:
            files = sorted(f for f in storage.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files (other formats: convert them "
                                    "with transformers' save_pretrained(safe_serialization=True))")
        self.entries = {}  # name -> (file, dtype, shape, byte offset)
        for name in files:
            file = storage.join(path, name)
            try:
                with storage.open(file, "rb") as f:
                    n = struct.unpack("<Q", f.read(8))[0]
                    header = json.loads(f.read(n))
                    size = f.seek(0, 2)  # the file's size (an object store's file knows it: no request)
            except (OSError, struct.error, ValueError) as e:  # ValueError: JSON or UTF-8
                raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
            for tensor, info in header.items():
                if tensor == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise ValueError(f"{file}: tensor {tensor}: unsupported dtype {info['dtype']}")
                start, stop = info["data_offsets"]
                if 8 + n + stop > size:
                    raise ValueError(f"{file}: cut short: tensor {tensor} ends at byte {8 + n + stop}, "
                                     f"the file has {size}")
                self.entries[tensor] = (file, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + start)

    def shape(self, name):
        return self.entries[name][2]

    def get_slice(self, name, index=()):
        """tensor[index] as a numpy array, reading only the bytes the slice covers."""
        file, dtype, shape, offset = self.entries[name]
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype)[index]
        if not storage.is_remote(file):
            return np.array(np.memmap(file, dtype, "r", offset=offset, shape=shape)[index])
        runs, out_shape = byte_runs(shape, index, np.dtype(dtype).itemsize)
        data = b"".join(storage.read_ranges(file, [(offset + a, offset + b) for a, b in runs]))
        return np.frombuffer(data, dtype).reshape(out_shape).copy()

    def raw(self, name, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of a tensor's data, as stored (C order)."""
        file, _, _, offset = self.entries[name]
        return storage.read_ranges(file, [(offset + start, offset + stop)])[0]


def byte_runs(shape: tuple, index: tuple, itemsize: int) -> tuple[list, tuple]:
    """The contiguous byte ranges [start, stop) of tensor[index] (index: slices of step 1; C order),
    in order, and the slice's shape. The trailing dims taken whole join each run, so a slice of
    leading rows is one range and a column block is one range per row."""
    bounds = [s.indices(n)[:2] for s, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape)]
    out_shape = tuple(max(b - a, 0) for a, b in bounds)
    if math.prod(out_shape) == 0:
        return [], out_shape
    strides = [math.prod(shape[d + 1:]) * itemsize for d in range(len(shape))]
    k = len(shape)  # dims k.. are taken whole; dim k-1 is a contiguous range within each run
    while k > 1 and bounds[k - 1] == (0, shape[k - 1]):
        k -= 1
    if k == 0:  # a scalar
        return [(0, itemsize)], out_shape
    lo, hi = bounds[k - 1]
    runs = []
    for outer in itertools.product(*(range(a, b) for a, b in bounds[:k - 1])):
        base = sum(i * st for i, st in zip(outer, strides))
        runs.append((base + lo * strides[k - 1], base + hi * strides[k - 1]))
    return runs, out_shape


def sharded_array(shape: tuple, sharding, read):
    """jax.make_array_from_callback(shape, sharding, read) reading each distinct slice once. JAX
    asks once per local device, so devices that hold the same slice (replicas over a data axis,
    serving's rows) would each read it again from the file or the bucket."""
    slices = {}

    def read_once(index):
        key = tuple((s.start, s.stop, s.step) for s in index)  # slices are not hashable before 3.12
        if key not in slices:
            slices[key] = read(index)
        return slices[key]
    return jax.make_array_from_callback(shape, sharding, read_once)


def chunk_checksums(data, chunk_bytes: int) -> list[int]:
    """CRC-32 of each `chunk_bytes` piece of `data` (the last one may be shorter)."""
    view = memoryview(data).cast("B")
    return [zlib.crc32(view[i:i + chunk_bytes]) for i in range(0, len(view), chunk_bytes)]


def write_safetensors(file: str, tensors: list, chunk_bytes: int | None = None) -> dict | None:
    """tensors: [(name, shape, dtype, produce)], produce() -> array; written one at a time. With
    `chunk_bytes`, returns {name: chunk_checksums of its bytes}."""
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(header, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8-byte alignment
    sums = {}
    with storage.writer(file) as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for name, shape, dtype, produce in tensors:
            array = np.asarray(produce()).astype(dtype, order="C", copy=False)
            assert array.shape == tuple(shape), (name, array.shape, shape)
            data = array.reshape(-1).view(np.uint8)  # the raw bytes, also of dtypes numpy cannot buffer (bf16)
            f.write(data)
            if chunk_bytes:
                sums[name] = chunk_checksums(data, chunk_bytes)
    return sums if chunk_bytes else None
