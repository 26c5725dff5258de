"""Where a run's records go besides metrics.jsonl (which stays the source of truth): TensorBoard
event files and Weights & Biases. Written by process 0 only, record by record as the loop logs.

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
import records
import recovery
import storage


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
            wandb = records.optional("wandb", "log to W&B (wandb_project is set)")
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
    written whole at a flush, at most every recovery.METRICS_REWRITE_SECONDS (and at close)."""

    @staticmethod
    def directory_check(path):
        pass

    @staticmethod
    def open(path):
        return _ObjectStoreEvents(path)

    def __init__(self, path):
        self.path, self.buffer, self.written = path, io.BytesIO(), 0.0

    def write(self, data):
        self.buffer.write(data)

    def flush(self, force=False):
        if force or time.monotonic() - self.written >= recovery.METRICS_REWRITE_SECONDS:
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
