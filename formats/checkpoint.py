"""Sharded, atomic, verified checkpoints: every process writes only its own shards; restore onto any mesh.

A checkpoint is a directory `out_dir/step_00001000/`:
    shards.p00000.safetensors   this process's shards of every array (one file per process)
    data.p00000.json            this process's data-loader position
    checksums.p00000.json       CRC-32 of each 64 MiB chunk of this process's shards, and of its data file
    tokenizer.model             the run's sentencepiece model, copied in (process 0)
    meta.json                   step, run config, model config, seed, the tokenizer's added tokens (process 0)
    COMMIT                      written last, by process 0: CRC-32 of meta.json and tokenizer.model

Atomicity: a step folder with COMMIT is complete; anything else is ignored, so a crash at any
instant leaves either the old set of checkpoints or the new one.
- On a disk, everything is written under `step_XXXXXXXX.tmp/`, each file fsynced; after a
  barrier, process 0 writes COMMIT, renames the folder to its final name, fsyncs the parent.
- On an object store (out_dir a URL: gs://bucket/run, see storage.py) there is no atomic rename,
  so the files are written in place, each object appearing whole or not at all, the folder
  marked UNFINISHED first; after a barrier, process 0 writes COMMIT, then drops the mark. A
  same-step checkpoint already committed there is kept as it is (a run reaches a step it has a
  checkpoint of only by resuming from it: the state is the same).
- Deleting one marks it UNFINISHED, then removes COMMIT, so a crash mid-delete leaves an
  uncommitted folder marked as the loop's own.
The next save removes the loop's own interrupted writes and deletes (a `.tmp` folder, a marked
one) and sets aside any other folder without COMMIT, naming each.
Rotation keeps the newest `keep` and never deletes the checkpoint just written. For multi-host
runs out_dir must be storage every process sees: a bucket URL or a shared file system.

Integrity: `Reader` verifies what it reads. A slice of a saved tensor verifies the chunks its bytes
lie in, each once, so a restore onto another mesh checks only its own share and no host re-reads
other hosts' files whole (on an object store a slice is cut from the verified chunks it was
checked in: one request a slice); JSON files and the tokenizer are verified whole; a checksum file carries
its own CRC. A mismatch, a file cut short, a garbled header or JSON raise CheckpointError naming
the file (train.py then falls back to an older checkpoint).

A checkpoint is complete in itself: moved to another disk or bucket, it still restores, exports
and samples (its tokenizer goes with it).

Shards are stored in the safetensors layout (tensorfile.py) under names
`path@start:stop,start:stop`: the global slice each shard holds. Restoring builds every array
with `jax.make_array_from_callback` (tensorfile.sharded_array) for the *target* sharding, copying
each requested slice out of whichever saved shards overlap it (byte ranges, so a process reads
only what it needs, and a slice several of its devices hold once).
That is why a checkpoint restores onto a different mesh or process count.

Resume (`restore_newest`) takes the newest checkpoint that verifies (checksums, readable files,
finite values), agreed by every process; newer ones that do not are set aside (`step_X.corrupt`),
and if none verifies the run stops naming them, rather than starting over. It tells damage from a
network error: a read of an object store that fails after gcsfs's retries stops the run, setting
nothing aside (start it again), so a passing network fault never costs the newest checkpoint. A
checkpoint of another model (any field that changes the math) is refused before anything is written.
"""
import json
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np

import config
import model
from formats import storage, tensorfile
from formats.tokenizer import Tokenizer

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_DIR = re.compile(r"^step_\d{8}\.tmp$")
CHUNK_BYTES = 64 << 20  # the grain of shard checksums: a restore verifies whole chunks


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not match its checksum; names the file."""


def _barrier(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _damage(e: OSError, path: str) -> bool:
    """Whether a failed read means a damaged checkpoint: a missing file, or any error of a local
    file. Other errors of an object store (timeouts, connections) pass through: restore_newest must
    not set a good checkpoint aside because the network failed."""
    return isinstance(e, FileNotFoundError) or not storage.is_remote(path)


def _write_bytes(path: str, data: bytes) -> int:
    """Write whole or not at all (storage.writer); returns the CRC-32 of what was written."""
    storage.write_bytes(path, data)
    return zlib.crc32(data)


def _write_json(path: str, obj) -> int:
    return _write_bytes(path, json.dumps(obj, indent=1).encode())


def _self_checked(obj: dict) -> dict:
    """obj plus "self": the CRC-32 of its own canonical JSON, so it can be verified alone."""
    return {**obj, "self": zlib.crc32(json.dumps(obj, sort_keys=True).encode())}


def _flat(tree):
    return [(jax.tree_util.keystr(p, simple=True, separator="/"), x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _index_str(index, shape):
    return ",".join("{}:{}".format(*s.indices(n)[:2]) for s, n in zip(index, shape))


def committed(out_dir: str) -> list[int]:
    """Steps of the complete checkpoints in out_dir, oldest first."""
    return sorted(int(m.group(1)) for name in storage.listdir(out_dir) if (m := _STEP_DIR.match(name))
                  and storage.exists(storage.join(out_dir, name, "COMMIT")))


def step_dir(out_dir: str, step: int) -> str:
    return storage.join(out_dir, f"step_{step:08d}")


# The mark of a folder the loop itself is writing in place (an object store) or deleting, written
# before the first file of the write, before COMMIT is removed: a folder without COMMIT is removed
# by the next save only when it is marked (or is a local step_X.tmp); any other is set aside.
UNFINISHED = "UNFINISHED"


def _discard(path: str):
    """Delete a checkpoint folder, marked first, then COMMIT: a crash midway leaves it
    uncommitted and marked as ours, not half a checkpoint."""
    storage.write_bytes(storage.join(path, UNFINISHED), b"being deleted\n")
    if storage.exists(storage.join(path, "COMMIT")):
        storage.remove(storage.join(path, "COMMIT"))
    storage.rmtree(path)


def latest(path: str) -> str:
    """`path` if it is a checkpoint directory, else the newest complete checkpoint of out_dir `path`."""
    if storage.exists(storage.join(path, "COMMIT")):
        return path
    steps = committed(path)
    if not steps:
        raise FileNotFoundError(f"{path}: neither a checkpoint directory nor an out_dir with a complete checkpoint")
    return step_dir(path, steps[-1])


def set_aside(path: str) -> str:
    """Rename a checkpoint that does not verify to `path.corrupt` (kept for inspection, never read)."""
    target, n = path + ".corrupt", 1
    while storage.exists(target):
        target, n = f"{path}.corrupt{n}", n + 1
    if storage.is_remote(path):  # no rename: copy, then uncommit and delete the original
        storage.copytree(path, target)
        _discard(path)
    else:
        storage.rename(path, target)
    return target


def save(out_dir: str, step: int, state, data_state: dict, meta: dict, keep: int, tokenizer: Tokenizer = None,
         chunk_bytes: int = CHUNK_BYTES):
    """Write `state` (a pytree of jax arrays) as checkpoint `step`, with the run's tokenizer (its
    file copied in, its added tokens in meta.json); keep the newest `keep` (at least this one)."""
    final, remote, proc = step_dir(out_dir, step), storage.is_remote(out_dir), jax.process_index()
    tmp = final if remote else final + ".tmp"  # an object store: written in place, committed last
    if remote and storage.exists(storage.join(final, "COMMIT")):
        return  # already committed, and nothing can replace it atomically (see the module doc)
    if proc == 0:
        storage.makedirs(out_dir)
        _clear_leftovers(out_dir)
        storage.makedirs(tmp)
        if remote:  # written in place: marked as ours before any file of it
            storage.write_bytes(storage.join(tmp, UNFINISHED), b"being written\n")
    _barrier(f"ckpt-{step}-mkdir")

    tensors = []
    for path, array in _flat(state):
        for shard in array.addressable_shards:
            if shard.replica_id == 0:  # each slice written once, by the process holding replica 0
                name = f"{path}@{_index_str(shard.index, array.shape)}"
                tensors.append((name, shard.data.shape, shard.data.dtype, lambda d=shard.data: np.asarray(d)))
    sums = tensorfile.write_safetensors(storage.join(tmp, f"shards.p{proc:05d}.safetensors"), tensors, chunk_bytes)
    data_file = f"data.p{proc:05d}.json"
    data_crc = _write_json(storage.join(tmp, data_file), data_state)
    _write_json(storage.join(tmp, f"checksums.p{proc:05d}.json"),
                _self_checked({"chunk_bytes": chunk_bytes, "shards": sums, "files": {data_file: data_crc}}))
    _barrier(f"ckpt-{step}-written")

    if proc == 0:
        meta, checksums = {"step": step, "process_count": jax.process_count(), **meta}, {}
        if tokenizer is not None:
            checksums["tokenizer.model"] = _write_bytes(storage.join(tmp, "tokenizer.model"), tokenizer.model_proto)
            added = sorted(tokenizer.added, key=tokenizer.added.get)
            meta["tokenizer"] = {"file": "tokenizer.model", "added_tokens": added}
        checksums["meta.json"] = _write_json(storage.join(tmp, "meta.json"), meta)
        _write_json(storage.join(tmp, "COMMIT"), {"step": step, "checksums": checksums})
        if remote:
            storage.remove(storage.join(tmp, UNFINISHED))
        else:
            storage.sync_dir(tmp)
            if storage.exists(final):  # a checkpoint of the same step from before a crash
                storage.rmtree(final)
            storage.rename(tmp, final)
            storage.sync_dir(out_dir)
        older = [s for s in committed(out_dir) if s < step]
        for old in older[:max(len(older) - (keep - 1), 0)]:
            _discard(step_dir(out_dir, old))
    _barrier(f"ckpt-{step}-done")


def _clear_leftovers(out_dir: str):
    """Remove the loop's own interrupted writes and deletes (a local step_X.tmp, a marked folder
    without COMMIT); set aside any other folder without COMMIT (its COMMIT lost some other way:
    perhaps a checkpoint someone needs). Each is named."""
    for name in storage.listdir(out_dir):
        path = storage.join(out_dir, name)
        if not (_TMP_DIR.match(name) or _STEP_DIR.match(name) and not storage.exists(storage.join(path, "COMMIT"))):
            continue
        if _TMP_DIR.match(name) or storage.exists(storage.join(path, UNFINISHED)):
            print(f"removing {path}: an interrupted save or delete (uncommitted)")
            storage.rmtree(path)
        else:
            print(f"{path} has no COMMIT and is no interrupted save or delete of this run; set aside as "
                  f"{set_aside(path)}")


class Reader:
    """Any global slice of any saved array, assembled from the shards that overlap it (each read
    through a memory map, so only the bytes of the slice are touched) and verified chunk by chunk."""

    def __init__(self, path: str):
        if not storage.exists(storage.join(path, "COMMIT")):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMMIT)")
        self.path, self.checksums = path, {}  # COMMIT holds the checksums: it is read unchecked
        self.checksums = self._json("COMMIT").get("checksums")
        if not isinstance(self.checksums, dict):
            raise CheckpointError(f"{storage.join(path, 'COMMIT')}: lists no checksums")
        self.meta = self._json("meta.json")
        self.chunk_bytes, self.chunk_sums, self.verified = None, {}, set()
        for proc in range(self.meta["process_count"]):
            name = f"checksums.p{proc:05d}.json"
            sums = self._json(name)
            if _self_checked({k: v for k, v in sums.items() if k != "self"}) != sums:
                raise CheckpointError(f"{storage.join(path, name)}: its own checksum does not match (corrupt)")
            self.chunk_bytes = sums["chunk_bytes"]
            self.chunk_sums.update(sums["shards"])
            self.checksums.update(sums["files"])
        try:
            self.saved = tensorfile.SafetensorsDir(path)
        except (OSError, ValueError) as e:
            if isinstance(e, OSError) and not _damage(e, path):
                raise
            raise CheckpointError(str(e)) from None
        self.pieces = {}  # array path -> [(bounds per dim, entry name)]
        for name in self.saved.entries:
            if name not in self.chunk_sums:
                raise CheckpointError(f"{path}: shard {name} has no checksum (a shard file from another checkpoint?)")
            key, _, index = name.rpartition("@")
            bounds = [tuple(map(int, r.split(":"))) for r in index.split(",")] if index else []
            self.pieces.setdefault(key, []).append((bounds, name))

    def _bytes(self, name: str) -> bytes:
        """A small file of the checkpoint, whole, checked against its checksum (COMMIT has none)."""
        file = storage.join(self.path, name)
        try:
            data = storage.read_bytes(file)
        except OSError as e:
            if not _damage(e, file):
                raise
            raise CheckpointError(f"{file}: unreadable ({e})") from None
        if name in self.checksums and zlib.crc32(data) != self.checksums[name]:
            raise CheckpointError(f"{file}: checksum mismatch (the file is corrupt)")
        return data

    def _json(self, name: str):
        try:
            return json.loads(self._bytes(name))
        except ValueError as e:  # JSON or UTF-8
            raise CheckpointError(f"{storage.join(self.path, name)}: not valid JSON ({e})") from None

    def _slice(self, name: str, local: tuple) -> np.ndarray:
        """Saved entry `name`'s sub-slice `local`, verified: the chunks it lies in are read whole
        (one byte range), checked, and the slice is cut out of them."""
        shape, dtype = self.saved.shape(name), np.dtype(self.saved.entries[name][1])
        runs, out_shape = tensorfile.byte_runs(shape, local, dtype.itemsize)
        if not runs:
            return np.zeros(out_shape, dtype)
        C, size = self.chunk_bytes, int(np.prod(shape)) * dtype.itemsize
        first, last = runs[0][0] // C, (runs[-1][1] - 1) // C
        data = memoryview(self.saved.raw(name, first * C, min((last + 1) * C, size)))
        for c in range(first, last + 1):
            if zlib.crc32(data[(c - first) * C:(c - first + 1) * C]) != self.chunk_sums[name][c]:
                raise CheckpointError(f"{self.saved.entries[name][0]}: checksum mismatch in chunk {c} of {name} "
                                      "(the file is corrupt)")
            self.verified.add((name, c))
        base = first * C
        return np.frombuffer(bytearray().join(data[a - base:b - base] for a, b in runs), dtype).reshape(out_shape)

    def model_config(self) -> model.Config:
        return model.Config(**self.meta["model"])

    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer, from the checkpoint's own copy (train.py always saves it)."""
        if "tokenizer" not in self.meta:
            raise ValueError(f"{self.path}: saved without a tokenizer (params only), so it cannot be sampled or exported")
        saved = self.meta["tokenizer"]
        return Tokenizer(storage.join(self.path, saved["file"]), added_tokens=tuple(saved["added_tokens"]),
                         model_proto=self._bytes(saved["file"]))  # read once, verified

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
            local = tuple(slice(l - c, h - c) for l, h, (c, _) in zip(lo, hi, bounds))
            block = self._slice(name, local)
            if out is None:
                out = np.empty([b - a for a, b in region], block.dtype)
            out[tuple(slice(l - a, h - a) for l, h, (a, _) in zip(lo, hi, region))] = block
            filled += block.size
        if out is None or filled != out.size:
            raise CheckpointError(f"{self.path}: {key} slice {region} is not fully covered by the saved shards")
        return out

    def data_states(self) -> list:
        """The data-loader state of each process of the run that saved this checkpoint."""
        return [self._json(f"data.p{proc:05d}.json") for proc in range(self.meta["process_count"])]


def restore(path, target):
    """Read checkpoint directory `path` (or an open Reader of one) into arrays shaped and sharded
    like `target` (a pytree of jax.ShapeDtypeStruct with shardings; a subset of the saved tree is
    fine, e.g. only params). Returns (state, reader); reader.meta and reader.data_states() hold the
    rest."""
    reader = path if isinstance(path, Reader) else Reader(path)
    path = reader.path
    leaves = []
    for key, spec in _flat(target):
        if key in reader.pieces and reader.shape(key) != tuple(spec.shape):
            raise ValueError(f"{path}: {key} was saved with shape {reader.shape(key)}, expected {spec.shape}")
        leaves.append(tensorfile.sharded_array(
            spec.shape, spec.sharding, lambda idx, k=key, s=spec: reader.read(k, idx).astype(s.dtype)))
    return jax.tree.unflatten(jax.tree.structure(target), leaves), reader


# ----------------------------------------------------------------------------- resume

def _everywhere(flag: bool) -> bool:
    """Whether `flag` holds on every process (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


def finite(tree):
    """Whether every leaf of `tree` is free of NaN and infinity: a bool per leaf (traceable; the
    train step reduces them to skip an update that would write one)."""
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)


def nonfinite_paths(tree) -> list[str]:
    """The paths of the leaves of `tree` holding a NaN or an infinity."""
    flags = jax.device_get(jax.jit(finite)(tree))
    return [jax.tree_util.keystr(p, simple=True, separator="/")
            for p, ok in jax.tree_util.tree_flatten_with_path(flags)[0] if not ok]


def check_same_model(saved: model.Config, mcfg: model.Config, where: str):
    """Refuse to continue from a model whose math differs (model.math_changes: the compute dtype,
    the remat policy and the attention kernel may differ; they change how, not what, is computed)."""
    if changed := model.math_changes(saved, mcfg):
        raise ValueError(f"{where} holds another model than the configured one ({', '.join(changed)}); "
                         "resume with the model it was trained with, or use another out_dir")


def restore_newest(out_dir: str, structs, mcfg: model.Config, cfg=None):
    """(state, reader, data states) of the newest checkpoint in out_dir that verifies, all None if
    there is no checkpoint. Every process must agree that a checkpoint verifies before it is used.
    cfg: the run's config, compared key by key with the checkpoint's (config.resume_changes) before
    its arrays are read; without it only the model is compared."""
    failures = []
    for step in reversed(committed(out_dir)):
        path = step_dir(out_dir, step)
        state = reader = data_states = error = network = None
        try:
            reader = Reader(path)
            if cfg is None:
                check_same_model(reader.model_config(), mcfg, path)
            else:
                config.resume_changes(reader.meta.get("config", {}), reader.meta["model"], cfg, mcfg, path)
            state, _ = restore(reader, structs)
            data_states = reader.data_states()
            if bad := nonfinite_paths(state):
                raise CheckpointError(f"{path}: non-finite values in {', '.join(bad[:4])}")
        except CheckpointError as e:
            error = str(e)
        except OSError as e:  # a missing file is damage; any other I/O error of an object store may pass
            if isinstance(e, FileNotFoundError) or not storage.is_remote(path):
                error = str(e)
            else:
                network = f"{type(e).__name__}: {e}"
        if not _everywhere(network is None):
            raise SystemExit(f"reading {path} failed " + (f"({network})" if network else "on another process")
                             + "; that is no sign of damage, so nothing was set aside: start the run again")
        if _everywhere(error is None):
            for failed, why in failures:
                if jax.process_index() == 0:
                    print(f"{failed} does not verify ({why}); set aside as {set_aside(failed)}")
            if failures and jax.process_index() == 0:
                print(f"falling back to {path}")
            return state, reader, data_states
        failures.append((path, error or "on another process"))
    if failures:
        listed = "\n".join(f"  {path}: {why}" for path, why in failures)
        raise SystemExit(f"no checkpoint in {out_dir} verifies:\n{listed}")
    return None, None, None
