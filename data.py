"""Token rows for training: sources -> documents -> sentencepiece tokens -> packed rows -> a
deterministic mixture by tokens -> this process's rows of the global batch.

    python data.py configs/tiny.py --batches 20    # shares, documents/s, tokens/s, a row per source

Packing: each document is [bos] + tokens + [eos]; documents are concatenated and cut into rows of
seq_len + 1 tokens, no padding, a document's tail carried to the next row of its source. Files,
formats, the held-out rule and bad records: readers.py.

Streams: the data is read as `num_streams` independent streams (default gcd(batch_size, 64), 64 =
the hosts of a v4-512). Stream j reads files j, j+S, ... of each source's sorted files or, when a
source has fewer files than streams, documents j, j+S, ... (counted per file, training and held-out
separately) of every file: then every stream reads every file, so shard big corpora into >= S
files. Row r of a global batch comes from stream r // R (R = batch_size / S rows per stream per
batch), so process i of n owns streams [i*S/n, (i+1)*S/n), reads only their files, and 1, 2 or 4
processes with the same S yield the same global batches. S is a property of the run, like the
seed: changing it changes the data order.

Mixture: rows are equally long, so token shares are row shares. Row m of every stream comes from
the source furthest below its weight so far (largest deficit first, no RNG): shares are right to
within a row whatever the document lengths. A source of weight 0 is never picked (its deficit is
never the largest), so it is evaluated but never trained on. A stream that runs out of a source starts a new epoch
over its files in an order seeded by (seed, source, stream, epoch).

Position: batch k is a pure function of (seed, k, sources, S). `state()` is a small JSON dict: the
schedule counts and, per stream and source, (epoch, file, record, token offset) of the next unused
token. Restoring re-reads from that record (costs a read up to it) instead of storing tokens. Each
process's state holds its own streams; `merge_states` joins all processes' states into one that
any process count can restore.

Speed: a background thread reads and packs batches ahead of training (a prefetch queue); the
documents it reads go in chunks to a pool of tokenizer threads (sentencepiece runs outside the GIL),
so reading, tokenizing and the training step overlap. bench/data.py measures it.
"""
import argparse
import collections
import concurrent.futures
import json
import logging
import math
import os
import queue
import threading
import time
import zlib

import numpy as np

from formats import demo, readers
from formats.tokenizer import Tokenizer

# a short (stream, source) reads documents for this many more batches at its current rate: fewer,
# larger refills keep the tokenizer threads busy; the buffers stay a few batches small
READ_AHEAD_BATCHES = 4
# characters per tokenizer job: jobs of many documents keep the tokenizer threads evenly loaded
CHUNK_CHARS = 1 << 16



class NoDocuments(ValueError):
    """A source (or one stream's share of it) yields no documents at all."""


def _documents(src, files, stream, num_streams, seed, held_out, pos, skip):
    """Yield ((epoch, file, record), text) of one stream's share of a source, forever, from pos."""
    shared = len(files) < num_streams  # then every stream reads every file and takes every S-th document
    mine = files if shared else files[stream::num_streams]
    epoch, first, start = pos
    while True:
        whole_epoch = first == start == 0
        order = np.random.default_rng([seed, zlib.crc32(src.name.encode()), stream, epoch]).permutation(len(mine))
        found, seen, assigned = False, 0, 0  # documents yielded; records of our kind; those of this stream
        for f in range(first, len(mine)):
            path, rank = mine[order[f]], -1  # rank: of the documents of our kind in this file
            for index, raw in readers.read(path, src.field):
                if readers.held_out(path, index, src.eval_fraction) != held_out:
                    continue
                rank += 1
                if (shared and rank % num_streams != stream) or index < start:
                    continue
                assigned += 1
                try:
                    text = readers.document(raw, src.field, path)
                except readers.BadRecord as e:
                    skip(f"{path}:{index + 1}", str(e))
                    continue
                found = True
                yield (epoch, f, index), text
            seen, start = seen + rank + 1, 0
        if not found and whole_epoch:
            kind = "held-out" if held_out else "training"
            where = f"source {src.name!r}" + (f", stream {stream} of {num_streams}," if num_streams > 1 else "")
            if not seen:
                raise NoDocuments(f"{where} found no {kind} records in {', '.join(mine[:3])}"
                                  + (" ..." if len(mine) > 3 else "") + f" (eval_fraction={src.eval_fraction})")
            if assigned:
                raise NoDocuments(f"{where}: all {assigned} of its {kind} records were bad (see the skipped records)")
            raise NoDocuments(f"{where}: its files hold {seen} {kind} records, fewer than the {num_streams} "
                              "streams that share them; use fewer streams (a smaller batch) or more data")
        epoch, first = epoch + 1, 0


class _Packer:
    """One stream's documents of one source as a token stream cut into rows; knows its position."""

    def __init__(self, docs, pos):  # pos: (epoch, file, record, offset of the next token in it)
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
        if not any(s.weight for s in sources):
            raise ValueError(f"sources {[s.name for s in sources]}: all have weight 0, nothing to train on")
        num_streams = num_streams or math.gcd(batch_size, 64)
        assert batch_size % process_count == 0, "config.validate refuses this"
        if batch_size % num_streams or num_streams % process_count:
            raise ValueError(f"num_streams {num_streams} must divide batch_size {batch_size}"
                             f" and be divisible by process_count {process_count}")
        self.sources, self.tokenizer, self.seq_len, self.seed = tuple(sources), tokenizer, seq_len, seed
        self.document_mask, self.prefetch, self.num_streams = document_mask, prefetch, num_streams
        self.files = [readers.files(s) for s in self.sources]
        total = sum(s.weight for s in self.sources)
        self.weights = [s.weight / total for s in self.sources]
        self.rows_per_stream = batch_size // num_streams
        per_process = num_streams // process_count
        self.streams = range(process_index * per_process, (process_index + 1) * per_process)
        self.process_index, self.process_count = process_index, process_count
        self._skips, self._eval, self._thread = readers.Skips(bad_records), {}, None
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
        self.ready()
        batch, self._state, self.row_sources = self._next
        self._next = None
        return batch

    def ready(self):
        """Wait for the next batch, raising what its making raised (a source that yields nothing):
        train.py calls it before it writes anything."""
        if self._next is None:
            self._next = self._queue.get()
        if isinstance(self._next, BaseException):
            raise self._next  # stays failed

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
        self.docs_read, self._next = 0, None
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
        leave a stream with none): every process packs the same global batches and keeps its rows.
        A source with nothing held out (eval_fraction=0, or no held-out record found) is left out."""
        if n_batches not in self._eval:
            batch_size = self.rows_per_stream * self.num_streams
            local = slice(self.process_index * batch_size // self.process_count,
                          (self.process_index + 1) * batch_size // self.process_count)
            self._eval[n_batches] = {}
            for i, src in enumerate(self.sources):
                if not src.eval_fraction:
                    continue
                packer = _Packer(_documents(src, self.files[i], 0, 1, self.seed, True, (0, 0, 0), self._skips), [0] * 4)
                batches = []
                try:
                    for _ in range(n_batches):
                        self._fill({packer: batch_size * (self.seq_len + 1)})
                        rows = np.stack([packer.take(self.seq_len + 1) for _ in range(batch_size)])
                        batches.append(self._batch(rows[local]))
                except NoDocuments as e:
                    readers.log.warning("%s; it is not evaluated", e)
                    continue
                self._eval[n_batches][src.name] = batches
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


def tokenizer_path(cfg) -> str:
    """cfg.tokenizer, or the demo tokenizer (the demo corpus is built next to out_dir if needed)."""
    return cfg.tokenizer or demo.corpus(demo.cache_dir(cfg.out_dir))[1]


def make_loader(cfg, process_index: int = 0, process_count: int = 1, num_streams=None) -> Loader:
    """The training loader of a config.TrainConfig (batch_size: global rows per step); sources=()
    means the demo corpus, cached next to out_dir."""
    sources = cfg.sources or demo.corpus(demo.cache_dir(cfg.out_dir))[0]
    return Loader(sources, Tokenizer(tokenizer_path(cfg)), cfg.seq_len, cfg.batch_size, cfg.seed,
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
    import config
    config.command(main)
