"""Sharded, atomic checkpoints: every process writes only its own shards; restore onto any mesh.

A checkpoint is a directory `out_dir/step_00001000/`:
    shards.p00000.safetensors   this process's shards of every array (one file per process)
    data.p00000.json            this process's data-loader position
    tokenizer.model             the run's sentencepiece model, copied in (process 0)
    meta.json                   step, run config, model config, seed, the tokenizer's added tokens
    COMMIT                      written last

Atomicity: everything is written under `step_XXXXXXXX.tmp/`, each file fsynced; after a barrier,
process 0 writes COMMIT, renames the directory to its final name and fsyncs the parent. A
directory without `.tmp` and with COMMIT is complete; anything else is ignored (and cleared by
the next save), so a crash at any instant leaves either the old set of checkpoints or the new one.
The directory must be on storage every process sees (NFS, a GCS fuse mount) for multi-host runs.

A checkpoint is complete in itself: moved to another disk or bucket, it still restores, exports
and samples (its tokenizer goes with it). Checkpoints written before they carried their tokenizer
have no `tokenizer.model` and no "tokenizer" in meta.json; `Reader.tokenizer()` returns None for
them and data.run_tokenizer rebuilds theirs from the run config.

Shards are stored in the safetensors layout (tensorfile.py) under names
`path@start:stop,start:stop`: the global slice each shard holds. Restoring builds every array
with `jax.make_array_from_callback` for the *target* sharding, copying each requested slice out
of whichever saved shards overlap it (memory-mapped, so a process reads only what it needs).
That is why a checkpoint restores onto a different mesh or process count.
"""
import json
import os
import re
import shutil

import jax
import numpy as np

import model
import tensorfile
from tokenizer import Tokenizer

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _barrier(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _flat(tree):
    return [(jax.tree_util.keystr(p, simple=True, separator="/"), x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _index_str(index, shape):
    return ",".join("{}:{}".format(*s.indices(n)[:2]) for s, n in zip(index, shape))


def committed(out_dir: str) -> list[int]:
    """Steps of the complete checkpoints in out_dir, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(out_dir) if (m := _STEP_DIR.match(name))
                  and os.path.exists(os.path.join(out_dir, name, "COMMIT")))


def step_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"step_{step:08d}")


def latest(path: str) -> str:
    """`path` if it is a checkpoint directory, else the newest complete checkpoint of out_dir `path`."""
    if os.path.exists(os.path.join(path, "COMMIT")):
        return path
    steps = committed(path)
    if not steps:
        raise FileNotFoundError(f"{path}: neither a checkpoint directory nor an out_dir with a complete checkpoint")
    return step_dir(path, steps[-1])


def save(out_dir: str, step: int, state, data_state: dict, meta: dict, keep: int, tokenizer: Tokenizer = None):
    """Write `state` (a pytree of jax arrays) as checkpoint `step`, with the run's tokenizer (its
    file copied in, its added tokens in meta.json); keep the newest `keep`."""
    final = step_dir(out_dir, step)
    tmp = final + ".tmp"
    proc = jax.process_index()
    if proc == 0:
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(out_dir):  # leftovers of an interrupted save
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(out_dir, name))
        os.makedirs(tmp)
    _barrier(f"ckpt-{step}-mkdir")

    tensors = []
    for path, array in _flat(state):
        for shard in array.addressable_shards:
            if shard.replica_id == 0:  # each slice written once, by the process holding replica 0
                name = f"{path}@{_index_str(shard.index, array.shape)}"
                tensors.append((name, shard.data.shape, shard.data.dtype, lambda d=shard.data: np.asarray(d)))
    tensorfile.write_safetensors(os.path.join(tmp, f"shards.p{proc:05d}.safetensors"), tensors)
    _write_json(os.path.join(tmp, f"data.p{proc:05d}.json"), data_state)
    _barrier(f"ckpt-{step}-written")

    if proc == 0:
        meta = {"step": step, "process_count": jax.process_count(), **meta}
        if tokenizer is not None:
            shutil.copyfile(tokenizer.model_path, os.path.join(tmp, "tokenizer.model"))
            _fsync_file(os.path.join(tmp, "tokenizer.model"))
            meta["tokenizer"] = {"file": "tokenizer.model", "added_tokens": sorted(tokenizer.added, key=tokenizer.added.get)}
        _write_json(os.path.join(tmp, "meta.json"), meta)
        _write_json(os.path.join(tmp, "COMMIT"), {"step": step})
        _fsync_dir(tmp)
        if os.path.exists(final):  # a checkpoint of the same step from before a crash
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(out_dir)
        for old in committed(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(step_dir(out_dir, old))
    _barrier(f"ckpt-{step}-done")


class Reader:
    """Any global slice of any saved array, assembled from the shards that overlap it (each read
    through a memory map, so only the bytes of the slice are touched)."""

    def __init__(self, path: str):
        if not os.path.exists(os.path.join(path, "COMMIT")):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMMIT)")
        self.path = path
        self.saved = tensorfile.SafetensorsDir(path)
        self.pieces = {}  # array path -> [(bounds per dim, entry name)]
        for name in self.saved.entries:
            key, _, index = name.rpartition("@")
            bounds = [tuple(map(int, r.split(":"))) for r in index.split(",")] if index else []
            self.pieces.setdefault(key, []).append((bounds, name))
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)

    def model_config(self) -> model.Config:
        return model.Config(**self.meta["model"])

    def tokenizer(self) -> Tokenizer | None:
        """The run's tokenizer, from the checkpoint's own copy; None for a checkpoint written before
        checkpoints carried their tokenizer (data.run_tokenizer rebuilds it from the run config)."""
        if "tokenizer" not in self.meta:
            return None
        saved = self.meta["tokenizer"]
        return Tokenizer(os.path.join(self.path, saved["file"]), added_tokens=tuple(saved["added_tokens"]))

    def shape(self, key):
        return tuple(max(b[d][1] for b, _ in self.pieces[key]) for d in range(len(self.pieces[key][0][0])))

    def read(self, key: str, index: tuple = ()):
        if key not in self.pieces:
            raise ValueError(f"{self.path}: no saved array {key!r} (saved: {', '.join(sorted(self.pieces)[:8])} ...)")
        shape = self.shape(key)
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        region = [s.indices(n)[:2] for s, n in zip(index, shape)]
        out, filled = None, 0
        for bounds, name in self.pieces[key]:
            lo = [max(a, c) for (a, _), (c, _) in zip(region, bounds)]
            hi = [min(b, d) for (_, b), (_, d) in zip(region, bounds)]
            if any(l >= h for l, h in zip(lo, hi)):
                continue
            block = self.saved.get_slice(name, tuple(slice(l - c, h - c) for l, h, (c, _) in zip(lo, hi, bounds)))
            if out is None:
                out = np.empty([b - a for a, b in region], block.dtype)
            out[tuple(slice(l - a, h - a) for l, h, (a, _) in zip(lo, hi, region))] = block
            filled += block.size
        if out is None or filled != out.size:
            raise ValueError(f"{self.path}: {key} slice {region} is not fully covered by the saved shards")
        return out

    def data_states(self) -> list:
        """The data-loader state of each process of the run that saved this checkpoint."""
        states = []
        for proc in range(self.meta["process_count"]):
            with open(os.path.join(self.path, f"data.p{proc:05d}.json")) as f:
                states.append(json.load(f))
        return states


def restore(path: str, target):
    """Read checkpoint directory `path` into arrays shaped and sharded like `target` (a pytree of
    jax.ShapeDtypeStruct with shardings; a subset of the saved tree is fine, e.g. only params).
    Returns (state, reader); reader.meta and reader.data_states() hold the rest."""
    reader = Reader(path)
    leaves = []
    for key, spec in _flat(target):
        if key in reader.pieces and reader.shape(key) != tuple(spec.shape):
            raise ValueError(f"{path}: {key} was saved with shape {reader.shape(key)}, expected {spec.shape}")
        leaves.append(jax.make_array_from_callback(
            spec.shape, spec.sharding, lambda idx, k=key, s=spec: reader.read(k, idx).astype(s.dtype)))
    return jax.tree.unflatten(jax.tree.structure(target), leaves), reader
