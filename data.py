"""Token rows for training: sources -> documents -> sentencepiece tokens -> packed rows -> a
deterministic mixture by tokens -> this process's rows of the global batch.

    python data.py configs/tiny.py --batches 20    # shares, documents/s, tokens/s, a row per source

Packing: each document is [bos] + tokens + [eos]; documents are concatenated and cut into rows of
seq_len + 1 tokens, no padding, a document's tail carried to the next row of its source. Formats:
.jsonl, .jsonl.gz, .jsonl.zst (needs zstandard), .parquet (needs pyarrow), .txt (one document).

Streams: the data is read as `num_streams` independent streams (default gcd(batch_size, 64), 64 =
the hosts of a v4-512). Stream j reads files j, j+S, ... of each source's sorted files or, when a
source has fewer files than streams, documents j, j+S, ... (counted per file, training and held-out
separately) of every file: then every stream reads every file, so shard big corpora into >= S files. Row r of a global batch comes from stream r // R
(R = batch_size / S rows per stream per batch), so process i of n owns streams [i*S/n, (i+1)*S/n),
reads only their files, and 1, 2 or 4 processes with the same S yield the same global batches.
S is a property of the run, like the seed: changing it changes the data order.

Mixture: rows are equally long, so token shares are row shares. Row m of every stream comes from
the source furthest below its weight so far (largest deficit first, no RNG): shares are right to
within a row whatever the document lengths. A stream that runs out of a source starts a new epoch
over its files in an order seeded by (seed, source, stream, epoch).

Position: batch k is a pure function of (seed, k, sources, S). `state()` is a small JSON dict: the
schedule counts and, per stream and source, (epoch, file, line, token offset) of the next unused
token. Restoring re-reads from that line (costs a read up to it) instead of storing tokens. Each
process's state holds its own streams; `merge_states` joins all processes' states into one that
any process count can restore.

Held out: a document is held out when a hash of (file name, line) falls below the source's
eval_fraction; decided before parsing (cheap), stable if the corpus moves folder, never trained
on. `eval_batches(n)` packs only held-out documents the same way, identical every call.

Bad records (malformed JSON, missing or non-string field, empty text, invalid UTF-8, a truncated
or corrupt file) are skipped, counted by reason and the first few logged as file:line, or raised
with bad_records="raise". Empty globs, unreadable files, weights <= 0 and a missing tokenizer fail
at construction.

Speed: a background thread reads and packs batches ahead of training (a prefetch queue); the
documents it reads go in chunks to a pool of tokenizer threads (sentencepiece runs outside the GIL),
so reading, tokenizing and the training step overlap. bench/data.py measures it.
"""
import argparse
import ast
import codecs
import collections
import concurrent.futures
import dataclasses
import gzip
import glob
import hashlib
import importlib
import io
import itertools
import json
import logging
import math
import os
import queue
import re
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
import zlib

import numpy as np
import sentencepiece as spm

log = logging.getLogger("data")
FORMATS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".txt")
MAX_LOGGED_SKIPS = 10
# a short (stream, source) reads documents for this many more batches at its current rate: fewer,
# larger refills keep the tokenizer threads busy; the buffers stay a few batches small
READ_AHEAD_BATCHES = 4
# characters per tokenizer job: jobs of many documents keep the tokenizer threads evenly loaded
CHUNK_CHARS = 1 << 16


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    paths: tuple[str, ...]  # globs
    weight: float  # share of training tokens, relative to the other sources
    field: str = "text"  # the text field: The Stack and RefinedWeb use "content", RedPajama "text"
    eval_fraction: float = 0.01  # documents held out for evaluation


class Tokenizer:
    """A sentencepiece model plus added special tokens with ids after the base vocabulary."""

    def __init__(self, model_path: str, added_tokens: tuple[str, ...] = ()):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model {model_path!r} does not exist")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        base = self.sp.get_piece_size()
        self.added = {tok: base + i for i, tok in enumerate(added_tokens)}
        self.added_text = {i: tok for tok, i in self.added.items()}
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = base + len(self.added)
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model_path}: packing needs bos and eos tokens")
        # longest first, so that a token containing another one wins
        alternatives = "|".join(map(re.escape, sorted(self.added, key=len, reverse=True)))
        self._split = re.compile(f"({alternatives})") if self.added else None

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Token ids (no bos/eos); added tokens are cut out first, the rest goes to sentencepiece."""
        if not self._split:
            return self.sp.encode(texts, num_threads=num_threads)
        pieces = [self._split.split(t) for t in texts]  # text, token, text, token, ..., text
        plain = iter(self.sp.encode([p for ps in pieces for p in ps[::2]], num_threads=num_threads))
        return [[i for j, p in enumerate(ps) for i in ([self.added[p]] if j % 2 else next(plain))]
                for ps in pieces]

    def decode(self, ids) -> str:
        runs = itertools.groupby(map(int, ids), key=lambda i: i in self.added_text)
        return "".join("".join(map(self.added_text.get, run)) if added else self.sp.decode(list(run))
                       for added, run in runs)


class _Skip(Exception):
    """A bad record; the message is the reason."""


class _Skips:
    """Counts bad records by reason, logs the first few, or raises under the "raise" policy."""

    def __init__(self, policy: str):
        if policy not in ("skip", "raise"):
            raise ValueError(f"bad_records must be 'skip' or 'raise', not {policy!r}")
        self.policy, self.counts, self.lock = policy, collections.Counter(), threading.Lock()

    def __call__(self, where: str, reason: str):
        if self.policy == "raise":
            raise ValueError(f"{where}: {reason}")
        with self.lock:  # the prefetch thread and eval_batches both read
            self.counts[reason] += 1
            if sum(self.counts.values()) <= MAX_LOGGED_SKIPS:
                log.warning("%s: %s (skipped)", where, reason)


def _optional(module: str, path: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"install {module.split('.')[0]} to read {path}") from None


def _files(src: Source) -> list[str]:
    """The sorted files of a source, each checked to be readable and of a known format."""
    if src.weight <= 0:
        raise ValueError(f"source {src.name!r}: weight must be > 0, got {src.weight}")
    if not 0 <= src.eval_fraction < 1:
        raise ValueError(f"source {src.name!r}: eval_fraction must be in [0, 1), got {src.eval_fraction}")
    if isinstance(src.paths, str):
        raise TypeError(f"source {src.name!r}: paths must be a tuple of globs, not a string")
    files = set()
    for pattern in src.paths:
        matched = glob.glob(pattern, recursive=True)
        if not matched:
            raise FileNotFoundError(f"source {src.name!r}: {pattern!r} matches no files")
        files.update(matched)
    for path in files:
        if not path.endswith(FORMATS):
            raise ValueError(f"{path}: unknown format (expected one of {', '.join(FORMATS)})")
        if path.endswith((".zst", ".parquet")):
            _optional("zstandard" if path.endswith(".zst") else "pyarrow.parquet", path)
        try:
            open(path, "rb").close()
        except OSError as e:
            raise OSError(f"source {src.name!r}: cannot read {path}: {e}") from None
    return sorted(files)


def _records(path: str, field: str):
    """(line, raw record) of a file, streamed; a read error ends the file with a _Skip."""
    line = -1
    try:
        if path.endswith(".txt"):
            with open(path, "rb") as f:
                yield 0, f.read()
        elif path.endswith(".parquet"):
            row = 0
            for batch in _optional("pyarrow.parquet", path).ParquetFile(path).iter_batches(columns=[field]):
                for line, value in enumerate(batch.column(0).to_pylist(), row):
                    yield line, value
                row += len(batch)
        else:
            with open(path, "rb") as raw:
                if path.endswith(".gz"):
                    f = gzip.open(raw)
                elif path.endswith(".zst"):
                    f = io.BufferedReader(_optional("zstandard", path).ZstdDecompressor().stream_reader(raw))
                else:
                    f = raw
                for line, record in enumerate(f):
                    yield line, record
    except Exception as e:  # truncated gzip (EOFError), corrupt zstd/parquet, I/O errors
        yield line + 1, _Skip(f"unreadable from here on ({type(e).__name__}: {e})")


def _text(raw, field: str, is_json: bool) -> str:
    """The document text of a raw record, or _Skip naming what is wrong with it."""
    if isinstance(raw, _Skip):
        raise raw
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Skip("invalid UTF-8") from None
        if is_json:
            try:
                record = json.loads(raw)
            except ValueError:
                raise _Skip("malformed JSON") from None
            if not isinstance(record, dict) or field not in record:
                raise _Skip(f"no field {field!r}")
            raw = record[field]
    if not isinstance(raw, str):
        raise _Skip(f"field {field!r} is not a string")
    if not raw.strip():
        raise _Skip("empty document")
    return raw


def _held_out(name: str, line: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{name}:{line}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def _documents(src, files, stream, num_streams, seed, held_out, pos, skip):
    """Yield ((epoch, file, line), text) of one stream's share of a source, forever, from pos."""
    shared = len(files) < num_streams  # then every stream reads every file and takes every S-th document
    mine = files if shared else files[stream::num_streams]
    epoch, first, start = pos
    while True:
        whole_epoch = first == start == 0
        order = np.random.default_rng([seed, zlib.crc32(src.name.encode()), stream, epoch]).permutation(len(mine))
        found = False
        for f in range(first, len(mine)):
            path, rank = mine[order[f]], -1  # rank: of the documents of our kind in this file
            for line, raw in _records(path, src.field):
                if _held_out(os.path.basename(path), line, src.eval_fraction) != held_out:
                    continue
                rank += 1
                if (shared and rank % num_streams != stream) or line < start:
                    continue
                try:
                    text = _text(raw, src.field, not path.endswith(".txt"))
                except _Skip as e:
                    skip(f"{path}:{line + 1}", str(e))
                    continue
                found = True
                yield (epoch, f, line), text
            start = 0
        if not found and whole_epoch:
            kind = "held-out" if held_out else "training"
            raise ValueError(f"source {src.name!r}: stream {stream} of {num_streams} found no {kind} documents"
                             f" in {len(mine)} file(s); use fewer streams or more data")
        epoch, first = epoch + 1, 0


class _Packer:
    """One stream's documents of one source as a token stream cut into rows; knows its position."""

    def __init__(self, docs, pos):  # pos: (epoch, file, line, offset of the next token in that doc)
        self.docs, self.buf = docs, collections.deque()
        self.offset, self.avail, self.end = pos[3], -pos[3], list(pos)

    def state(self) -> list[int]:
        return [*self.buf[0][0], self.offset] if self.buf else self.end

    def add(self, pos, tokens):
        self.buf.append((pos, tokens))
        self.avail += len(tokens)

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n:
            pos, tokens = self.buf[0]
            part = tokens[self.offset:self.offset + n]
            parts.append(part)
            n, self.offset = n - len(part), self.offset + len(part)
            if self.offset == len(tokens):
                self.buf.popleft()
                self.offset, self.end = 0, [*pos, len(tokens)]
        self.avail -= sum(map(len, parts))
        return np.concatenate(parts)


def _next_source(weights, counts) -> int:
    """Largest deficit first: the source whose share of the rows so far is furthest below its weight."""
    total = sum(counts) + 1
    return max(range(len(weights)), key=lambda i: weights[i] * total - counts[i])


def merge_states(states: list[dict]) -> dict:
    """One state from the states of all processes (each holds its own streams)."""
    if len({s["batch"] for s in states}) != 1:
        raise ValueError("states come from different batches")
    return {**states[0], "streams": {j: v for s in states for j, v in s["streams"].items()}}


def _put(out: queue.Queue, item, stop: threading.Event):
    while not stop.is_set():
        try:
            return out.put(item, timeout=0.1)
        except queue.Full:
            pass


class Loader:
    """Yields this process's rows of each global batch of batch_size rows: {"tokens": int32
    [local_rows, seq_len + 1]}, plus "segment_ids" (same shape) with document_mask. Also state(),
    restore(), shares(), skipped(), eval_batches(), row_sources, close()."""

    def __init__(self, sources, tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int = 0, *,
                 document_mask=False, bad_records="skip", process_index=0, process_count=1,
                 num_streams=None, prefetch=4, state=None):
        if not sources or len({s.name for s in sources}) != len(sources):
            raise ValueError("need at least one source, with distinct names")
        num_streams = num_streams or math.gcd(batch_size, 64)
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must divide by process_count {process_count}")
        if batch_size % num_streams or num_streams % process_count:
            raise ValueError(f"num_streams {num_streams} must divide batch_size {batch_size}"
                             f" and be divisible by process_count {process_count}")
        self.sources, self.tokenizer, self.seq_len, self.seed = tuple(sources), tokenizer, seq_len, seed
        self.document_mask, self.prefetch, self.num_streams = document_mask, prefetch, num_streams
        self.files = [_files(s) for s in self.sources]
        total = sum(s.weight for s in self.sources)
        self.weights = [s.weight / total for s in self.sources]
        self.rows_per_stream = batch_size // num_streams
        per_process = num_streams // process_count
        self.streams = range(process_index * per_process, (process_index + 1) * per_process)
        self.process_index, self.process_count = process_index, process_count
        self._skips, self._eval, self._thread = _Skips(bad_records), {}, None
        self._pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="tokenize")
        self.row_sources = []  # the source name of each row of the last batch
        self.restore(state or {"batch": 0, "num_streams": num_streams,
                               "rows": {s.name: 0 for s in self.sources},
                               "streams": {str(j): {s.name: [0, 0, 0, 0] for s in self.sources} for j in self.streams}})

    def _packers(self, state):
        return {(j, i): _Packer(_documents(src, self.files[i], j, self.num_streams, self.seed, False,
                                           state[str(j)][src.name][:3], self._skips), state[str(j)][src.name])
                for j in self.streams for i, src in enumerate(self.sources)}

    def _fill(self, needs):
        """Tokenize documents until each packer holds its needed tokens. Chunks of documents go to
        the tokenizer threads as they are read, so reading overlaps tokenizing."""
        while short := [(p, n - p.avail) for p, n in needs.items() if p.avail < n]:
            jobs = []
            for packer, missing in short:
                budget, chunk, size = 4 * (missing + READ_AHEAD_BATCHES * needs[packer]), [], 0  # ~4 chars/token
                while budget > 0:
                    chunk.append(next(packer.docs))
                    size, budget = size + len(chunk[-1][1]), budget - len(chunk[-1][1])
                    if size >= CHUNK_CHARS or budget <= 0:
                        texts = [text for _, text in chunk]
                        jobs.append((packer, [pos for pos, _ in chunk],
                                     self._pool.submit(self.tokenizer.encode_batch, texts, num_threads=1)))
                        self.docs_read += len(chunk)
                        chunk, size = [], 0
            for packer, positions, job in jobs:
                for pos, tokens in zip(positions, job.result()):
                    row = np.empty(len(tokens) + 2, np.int32)
                    row[0], row[1:-1], row[-1] = self.tokenizer.bos_id, tokens, self.tokenizer.eos_id
                    packer.add(pos, row)

    def _batch(self, rows: np.ndarray) -> dict:
        batch = {"tokens": rows}
        if self.document_mask:  # a new id at every bos, so the first (maybe partial) document is 0
            seg = np.cumsum(rows == self.tokenizer.bos_id, axis=1, dtype=np.int32)
            batch["segment_ids"] = seg - seg[:, :1]
        return batch

    def _produce(self, state, out: queue.Queue, stop: threading.Event):
        try:
            packers = self._packers(state["streams"])
            counts = [state["rows"][s.name] for s in self.sources]
            batch = state["batch"]
            while not stop.is_set():
                picks = []
                for _ in range(self.rows_per_stream):
                    picks.append(_next_source(self.weights, counts))
                    counts[picks[-1]] += 1
                keys = [(j, i) for j in self.streams for i in picks]
                self._fill({packers[k]: keys.count(k) * (self.seq_len + 1) for k in set(keys)})
                rows = np.stack([packers[k].take(self.seq_len + 1) for k in keys])
                batch += 1
                state = {"batch": batch, "num_streams": self.num_streams,
                         "rows": {s.name: c for s, c in zip(self.sources, counts)},
                         "streams": {str(j): {s.name: packers[j, i].state() for i, s in enumerate(self.sources)}
                                     for j in self.streams}}
                _put(out, (self._batch(rows), state, [self.sources[i].name for _, i in keys]), stop)
        except BaseException as e:  # surfaces in __next__, in the training thread
            _put(out, e, stop)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put(item)  # stays failed
            raise item
        batch, self._state, self.row_sources = item
        return batch

    def state(self) -> dict:
        """The position after the last batch returned: JSON-able, this process's streams only."""
        return json.loads(json.dumps(self._state))

    def restore(self, state: dict):
        """Continue with exactly the batches that followed `state` (a state() or merge_states())."""
        if state["num_streams"] != self.num_streams or set(state["rows"]) != {s.name for s in self.sources}:
            raise ValueError(f"state is for num_streams {state['num_streams']} and sources {sorted(state['rows'])};"
                             f" this loader has {self.num_streams} and {[s.name for s in self.sources]}")
        missing = [j for j in self.streams if str(j) not in state["streams"]]
        if missing:
            raise ValueError(f"state lacks streams {missing}; merge_states() the states of all processes")
        self._halt()
        self._state = {**state, "streams": {str(j): state["streams"][str(j)] for j in self.streams}}
        self.docs_read = 0
        self._queue, self._stop = queue.Queue(self.prefetch), threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(state, self._queue, self._stop), daemon=True)
        self._thread.start()

    def shares(self) -> dict:
        """Each source's share of the tokens delivered so far (rows are equally long)."""
        total = sum(self._state["rows"].values()) or 1
        return {name: rows / total for name, rows in self._state["rows"].items()}

    def skipped(self) -> dict:
        return dict(self._skips.counts)

    def eval_batches(self, n_batches: int) -> dict:
        """{source: n_batches batch dicts} of held-out documents, this process's rows, the same every
        call. Held-out documents are few, so they are read as one stream (a per-stream split could
        leave a stream with none): every process packs the same global batches and keeps its rows."""
        if n_batches not in self._eval:
            batch_size = self.rows_per_stream * self.num_streams
            local = slice(self.process_index * batch_size // self.process_count,
                          (self.process_index + 1) * batch_size // self.process_count)
            self._eval[n_batches] = {}
            for i, src in enumerate(self.sources):
                packer = _Packer(_documents(src, self.files[i], 0, 1, self.seed, True, (0, 0, 0), self._skips), [0] * 4)
                self._eval[n_batches][src.name] = []
                for _ in range(n_batches):
                    self._fill({packer: batch_size * (self.seq_len + 1)})
                    rows = np.stack([packer.take(self.seq_len + 1) for _ in range(batch_size)])
                    self._eval[n_batches][src.name].append(self._batch(rows[local]))
        return self._eval[n_batches]

    def _halt(self):
        if self._thread:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def close(self):
        """Stop the prefetch and tokenizer threads; the loader is done."""
        self._halt()
        self._pool.shutdown()


DEMO_VERSION = 1  # part of the cache folder name: bump it when the demo corpus changes

# Directories of the standard library left out of the demo code: tests, vendored or generated code,
# GUI demos, and deprecated packages; what remains is ~8 MB of ordinary Python.
_DEMO_SKIP = {"site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "pydoc_data",
              "encodings", "distutils", "__pycache__"}


def _docstrings(node, name: str):
    """The docstrings of a module and of the classes and functions defined at its top levels."""
    if ast.get_docstring(node):
        yield f"{name}\n{ast.get_docstring(node)}"
    for child in node.body:
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(child, child.name)


def _stdlib_documents():
    """Code: the standard library's .py files. Prose: its docstrings (one document per module),
    the pydoc topics (the language reference Python ships), LICENSE.txt and the Zen of Python."""
    from pydoc_data.topics import topics
    root = sysconfig.get_paths()["stdlib"]
    code, prose = [], [{"title": k, "text": topics[k]} for k in sorted(topics)]
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _DEMO_SKIP and not d.startswith(("test", "config-")))
        for name in sorted(n for n in names if n.endswith(".py") and not n.startswith("test")):
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            with open(os.path.join(dirpath, name), "rb") as f:
                source = f.read().decode("utf-8", "replace")
            if not source.strip():  # empty __init__.py files
                continue
            code.append({"path": rel, "content": source})
            tree = ast.parse(source)
            docs = list(_docstrings(tree, rel))
            if docs:
                prose.append({"title": rel, "text": "\n\n".join(docs)})
            if rel == "this.py":  # the Zen of Python, stored rot13-encoded
                zen = next(n.value.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "s")
                prose.append({"title": "zen", "text": codecs.decode(zen, "rot13")})
    if os.path.isfile(os.path.join(root, "LICENSE.txt")):
        with open(os.path.join(root, "LICENSE.txt"), encoding="utf-8") as f:
            prose.append({"title": "LICENSE.txt", "text": f.read()})
    return code, prose


def demo_corpus(cache_dir: str, vocab_size: int = 1024) -> tuple[tuple[Source, ...], str]:
    """The built-in corpus (code:text = 10:1, as Lemur) and a BPE tokenizer trained on it, built once.

    Written to {cache_dir}/demo{DEMO_VERSION}-py{X}{Y}-v{vocab_size}/ (code.jsonl, text.jsonl, tokenizer.model):
    built in a temporary folder and renamed into place with a COMPLETE marker, so an interrupted build
    is redone and concurrent builders cannot see half a corpus. Deterministic for a Python version.
    """
    final = os.path.join(cache_dir, f"demo{DEMO_VERSION}-py{sys.version_info[0]}{sys.version_info[1]}-v{vocab_size}")
    if not os.path.isfile(os.path.join(final, "COMPLETE")):
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".building-")
        code, prose = _stdlib_documents()
        for name, docs in (("code", code), ("text", prose)):  # shuffled: one file is read in order
            with open(os.path.join(tmp, f"{name}.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(docs[i]) + "\n" for i in np.random.default_rng(0).permutation(len(docs)))
        lines = [line for d in code for line in d["content"].splitlines() if line.strip()]
        lines += [line for d in prose for line in d["text"].splitlines() if line.strip()]
        model = io.BytesIO()
        # identity normalisation and kept whitespace so code round-trips; no paths go into the model
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True, input_sentence_size=0,
            shuffle_input_sentence=False, num_threads=1, pad_id=-1, minloglevel=2)
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(model.getvalue())
        open(os.path.join(tmp, "COMPLETE"), "w").close()
        shutil.rmtree(final, ignore_errors=True)  # leftovers without the marker
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; its corpus is identical
            shutil.rmtree(tmp)
    sources = (Source("code", (os.path.join(final, "code.jsonl"),), 10.0, field="content", eval_fraction=0.05),
               Source("text", (os.path.join(final, "text.jsonl"),), 1.0, eval_fraction=0.05))
    return sources, os.path.join(final, "tokenizer.model")


def demo_dir(out_dir: str) -> str:
    """Where a run in out_dir keeps the demo corpus: beside it, shared by runs (out/demo_data)."""
    return os.path.join(os.path.dirname(os.path.abspath(out_dir)), "demo_data")


def _sources_and_tokenizer(cfg):
    """cfg.sources / cfg.tokenizer, or the demo corpus cached next to the run folder."""
    if cfg.sources and cfg.tokenizer:
        return cfg.sources, cfg.tokenizer
    demo_sources, demo_tokenizer = demo_corpus(demo_dir(cfg.out_dir))
    return cfg.sources or demo_sources, cfg.tokenizer or demo_tokenizer


def tokenizer_for(cfg) -> Tokenizer:
    return Tokenizer(_sources_and_tokenizer(cfg)[1])


def make_loader(cfg, process_index: int = 0, process_count: int = 1, num_streams=None) -> Loader:
    """The training loader of a config.TrainConfig; batch_size is global rows per step."""
    sources, tokenizer = _sources_and_tokenizer(cfg)
    return Loader(sources, Tokenizer(tokenizer), cfg.seq_len, cfg.batch_size, cfg.seed,
                  document_mask=cfg.document_mask, bad_records=cfg.bad_records, process_index=process_index,
                  process_count=process_count, num_streams=num_streams)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Inspect the training data of a config.")
    parser.add_argument("config")
    parser.add_argument("--batches", type=int, default=10)
    args, overrides = parser.parse_known_args(argv)
    import config  # here, not at the top: config imports model (jax), which the loader does not need
    logging.basicConfig(format="%(message)s")
    cfg = config.load(args.config, overrides)
    loader = make_loader(cfg)
    start, tokens, examples = time.perf_counter(), 0, {}
    for batch in (next(loader) for _ in range(args.batches)):
        tokens += batch["tokens"].size
        for name, row in zip(loader.row_sources, batch["tokens"]):
            examples.setdefault(name, row)
    elapsed = time.perf_counter() - start
    loader.close()
    shares = loader.shares()
    for src in loader.sources:
        print(f"{src.name:>12}: share {shares[src.name]:.4f} (weight {loader.weights[loader.sources.index(src)]:.4f})")
    print(f"{loader.docs_read / elapsed:.0f} documents/s, {tokens / elapsed:.0f} tokens/s, skipped {loader.skipped()}")
    for name, row in examples.items():
        print(f"--- {name}: {loader.tokenizer.decode(row[:200])[:400]!r}")
    print(json.dumps({"shares": shares, "tokens_per_sec": tokens / elapsed,
                      "docs_per_sec": loader.docs_read / elapsed, "skipped": loader.skipped()}))


if __name__ == "__main__":
    main()
