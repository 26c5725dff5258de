"""Records from files: the one reader of pretraining documents (data.py) and chat conversations
(chat.py), with one held-out rule and one bad-record policy for both.

Paths and globs may be URLs (gs://bucket/the-stack/**/*.parquet; storage.py): files stream
through range requests, and a parquet file fetches only the column chunks a source reads.

Formats, by extension: `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (needs zstandard), `.json` (an array of
records, read whole), `.parquet` (needs pyarrow; only the column a source reads, or whole rows for
chat data), `.txt` (one document per file, pretraining only). Files are streamed record by record;
a record is numbered by its line, array element or row, from 0.

Held out: a record is held out for evaluation when a hash of (file name, record number) falls
below its source's eval_fraction. It is decided before parsing (cheap), is stable when a corpus
moves to another folder, and the same record is never trained on.

Bad records (malformed JSON, a missing or non-string field, an empty document, invalid UTF-8, a
truncated or corrupt file, a chat record of no known layout) are skipped, counted by reason and
the first few logged as `file:record: reason`, or raised under bad_records="raise". Empty globs,
unreadable files and unknown formats fail when the sources are opened.
"""
import collections
import gzip
import hashlib
import importlib
import io
import json
import logging
import os
import threading

from formats import storage

log = logging.getLogger("data")
MAX_LOGGED_SKIPS = 10
PRETRAINING_FORMATS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".parquet", ".txt")
CHAT_FORMATS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".parquet")


class BadRecord(ValueError):
    """A record that cannot be used; the message is the reason (with its place once raised)."""


class Skips:
    """Counts bad records by reason and logs the first few, or raises under the "raise" policy.
    Thread-safe: a loader's prefetch thread and its evaluation both read."""

    def __init__(self, policy: str):
        assert policy in ("skip", "raise"), "config.validate refuses this"
        self.policy, self.counts, self.lock = policy, collections.Counter(), threading.Lock()

    def __call__(self, where: str, reason: str):
        if self.policy == "raise":
            raise BadRecord(f"{where}: {reason}")
        with self.lock:
            self.counts[reason] += 1
            if sum(self.counts.values()) <= MAX_LOGGED_SKIPS:
                log.warning("%s: %s (skipped)", where, reason)


def optional(module: str, purpose: str):
    """Import an optional dependency, or fail saying what to install and why."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"install {module.split('.')[0]} to {purpose}") from None


def files(src, formats=PRETRAINING_FORMATS) -> list[str]:
    """The sorted files of a source, each checked to be readable and of a known format."""
    found = set()
    for pattern in src.paths:
        matched = storage.glob(pattern)
        if not matched:
            raise FileNotFoundError(f"source {src.name!r}: {pattern!r} matches no files" + _unreadable_dir(pattern))
        found.update(matched)
    for path in found:
        if not path.endswith(formats):
            raise ValueError(f"{path}: unknown format (expected one of {', '.join(formats)})")
        if path.endswith((".zst", ".parquet")):
            optional("zstandard" if path.endswith(".zst") else "pyarrow.parquet", f"read {path}")
        if storage.is_remote(path):
            continue  # listed by the glob; a request per file of thousands of shards on every host is not worth it
        try:
            open(path, "rb").close()
        except OSError as e:
            raise OSError(f"source {src.name!r}: cannot read {path}: {e}") from None
    return sorted(found)


def _unreadable_dir(pattern: str) -> str:
    """Why a glob may match nothing although files are there: a folder on its way we cannot list."""
    if storage.is_remote(pattern):
        return ""
    folder = os.path.dirname(pattern.split("*")[0].split("?")[0].split("[")[0]) or "."
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    as_user = os.access in os.supports_effective_ids  # the permissions of who we run as
    if os.path.isdir(folder) and not os.access(folder, os.R_OK | os.X_OK, effective_ids=as_user):
        return f" (the folder {folder} cannot be read: permission denied)"
    return ""


def read(path: str, field: str | None = None):
    """(record number, raw record) of a file, streamed: a JSON line or a .txt file as bytes, a
    .json array element or a parquet row as a Python value (a row as {column: value}; with `field`
    only that column is read). A read error ends the file with a BadRecord in place of a record."""
    index = -1
    try:
        if path.endswith(".txt"):
            yield 0, storage.read_bytes(path)
        elif path.endswith(".json"):
            array = json.loads(storage.read_bytes(path))
            if not isinstance(array, list):
                raise ValueError("a .json file must hold an array of records")
            yield from enumerate(array)
        elif path.endswith(".parquet"):
            pq = optional("pyarrow.parquet", f"read {path}")
            with storage.open(path, "rb") as f:  # only the footer and the column chunks read are fetched
                for batch in pq.ParquetFile(f).iter_batches(columns=[field] if field else None):
                    for index, row in enumerate(batch.to_pylist(), index + 1):
                        yield index, row
        else:
            with storage.open(path, "rb") as raw:
                if path.endswith(".gz"):
                    f = gzip.open(raw)
                elif path.endswith(".zst"):
                    f = io.BufferedReader(optional("zstandard", f"read {path}").ZstdDecompressor().stream_reader(raw))
                else:
                    f = raw
                for index, line in enumerate(f):
                    yield index, line
    except Exception as e:  # truncated gzip (EOFError), corrupt zstd/parquet/JSON, I/O errors
        yield index + 1, BadRecord(f"unreadable from here on ({type(e).__name__}: {e})")


def parse(raw):
    """The value of a raw record: a JSON line decoded and parsed; a Python value as it is."""
    if isinstance(raw, BadRecord):
        raise raw
    if isinstance(raw, bytes):
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRecord("invalid UTF-8") from None
        except ValueError:
            raise BadRecord("malformed JSON") from None
    return raw


def document(raw, field: str, path: str) -> str:
    """The text of a pretraining record (the whole file for .txt, else record[field])."""
    if path.endswith(".txt") and isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRecord("invalid UTF-8") from None
    else:
        record = parse(raw)
        if not isinstance(record, dict) or field not in record:
            raise BadRecord(f"no field {field!r}")
        text = record[field]
    if not isinstance(text, str):
        raise BadRecord(f"field {field!r} is not a string")
    if not text.strip():
        raise BadRecord("empty document")
    return text


def held_out(path: str, index: int, fraction: float) -> bool:
    """Whether record `index` of file `path` is held out: a hash of the file's name (not its
    folder) and the record number, below `fraction`."""
    digest = hashlib.blake2b(f"{os.path.basename(path)}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64
