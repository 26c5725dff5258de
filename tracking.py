"""Where a run's records go besides metrics.jsonl (which stays the source of truth): TensorBoard
event files and Weights & Biases. Written by process 0 only, record by record as the loop logs.

- TensorBoard, by default whenever tensorboardX is installed (`tensorboard=False` turns it off):
  event files in out_dir/tensorboard/ (`tensorboard --logdir out_dir/tensorboard`, or several runs'
  out_dirs at once). A start at step N writes with purge_step N + 1, so TensorBoard discards the
  points a killed run wrote past its checkpoint: the redone steps replace them, never duplicate.
- W&B when `wandb_project` is set (`pip install wandb`; `WANDB_MODE=offline` works without an
  account). The run's W&B id is kept in out_dir/wandb_id, so a resumed run continues the same W&B
  run (resume="allow"); W&B drops points for steps it already holds, so redone steps are skipped.

Scalars: train/loss, train/lr, train/grad_norm, train/tokens, train/tokens_per_sec, train/mfu,
train/skipped, eval/<source>; the step is the x axis.
"""
import json
import os
import uuid

import config
import records


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
                self.writers.append(_TensorBoard(SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"),
                                                               purge_step=start_step + 1)))
        if cfg.wandb_project:
            wandb = records.optional("wandb", "log to W&B (wandb_project is set)")
            id_file = os.path.join(cfg.out_dir, "wandb_id")
            if not os.path.exists(id_file):
                with open(id_file, "w") as f:
                    f.write(uuid.uuid4().hex[:16])
            with open(id_file) as f:
                run_id = f.read().strip()
            run = wandb.init(project=cfg.wandb_project, name=os.path.basename(os.path.abspath(cfg.out_dir)),
                             id=run_id, resume="allow", dir=cfg.out_dir, config=json.loads(config.to_json(cfg)))
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


class _WandB:
    def __init__(self, run):
        self.run = run

    def log(self, step, scalars):
        self.run.log(scalars, step=step)

    def close(self):
        self.run.finish()
