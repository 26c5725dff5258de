"""Where a run's metrics go: metrics.jsonl (the source of truth), TensorBoard event files and
Weights & Biases. Written by process 0 only, record by record as the loop logs.

- metrics.jsonl holds exactly one record per logged step, whatever the kills: every start trims it
  to the step it starts from (0 on a fresh start), and the loop writes a step's record before any
  checkpoint of that step commits. On a disk records are appended; an object store has no append,
  so there the file is rewritten whole (an object appears whole or not at all: a kill leaves the
  previous version; ~150 bytes a record, a few MB after 20k logged steps), at most every
  METRICS_REWRITE_SECONDS (GCS takes about one write a second to an object) and before every
  checkpoint; records a kill loses are of steps past the last checkpoint, which are redone.

- TensorBoard, by default whenever tensorboardX is installed (`tensorboard=False` turns it off):
  event files in out_dir/tensorboard/ (`tensorboard --logdir out_dir/tensorboard`, or several runs'
  out_dirs at once). A start at step N writes with purge_step N + 1, so TensorBoard discards the
  points a killed run wrote past its checkpoint: the redone steps replace them, never duplicate.
  With out_dir in a bucket the event files go there too, through storage.py: an event file is an
  object rewritten whole at each flush (no append on object stores), as tensorboardX does for gs://.
- W&B when `wandb_project` is set (`pip install wandb`; `WANDB_MODE=offline` works without an
  account). The run's W&B id is kept in out_dir/wandb_id, so a resumed run continues the same W&B
  run (resume="allow"); W&B drops points for steps it already holds, so redone steps are skipped.
  W&B's own files stay on local disk (./wandb beside a bucket out_dir).

Scalars: train/loss, train/lr, train/grad_norm, train/tokens, train/tokens_per_sec, train/mfu,
train/skipped, eval/<source>; the step is the x axis.
"""
import io
import json
import os
import time
import uuid

import config
from formats import readers, storage

# ----------------------------------------------------------------------------- metrics.jsonl

METRICS_REWRITE_SECONDS = 5.0
_remote_metrics = {}  # path -> [the whole metrics.jsonl of a run on an object store, when last written]


def log_metrics(out_dir: str, record: dict):
    path, line = storage.join(out_dir, "metrics.jsonl"), json.dumps(record) + "\n"
    if storage.is_remote(path):
        held = _remote_metrics.setdefault(path, ["", 0.0])
        held[0] += line
        if time.monotonic() - held[1] >= METRICS_REWRITE_SECONDS:
            flush_metrics(out_dir)
        return
    with open(path, "a") as f:
        f.write(line)


def flush_metrics(out_dir: str):
    """Write the records log_metrics holds back on an object store (nothing to do on a disk)."""
    path = storage.join(out_dir, "metrics.jsonl")
    if path in _remote_metrics:
        storage.write_bytes(path, _remote_metrics[path][0].encode())
        _remote_metrics[path][1] = time.monotonic()


def trim_metrics(out_dir: str, step: int):
    """Keep the records of steps <= `step` (the one this start resumes from, 0 if none): later ones
    are about to be redone. A line torn by a kill mid-write is dropped too."""
    path = storage.join(out_dir, "metrics.jsonl")
    keep = []
    for line in storage.read_bytes(path).decode().splitlines(keepends=True) if storage.exists(path) else []:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    if storage.is_remote(path):
        _remote_metrics[path] = ["".join(keep), 0.0]
    if storage.exists(path):
        storage.write_bytes(path, "".join(keep).encode())


# ----------------------------------------------------------------------------- TensorBoard and W&B

def _scalars(record: dict) -> dict:
    """{tag: value} of a metrics.jsonl record: its numbers, train ones under train/."""
    out = {}
    for key, value in record.items():
        if key == "step" or value is None or isinstance(value, str):
            continue
        out[key if "/" in key else f"train/{key}"] = float(value)
    return out


class Tracker:
    """The sinks of one start of a run. log(record) after each metrics.jsonl record; close() at the end."""

    def __init__(self, cfg, start_step: int, main_process: bool = True):
        self.writers = []
        if not main_process:
            return
        if cfg.tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # optional: metrics.jsonl has everything
                pass
            else:
                if storage.is_remote(cfg.out_dir):
                    from tensorboardX import record_writer
                    record_writer.register_writer_factory(cfg.out_dir.split("://")[0], _ObjectStoreEvents)
                self.writers.append(_TensorBoard(SummaryWriter(storage.join(cfg.out_dir, "tensorboard"),
                                                               purge_step=start_step + 1)))
        if cfg.wandb_project:
            wandb = readers.optional("wandb", "log to W&B (wandb_project is set)")
            id_file = storage.join(cfg.out_dir, "wandb_id")
            if not storage.exists(id_file):
                storage.write_bytes(id_file, uuid.uuid4().hex[:16].encode())
            run_id = storage.read_bytes(id_file).decode().strip()
            name = cfg.out_dir.rstrip("/").rsplit("/", 1)[-1] if storage.is_remote(cfg.out_dir) else \
                os.path.basename(os.path.abspath(cfg.out_dir))
            run = wandb.init(project=cfg.wandb_project, name=name, id=run_id, resume="allow",
                             dir="." if storage.is_remote(cfg.out_dir) else cfg.out_dir,
                             config=json.loads(config.to_json(cfg)))
            self.writers.append(_WandB(run))

    def log(self, record: dict):
        for writer in self.writers:
            writer.log(record["step"], _scalars(record))

    def close(self):
        for writer in self.writers:
            writer.close()
        self.writers = []

    def abandon(self):
        """Storage is out of reach: write nothing more to out_dir, at exit neither (TensorBoard's
        writer flushes then); metrics.jsonl holds every record up to the last checkpoint."""
        _ObjectStoreEvents.abandoned = True
        self.writers = []


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def log(self, step, scalars):
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self):
        self.writer.close()


class _ObjectStoreEvents:
    """tensorboardX's writer factory for an object store: an event file kept in memory and
    written whole at a flush, at most every METRICS_REWRITE_SECONDS (and at close)."""

    @staticmethod
    def directory_check(path):
        pass

    @staticmethod
    def open(path):
        return _ObjectStoreEvents(path)

    abandoned = False  # Tracker.abandon: storage is out of reach

    def __init__(self, path):
        self.path, self.buffer, self.written = path, io.BytesIO(), 0.0

    def write(self, data):
        self.buffer.write(data)

    def flush(self, force=False):
        if self.abandoned:
            return
        if force or time.monotonic() - self.written >= METRICS_REWRITE_SECONDS:
            storage.write_bytes(self.path, self.buffer.getvalue())
            self.written = time.monotonic()

    def close(self):
        self.flush(force=True)


class _WandB:
    def __init__(self, run):
        self.run = run

    def log(self, step, scalars):
        self.run.log(scalars, step=step)

    def close(self):
        self.run.finish()
