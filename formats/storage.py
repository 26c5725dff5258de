"""Where files live: a local path goes through os and open; a URL (gs://bucket/dir, s3://..., any
scheme fsspec knows) goes through fsspec. Remote storage is optional: `fsspec` and the scheme's
package (gcsfs for gs://) are needed only when a URL is used (requirements-cloud.txt).

The rest of the code asks this module, never os, about paths it did not create itself, and relies
on three promises that hold on a disk and on an object store alike:
- `writer(path)` makes a file appear whole or not at all. On a disk: a temporary file, fsynced,
  renamed into place. On an object store an upload becomes visible only when it completes, so the
  object is written in place; a failed upload is discarded, a killed one never completes.
- There is no rename and no append on an object store: nothing here offers them. Directories that
  must appear at once (checkpoints) are committed by a marker file written last (checkpoint.py);
  metrics.jsonl is rewritten whole (tracking.py).
- Reads fetch only what they need: `read_ranges` fetches the byte ranges asked for (nearby ranges
  merged into one request), `open` streams with range requests, so a host reading its slice of a
  70B checkpoint or one column of a parquet file does not download whole objects.

Listings are not cached: several hosts write the same bucket, and a stale listing would hide a
checkpoint another host just committed.

Storage that cannot be reached (a lost connection, a timeout, a server error) is retried with
backoff for RETRY_SECONDS (env LEMUR_STORAGE_RETRY_SECONDS, default 600: a bucket's bad minutes
pass), on top of the client's own retries; then StorageError says so, and train.py stops naming
the step that is safely committed. A missing bucket is said to be one.
"""
import builtins
import contextlib
import functools
import glob as _glob
import logging
import os
import posixpath
import shutil
import time

# byte ranges closer than this are fetched in one request: a host's column block of a weight is
# one short range per row, and thousands of tiny requests cost more than the gaps between them
MERGE_GAP = 1 << 20
RETRY_SECONDS = float(os.environ.get("LEMUR_STORAGE_RETRY_SECONDS", 600))


class StorageError(OSError):
    """Storage out of reach for RETRY_SECONDS: a network or a service, not the data, failed."""


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


@functools.cache
def _filesystem(protocol: str):
    try:
        import fsspec
    except ImportError:
        raise ImportError(f"install fsspec (and gcsfs for gs://) to use {protocol}:// paths: "
                          "pip install -r requirements-cloud.txt") from None
    # gcsfs logs a traceback for each request it gives up on; the error we raise says what failed
    logging.getLogger("gcsfs").addHandler(logging.NullHandler())
    logging.getLogger("gcsfs").propagate = False
    try:
        return fsspec.filesystem(protocol, use_listings_cache=False)
    except (ImportError, ValueError) as e:  # fsspec names the package a protocol needs
        raise ImportError(f"cannot use {protocol}:// paths: {e} (pip install -r requirements-cloud.txt)") from None


def _fs(path: str):
    return _filesystem(path.split("://", 1)[0])


def _transient(e: Exception) -> bool:
    """Whether a failed remote call may pass: the connection or the service, not the path."""
    if type(e).__name__ == "HttpError":  # gcsfs: server errors and throttling pass, others do not
        return getattr(e, "code", None) in (408, 429) or (getattr(e, "code", None) or 0) >= 500
    return isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, PermissionError, FileExistsError,
                                                         IsADirectoryError, NotADirectoryError))


def _bucket(path: str) -> str:
    protocol, rest = path.split("://", 1)
    return f"{protocol}://{rest.split('/', 1)[0]}"


def _retried(op):
    """op on a URL, retried with backoff while it fails transiently, for RETRY_SECONDS at most."""
    @functools.wraps(op)
    def retried(path, *args, **kwargs):
        if not is_remote(path):
            return op(path, *args, **kwargs)
        began, wait = time.monotonic(), 1.0
        while True:
            try:
                return op(path, *args, **kwargs)
            except FileNotFoundError:
                if not _fs(path).exists(_bucket(path)):
                    raise FileNotFoundError(f"{path}: bucket {_bucket(path)} does not exist (or these credentials "
                                            "cannot see it); create it or fix the URL") from None
                raise
            except Exception as e:
                if isinstance(e, StorageError) or not _transient(e):  # a nested call's verdict stands
                    raise
                if time.monotonic() + wait > began + RETRY_SECONDS:
                    raise StorageError(f"{path}: storage unreachable, retried for {time.monotonic() - began:.0f} s "
                                       f"({type(e).__name__}: {' '.join(str(e).split())})") from e
                time.sleep(wait)
                wait = min(2 * wait, 60.0)
    return retried


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


@_retried
def exists(path: str) -> bool:
    return _fs(path).exists(path) if is_remote(path) else os.path.exists(path)


@_retried
def isfile(path: str) -> bool:
    return _fs(path).isfile(path) if is_remote(path) else os.path.isfile(path)


@_retried
def listdir(path: str) -> list[str]:
    """Names in directory `path` ([] if there is none)."""
    if not is_remote(path):
        return os.listdir(path) if os.path.isdir(path) else []
    fs, own = _fs(path), path.split("://", 1)[1].rstrip("/")
    try:
        found = [p.rstrip("/") for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    return [posixpath.basename(p) for p in found if p != own]  # not a "folder/" placeholder object


@_retried
def glob(pattern: str) -> list[str]:
    """Paths matching `pattern` (`**` spans folders), URLs for a URL pattern."""
    if not is_remote(pattern):
        return _glob.glob(pattern, recursive=True)
    protocol = pattern.split("://", 1)[0]
    return [f"{protocol}://{p}" for p in _fs(pattern).glob(pattern)]


def makedirs(path: str):
    """A directory (nothing to do on an object store, where folders are name prefixes)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


@_retried
def remove(path: str):
    _fs(path).rm_file(path) if is_remote(path) else os.remove(path)


@_retried
def rmtree(path: str):
    if not is_remote(path):
        shutil.rmtree(path)
    elif exists(path):
        _fs(path).rm(path, recursive=True)


def rename(src: str, dst: str):
    """A local rename (atomic). Object stores have none: callers commit with a marker instead."""
    if is_remote(src) or is_remote(dst):
        raise ValueError(f"cannot rename {src} -> {dst}: object stores have no atomic rename")
    os.replace(src, dst)


@_retried
def copytree(src: str, dst: str):
    """Copy a folder (on an object store, server-side, object by object)."""
    if is_remote(src) and is_remote(dst):
        _fs(src).copy(src.rstrip("/") + "/", dst.rstrip("/") + "/", recursive=True)
    elif not is_remote(src) and not is_remote(dst):
        shutil.copytree(src, dst)
    else:
        raise ValueError(f"cannot copy {src} -> {dst} across storages")


@_retried
def size(path: str) -> int:
    return _fs(path).size(path) if is_remote(path) else os.path.getsize(path)


def open(path: str, mode: str = "rb", **kwargs):
    """A file object; remote reads fetch ranges as they go (no whole-object download)."""
    if is_remote(path):
        return _fs(path).open(path, mode, **kwargs)
    return builtins.open(path, mode, **kwargs)


@_retried
def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@_retried
def read_ranges(path: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Bytes [start, stop) of `path` for each range; remote: ranges closer than MERGE_GAP are
    fetched in one request, requests run concurrently."""
    if not ranges:
        return []
    if not is_remote(path):
        with open(path, "rb") as f:
            out = []
            for start, stop in ranges:
                f.seek(start)
                out.append(f.read(stop - start))
            return out
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    merged = []  # [start, stop, [range indices]]
    for i in order:
        start, stop = ranges[i]
        if merged and start - merged[-1][1] <= MERGE_GAP:
            merged[-1][1] = max(merged[-1][1], stop)
            merged[-1][2].append(i)
        else:
            merged.append([start, stop, [i]])
    blocks = _fs(path).cat_ranges([path] * len(merged), [m[0] for m in merged], [m[1] for m in merged])
    out = [b""] * len(ranges)
    for (start, _, members), block in zip(merged, blocks):
        if isinstance(block, Exception):
            raise block
        for i in members:
            out[i] = block[ranges[i][0] - start:ranges[i][1] - start]
    return out


@contextlib.contextmanager
def writer(path: str, mode: str = "wb"):
    """A file that appears at `path` whole when the block ends without an error, or not at all."""
    if is_remote(path):
        f = _fs(path).open(path, mode)
        try:
            yield f
        except BaseException:
            try:
                f.discard()  # an upload in progress is cancelled,
            finally:
                f.closed = True  # and the buffered rest is never sent: the object does not appear
            raise
        f.close()
        return
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@_retried
def write_bytes(path: str, data: bytes):
    with writer(path) as f:
        f.write(data)


def sync_dir(path: str):
    """Make renames and new names in a local directory durable (object stores: nothing to do)."""
    if is_remote(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
