"""What keeps a run whole across kills, preemptions and bad files: trainer.py's loop calls these.

- Preemption: SIGTERM/SIGINT set a flag that each process feeds to its next train step; the step
  reduces the flags of all processes (trainer.stop_flags), so on a pod where the signal reaches
  the hosts at different moments every process still stops after the same step, saves, exits 0.
- metrics.jsonl holds exactly one record per logged step, whatever the kills: every start trims it
  to the step it starts from (0 on a fresh start), and the loop writes a step's record before any
  checkpoint of that step commits. On a disk records are appended; an object store has no append,
  so there the file is rewritten whole (an object appears whole or not at all: a kill leaves the
  previous version; ~150 bytes a record, a few MB after 20k logged steps), at most every
  METRICS_REWRITE_SECONDS (GCS takes about one write a second to an object) and before every
  checkpoint; records a kill loses are of steps past the last checkpoint, which are redone.
- Resume tells damage from a network error: a checkpoint that fails its checks is set aside, but
  a read of an object store that fails after gcsfs's retries stops the run, setting nothing aside
  (start it again), so a passing network fault never costs the newest checkpoint.
- Resuming takes the newest checkpoint that verifies (checksums, readable files, finite values),
  agreed by every process; newer ones that do not are set aside (`step_X.corrupt`), and if none
  verifies the run stops naming them, rather than starting over. A checkpoint of another model
  (any field that changes the math) is refused before anything is written.
"""
import dataclasses
import json
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

import checkpoint
import model
import storage


class Stop:
    """SIGTERM/SIGINT ask the loop to stop: TPU VMs are preempted with SIGTERM."""
    requested = False

    @classmethod
    def install(cls):
        def handler(signum, frame):
            cls.requested = True
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def everywhere(flag: bool) -> bool:
    """Whether `flag` holds on every process (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


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


# ----------------------------------------------------------------------------- resume

def nonfinite_paths(tree) -> list[str]:
    """The paths of the leaves of `tree` holding a NaN or an infinity."""
    flags = jax.device_get(jax.jit(lambda t: jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), t))(tree))
    return [jax.tree_util.keystr(p, simple=True, separator="/")
            for p, ok in jax.tree_util.tree_flatten_with_path(flags)[0] if not ok]


def check_same_model(saved: model.Config, mcfg: model.Config, where: str):
    """Refuse to continue from a model whose math differs: every field but the compute dtype, the
    remat policy and the attention kernel (they change how, not what, is computed)."""
    changed = [f"{f.name} {getattr(saved, f.name)!r} -> {getattr(mcfg, f.name)!r}" for f in dataclasses.fields(mcfg)
               if f.name not in model.HOW and getattr(saved, f.name) != getattr(mcfg, f.name)]
    if changed:
        raise ValueError(f"{where} holds another model than the configured one ({', '.join(changed)}); "
                         "resume with the model it was trained with, or use another out_dir")


def restore_newest(out_dir: str, structs, mcfg: model.Config):
    """(state, reader, data states) of the newest checkpoint in out_dir that verifies, all None if
    there is no checkpoint. Every process must agree that a checkpoint verifies before it is used."""
    failures = []
    for step in reversed(checkpoint.committed(out_dir)):
        path = checkpoint.step_dir(out_dir, step)
        state = reader = data_states = error = network = None
        try:
            reader = checkpoint.Reader(path)
            check_same_model(reader.model_config(), mcfg, path)
            state, _ = checkpoint.restore(reader, structs)
            data_states = reader.data_states()
            if bad := nonfinite_paths(state):
                raise checkpoint.CheckpointError(f"{path}: non-finite values in {', '.join(bad[:4])}")
        except checkpoint.CheckpointError as e:
            error = str(e)
        except OSError as e:  # a missing file is damage; any other I/O error of an object store may pass
            if isinstance(e, FileNotFoundError) or not storage.is_remote(path):
                error = str(e)
            else:
                network = f"{type(e).__name__}: {e}"
        if not everywhere(network is None):
            raise SystemExit(f"reading {path} failed " + (f"({network})" if network else "on another process")
                             + "; that is no sign of damage, so nothing was set aside: start the run again")
        if everywhere(error is None):
            for failed, why in failures:
                if jax.process_index() == 0:
                    print(f"{failed} does not verify ({why}); set aside as {checkpoint.set_aside(failed)}")
            if failures and jax.process_index() == 0:
                print(f"falling back to {path}")
            return state, reader, data_states
        failures.append((path, error or "on another process"))
    if failures:
        listed = "\n".join(f"  {path}: {why}" for path, why in failures)
        raise SystemExit(f"no checkpoint in {out_dir} verifies:\n{listed}")
    return None, None, None
