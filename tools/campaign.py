"""A kill campaign: kill -9 a run again and again, resume it each time, and compare the end with an
uninterrupted run byte for byte.

    python -m tools.campaign CONFIG --kills 30 [--seed 0] [--work out/campaign] [--devices 4] [--key=value ...]
    python -m tools.campaign configs/tiny.py --kills 30 --steps=60 --checkpoint_every=4 --log_every=1 --eval_every=20

First the config runs uninterrupted (WORK/reference), then again in WORK/killed, where each start
of train.py gets a SIGKILL at a moment drawn from the seed: a third of them in the middle of a
checkpoint write (after a process's shards are written, after COMMIT before the rename, or in the
middle of deleting an old checkpoint), the others mid-training, before a metrics record or right
after a commit. After the last kill the run goes to its end. Then the final checkpoints are
compared byte for byte: params, Adam state, the loader's position, the loop's position, and
metrics.jsonl apart from its wall-clock fields (tokens_per_sec, mfu). It prints its figures
(kills, mid-write kills, resumes, bytes compared, bytes different) and exits 1 if any byte
differs.

Kill moments are counted in events (the n-th batch, the n-th checkpoint write, ...), not in
seconds, so the verdict does not depend on the machine's speed: the same seed kills at the same
points on a fast machine and a slow one. FAULT is the train.py wrapper that does it (also used by
the tests). Kill i of k lands at a step drawn in the i-th k-th of the run, so the kills spread
over it and all land before its end.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

import config
from formats import checkpoint, storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# train.py with a SIGKILL at the n-th occurrence of one event (env FAULT="event:n"): "batch" (a
# batch is fetched: mid-training), "shards" (a process's shards are written, the checkpoint is not
# committed), "commit" (COMMIT written, the folder not yet renamed or unmarked), "delete" (an old
# checkpoint's COMMIT removed, its files not yet), "saved" (the checkpoint is committed and
# renamed, nothing after it has run), "log" (a metrics record is about to be written)
FAULT = """
import os, signal, sys
import data, train
from formats import checkpoint, storage, tensorfile, tracking
event, at = os.environ["FAULT"].split(":")
seen = [0]
def fault(name):
    if name == event:
        seen[0] += 1
        if seen[0] == int(at):
            os.kill(os.getpid(), signal.SIGKILL)
def wrap(module, name, before=None, after=None, when=lambda *a: True):
    original = getattr(module, name)
    def wrapped(*args, **kwargs):
        if before and when(*args):
            fault(before)
        result = original(*args, **kwargs)
        if after and when(*args):
            fault(after)
        return result
    setattr(module, name, wrapped)
wrap(data.Loader, "__next__", before="batch")
wrap(tensorfile, "write_safetensors", after="shards")
wrap(checkpoint, "_write_json", after="commit", when=lambda path, obj: path.endswith("COMMIT"))
wrap(storage, "remove", after="delete", when=lambda path: path.endswith("COMMIT"))
wrap(checkpoint, "save", after="saved")
wrap(tracking, "log_metrics", before="log")
train.main(sys.argv[1:])
"""
MID_WRITE = ("shards", "commit", "delete")
WALL_CLOCK = ("tokens_per_sec", "mfu")


def environment(devices: int, cache_dir: str, **extra) -> dict:
    """A train.py subprocess's environment: CPU with `devices` forced host devices, a shared JAX
    compilation cache (each restart would otherwise compile again)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)
    return env


def start(cfg_path: str, args=(), env=None, fault: str | None = None) -> subprocess.Popen:
    """train.py CONFIG ARGS, under FAULT when `fault` ("event:n") is given."""
    cmd = [sys.executable, "-c", FAULT] if fault else [sys.executable, "train.py"]
    env = dict(env or os.environ, **({"FAULT": fault} if fault else {}))
    return subprocess.Popen(cmd + [cfg_path, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(cfg_path: str, args=(), env=None, fault: str | None = None, timeout: float = 900) -> tuple[int, str]:
    proc = start(cfg_path, args, env, fault)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def plan_kill(rng: random.Random, cfg, done: int, committed: int, i: int, kills: int) -> tuple[str, int]:
    """Kill i of `kills`, as (event, n): at a step drawn in the i-th slice of the run (so kills
    spread over it), every third one mid-write, for a start resuming at step `done` with
    `committed` checkpoints."""
    lo, hi = cfg.steps * i // kills, cfg.steps * (i + 1) // kills
    target = min(max(done + 1, rng.randint(lo + 1, max(lo + 1, hi))), cfg.steps)
    saves = sorted({s for s in range(done + 1, cfg.steps + 1) if s % cfg.checkpoint_every == 0} | {cfg.steps})
    save = 1 + sum(s < target for s in saves)  # the first save at or after the target step
    if i % 3 == 1:  # a third of the kills
        event = rng.choice(["shards", "commit"] + (["delete"] if committed >= cfg.keep_checkpoints else []))
    else:
        event = rng.choice(["batch", "batch", "log", "saved"])
    if event in ("saved", "delete") and save == len(saves):  # after the last commit: the run would be done
        event = "commit"
    return event, {"batch": target - done, "log": max(1, (target - done) // cfg.log_every)}.get(event, save)


def _arrays(path: str) -> dict:
    reader = checkpoint.Reader(path)
    return {key: reader.read(key) for key in sorted(reader.pieces)}, reader


def _metrics(out_dir: str) -> bytes:
    """metrics.jsonl without its wall-clock fields, canonical JSON, one record a line."""
    lines = storage.read_bytes(storage.join(out_dir, "metrics.jsonl")).decode().splitlines()
    return "".join(json.dumps({k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}) + "\n"
                   for line in lines).encode()


def _differing(a: bytes, b: bytes) -> int:
    x, y = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
    n = min(len(x), len(y))
    return int(np.count_nonzero(x[:n] != y[:n])) + abs(len(x) - len(y))


def compare(ours: str, theirs: str) -> dict:
    """{what: (bytes compared, bytes different)} of two runs' final checkpoints and metrics."""
    step = checkpoint.committed(theirs)[-1]
    mine, reader = _arrays(checkpoint.step_dir(ours, step))
    other, other_reader = _arrays(checkpoint.step_dir(theirs, step))
    out = {}
    for what in ("params", "opt_state"):
        keys = sorted(k for k in set(mine) | set(other) if k.startswith(what))
        a = b"".join(mine[k].tobytes() if k in mine else b"" for k in keys)
        b = b"".join(other[k].tobytes() if k in other else b"" for k in keys)
        out[what] = (max(len(a), len(b)), _differing(a, b))
    for what, a, b in (("loader", reader.data_states(), other_reader.data_states()),
                       ("loop", reader.meta.get("loop"), other_reader.meta.get("loop"))):
        a, b = json.dumps(a, sort_keys=True).encode(), json.dumps(b, sort_keys=True).encode()
        out[what] = (max(len(a), len(b)), _differing(a, b))
    a, b = _metrics(ours), _metrics(theirs)
    out["metrics.jsonl"] = (max(len(a), len(b)), _differing(a, b))
    return out


def campaign(cfg_path: str, work: str, kills: int, seed: int = 0, overrides=(), devices: int = 4,
             reference: str | None = None, env=None, log=print) -> dict:
    """Run the campaign (module doc) in folder `work`; `reference`: the out_dir of an uninterrupted
    run of the same config, when there is one already. Returns its figures."""
    env = env or environment(devices, os.path.join(work, "jax_cache"))
    began = time.time()
    if reference is None:
        reference = os.path.join(work, "reference")
        rc, out = run(cfg_path, [*overrides, f"--out_dir={reference}"], env)
        if rc:
            raise RuntimeError(f"the uninterrupted run failed:\n{out[-3000:]}")
    out_dir = os.path.join(work, "killed")
    if storage.exists(out_dir):
        storage.rmtree(out_dir)
    args = [*overrides, f"--out_dir={out_dir}"]
    cfg = config.load(cfg_path, args)
    rng, figures = random.Random(seed), {"kills": 0, "mid_write_kills": 0, "resumes": 0, "finished_early": False}
    for i in range(kills):
        saved = checkpoint.committed(out_dir)
        if saved and saved[-1] >= cfg.steps:
            figures["finished_early"] = True
            break
        event, at = plan_kill(rng, cfg, saved[-1] if saved else 0, len(saved), i, kills)
        rc, out = run(cfg_path, args, env, fault=f"{event}:{at}")
        figures["resumes"] += "resumed from" in out
        if rc == 0:  # the run ended before that moment came
            figures["finished_early"] = True
            break
        if rc != -signal.SIGKILL:
            raise RuntimeError(f"kill {i + 1} ({event}:{at}) ended with status {rc}:\n{out[-3000:]}")
        figures["kills"] += 1
        figures["mid_write_kills"] += event in MID_WRITE
        log(f"kill {i + 1}: {event}:{at} (from step {saved[-1] if saved else 0})")
    if not figures["finished_early"]:
        rc, out = run(cfg_path, args, env)
        figures["resumes"] += "resumed from" in out
        if rc:
            raise RuntimeError(f"the final resume failed:\n{out[-3000:]}")
    parts = compare(out_dir, reference)
    figures.update(bytes_compared=sum(n for n, _ in parts.values()), bytes_different=sum(d for _, d in parts.values()),
                   parts=parts, seconds=round(time.time() - began))
    return figures


def main(argv):
    parser = argparse.ArgumentParser(description="kill -9 a run again and again; compare with an uninterrupted one.")
    parser.add_argument("config")
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--work", default="out/campaign", help="the folder of both runs (emptied of the killed one)")
    parser.add_argument("--devices", type=int, default=None, help="forced CPU devices (default: the config's mesh)")
    args, overrides = parser.parse_known_args(argv)
    cfg = config.load(args.config, overrides)
    devices = args.devices or int(np.prod(cfg.mesh))
    os.makedirs(args.work, exist_ok=True)
    if os.path.exists(os.path.join(args.work, "reference")):
        shutil.rmtree(os.path.join(args.work, "reference"))
    figures = campaign(args.config, args.work, args.kills, args.seed, overrides, devices)
    for what, (n, d) in figures.pop("parts").items():
        print(f"{what}: {n} bytes compared, {d} different")
    print(json.dumps(figures))
    if figures["bytes_different"]:
        raise SystemExit(1)


if __name__ == "__main__":
    config.command(main)
