"""Helpers of the tests that start real training runs (tests/test_train.py, tests/test_faults.py):
a small corpus, config files over it, train.py subprocesses (FAULT, the kills, is
tools/campaign.py's), and their metrics."""
import dataclasses
import json
import os
import random
import subprocess
import sys
import textwrap
import time

import sentencepiece as spm
from conftest import HANG, ROOT, subprocess_env

import model

MICRO = model.Config(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                     max_seq_len=64, dtype="float32")


def make_corpus(root):
    """Two small JSONL sources and a sentencepiece model trained on them, in folder `root`."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "lemur", "code", "text", "jax", "tpu", "token"]
    lines = []
    for name in ("code", "text"):
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(400):
                body = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
                lines.append(f"def f{i}(): return '{body}'" if name == "code" else body)
                f.write(json.dumps({"text": lines[-1]}) + "\n")
    (root / "all.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(root / "all.txt"), model_prefix=str(root / "tok"), vocab_size=200,
                                   model_type="bpe", num_threads=1, minloglevel=2)
    return root


def write_config(path, corpus, out_dir, **overrides):
    """A config file for a 16-step run of MICRO on the corpus (a folder or a bucket URL): 4 devices, 2 microbatches, a record
    every step, an evaluation at step 8 and 16, a checkpoint every 4 steps."""
    fields = dict(out_dir=str(out_dir), steps=16, warmup_steps=2, lr=3e-3, end_lr=3e-4, batch_size=8,
                  seq_len=32, microbatches=2, mesh=(1, 2, 2), log_every=1, eval_every=8, eval_batches=1,
                  checkpoint_every=4, keep_checkpoints=10, tokenizer=f"{corpus}/tok.model")
    fields.update(overrides)
    path.write_text(textwrap.dedent(f"""
        from config import TrainConfig
        from config import Source
        from model import Config
        config = TrainConfig(
            model=Config(**{dataclasses.asdict(MICRO)!r}),
            sources=(Source("code", ({f"{corpus}/code.jsonl"!r},), 10.0, eval_fraction=0.2),
                     Source("text", ({f"{corpus}/text.jsonl"!r},), 1.0, eval_fraction=0.2)),
            **{fields!r})
    """))
    return str(path)


# the real run with a data feed slowed to 0.15 s a batch: with its programs in the compilation
# cache, the tiny test run would otherwise finish before a signal sent at a random moment arrives
SLOW_FEED = """
import sys, time, data, train
next_batch = data.Loader.__next__
def slow_next(self):
    time.sleep(0.15)
    return next_batch(self)
data.Loader.__next__ = slow_next
train.main(sys.argv[1:])
"""

def start(cfg_path, devices=4, *args, code=None, env=None):
    cmd = [sys.executable, "-c", code, cfg_path, *args] if code else [sys.executable, "train.py", cfg_path, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env or subprocess_env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(cfg_path, devices=4, *args, code=None, timeout=HANG, env=None):
    proc = start(cfg_path, devices, *args, code=code, env=env)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def losses(out_dir):
    """step -> loss from metrics.jsonl (the last record of each step)."""
    result = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                result[record["step"]] = record["loss"]
    return result


def wait_for_step(out_dir, step, proc, timeout=HANG):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stdout.read()}")
        if os.path.exists(os.path.join(out_dir, "metrics.jsonl")) and max(losses(out_dir), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")
