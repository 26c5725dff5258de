"""Nothing lost, nothing silently wrong: kills at any moment, corrupt and non-finite checkpoints, a
resume with another model, preemption of one host of two, and the messages of what goes wrong."""
import collections
import dataclasses
import json
import os
import random
import shutil
import signal
import socket

import jax
import numpy as np
import pytest
from conftest import HANG, subprocess_env
from runs import FAULT, MICRO, SLOW_FEED, run, start, wait_for_step, write_config

import config
import sharding
import train
from formats import checkpoint
from formats.tokenizer import Tokenizer


def saved_arrays(path) -> dict:
    reader = checkpoint.Reader(path)
    return {key: reader.read(key) for key in reader.pieces}


def records(out_dir) -> list:
    """metrics.jsonl without its wall-clock fields."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_sec", "mfu")} for line in f]


def test_killed_on_a_seeded_schedule_ends_as_if_never_killed(corpus, reference, tmp_path):
    """SIGKILL before the first checkpoint, right after a commit, in the middle of checkpoint writes
    (three kinds), before a metrics record and mid-training; resumed after each. The params,
    optimizer state and metrics.jsonl (log_every=1) end identical to the uninterrupted run's."""
    out_dir = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.py", corpus, out_dir)
    rng = random.Random(12)
    schedule = [("batch", rng.randint(2, 3)), ("saved", 1), ("commit", 1), ("shards", 1),
                ("log", rng.randint(1, 4)), ("batch", rng.randint(2, 5)), ("commit", 2)]
    for event, at in schedule:
        rc, out = run(cfg, env=subprocess_env(4, FAULT=f"{event}:{at}"), code=FAULT)
        assert rc == -signal.SIGKILL, (event, at, out[-3000:])
    rc, out = run(cfg)
    assert rc == 0 and "resumed from" in out, out[-3000:]
    assert checkpoint.committed(str(out_dir))[-1] == 16
    assert not [n for n in os.listdir(out_dir) if n.endswith(".tmp")]
    ours = saved_arrays(checkpoint.step_dir(str(out_dir), 16))
    theirs = saved_arrays(checkpoint.step_dir(str(reference[0]), 16))
    assert ours.keys() == theirs.keys() and any(k.startswith("opt_state") for k in ours)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    assert records(out_dir) == records(reference[0])


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_sigterm_on_one_host_of_two_stops_both_at_one_step(corpus, tmp_path):
    """Two processes train together; only process 1 gets SIGTERM. Both must stop after the same
    step, save it together and exit 0 (stopping alone would leave the other blocked forever in its
    next collective)."""
    out_dir = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.py", corpus, out_dir, checkpoint_every=1000)
    port, procs = free_port(), []
    for i in range(2):
        env = subprocess_env(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                             JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
        procs.append(start(cfg, code=SLOW_FEED, env=env))
    try:
        wait_for_step(out_dir, 3, procs[0])
        procs[1].send_signal(signal.SIGTERM)
        logs = [p.communicate(timeout=HANG)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(logs)[-4000:]
    (step,) = checkpoint.committed(str(out_dir))
    assert 3 <= step < 16 and f"stop requested: saved step {step}" in logs[0]
    saved = sorted(f for f in os.listdir(checkpoint.step_dir(str(out_dir), step)) if f.startswith("shards"))
    assert saved == ["shards.p00000.safetensors", "shards.p00001.safetensors"]


def test_overflowing_updates_are_never_saved_and_the_stop_message_is_true(corpus, tmp_path):
    """lr=1e39 (finite, but not in float32): every update would make the params infinite while the
    loss and gradient stay finite. Each step is skipped, the checkpoint of step 2 holds the initial
    params, and the stop message names it."""
    out_dir = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.py", corpus, out_dir, lr=1e39, checkpoint_every=2, max_nonfinite_steps=3,
                       eval_every=0)
    rc, out = run(cfg)
    assert rc != 0 and "stopping: 3 consecutive steps up to step 3 were not finite" in out, out[-3000:]
    assert f"{checkpoint.step_dir(str(out_dir), 2)}, holds finite params" in out
    assert checkpoint.committed(str(out_dir)) == [2]
    arrays = saved_arrays(checkpoint.step_dir(str(out_dir), 2))
    assert all(np.isfinite(a).all() for a in arrays.values())
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    init = jax.device_get(sharding.init_params_sharded(MICRO, mesh, jax.random.key(0)))
    np.testing.assert_array_equal(arrays["params/layers/wq"], init["layers"]["wq"])


def test_evaluation_can_be_switched_off(corpus, tmp_path):
    out_dir = tmp_path / "out"
    rc, out = run(write_config(tmp_path / "cfg.py", corpus, out_dir, steps=4, eval_every=0))
    assert rc == 0, out[-3000:]
    assert [r["step"] for r in records(out_dir)] == [1, 2, 3, 4]  # train records only, no eval/<source>


# ----------------------------------------------------------------------------- checkpoint integrity

@pytest.fixture
def one_checkpoint(corpus, tmp_path):
    """A checkpoint of MICRO's params on a (1, 2, 2) mesh, checksummed in 4 KiB chunks."""
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    params = sharding.init_params_sharded(MICRO, mesh, jax.random.key(0))
    checkpoint.save(str(tmp_path), 1, {"params": params}, {"batch": 1}, {"model": dataclasses.asdict(MICRO)}, 1,
                    Tokenizer(str(corpus / "tok.model")), chunk_bytes=4096)
    return checkpoint.step_dir(str(tmp_path), 1), mesh


def flip_byte(path, offset_from_end=100):
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        byte = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x20]))


@pytest.mark.parametrize("damage, file, when", [
    ("flip", "shards.p00000.safetensors", "read"), ("cut", "shards.p00000.safetensors", "open"),
    ("flip", "meta.json", "open"), ("cut", "meta.json", "open"), ("flip", "data.p00000.json", "data"),
    ("flip", "checksums.p00000.json", "open"), ("flip", "tokenizer.model", "tokenizer"), ("cut", "COMMIT", "open")])
def test_a_damaged_file_is_named(one_checkpoint, damage, file, when):
    path, _ = one_checkpoint
    if damage == "flip":
        flip_byte(os.path.join(path, file), min(100, os.path.getsize(os.path.join(path, file)) // 2))
    else:
        with open(os.path.join(path, file), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(path, file)) // 2)
    with pytest.raises(checkpoint.CheckpointError, match=os.path.join(path, file)):
        reader = checkpoint.Reader(path)
        {"read": lambda: [reader.read(k) for k in reader.pieces], "data": reader.data_states,
         "tokenizer": reader.tokenizer, "open": lambda: None}[when]()


def test_a_slice_verifies_only_the_chunks_it_reads(one_checkpoint):
    path, _ = one_checkpoint
    reader = checkpoint.Reader(path)
    (name,) = [n for n in reader.saved.entries if n.startswith("params/embed@0:128,0:32")]  # (128, 32) fp32: 4 chunks
    reader.read("params/embed", (slice(0, 10), slice(0, 32)))  # rows 0-9: 1280 bytes, in chunk 0
    assert reader.verified == {(name, 0)}
    flip_byte(os.path.join(path, "shards.p00000.safetensors"))  # far from the embedding's first chunk
    reader.read("params/embed", (slice(0, 10),))


def test_a_commit_without_checksums_does_not_verify(one_checkpoint):
    """Every checkpoint lists its checksums in COMMIT: one that lists none is damaged, not trusted."""
    path, mesh = one_checkpoint
    with open(os.path.join(path, "COMMIT"), "w") as f:
        json.dump({"step": 1}, f)
    with pytest.raises(checkpoint.CheckpointError, match="COMMIT: lists no checksums"):
        checkpoint.restore(path, {"params": sharding.param_structs(MICRO, mesh)})


def copy_run(reference, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(reference[0], out_dir)
    return str(out_dir)


# the run of runs.write_config (the reference), for the structure of its train state
RUN = config.TrainConfig(model=MICRO, steps=16, warmup_steps=2, lr=3e-3, end_lr=3e-4, batch_size=8, seq_len=32,
                         microbatches=2, mesh=(1, 2, 2))


def structs():
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    return train.state_structs(train.make_optimizer(RUN), MICRO, mesh)


def test_resume_falls_back_past_checkpoints_that_do_not_verify(reference, tmp_path, capsys):
    """The newest checkpoint has a flipped byte, the one before it non-finite params (as older code
    could save): the run resumes from step 8, says so, and sets both aside."""
    out_dir = copy_run(reference, tmp_path)
    flip_byte(os.path.join(checkpoint.step_dir(out_dir, 16), "shards.p00000.safetensors"))
    state, reader = checkpoint.restore(checkpoint.step_dir(out_dir, 12), structs())
    state["params"]["norm"] = state["params"]["norm"].at[3].set(np.nan)
    meta = {k: v for k, v in reader.meta.items() if k not in ("step", "process_count", "tokenizer")}
    checkpoint.save(out_dir, 12, state, reader.data_states()[0], meta, 10, reader.tokenizer())  # replaces step 12
    state, reader, data_states = checkpoint.restore_newest(out_dir, structs(), MICRO)
    assert reader.meta["step"] == 8 and checkpoint.committed(out_dir) == [4, 8]
    printed = capsys.readouterr().out
    assert "step_00000016 does not verify" in printed and "checksum mismatch" in printed
    assert "step_00000012 does not verify" in printed and "non-finite values in params/norm" in printed
    assert f"falling back to {checkpoint.step_dir(out_dir, 8)}" in printed
    assert os.path.isdir(checkpoint.step_dir(out_dir, 16) + ".corrupt")


def test_when_no_checkpoint_verifies_the_run_stops_naming_them(reference, tmp_path):
    out_dir = copy_run(reference, tmp_path)
    for step in checkpoint.committed(out_dir):
        flip_byte(os.path.join(checkpoint.step_dir(out_dir, step), "meta.json"), 20)
    with pytest.raises(SystemExit, match=r"(?s)no checkpoint in .* verifies.*step_00000016.*step_00000004"):
        checkpoint.restore_newest(out_dir, structs(), MICRO)
    assert checkpoint.committed(out_dir) == [4, 8, 12, 16]  # nothing set aside: nothing to fall back to


def test_resume_with_another_model_is_refused_before_anything_is_written(reference, tmp_path):
    out_dir = copy_run(reference, tmp_path)
    with open(os.path.join(out_dir, "config.json")) as f:
        before = f.read()
    other = dataclasses.replace(MICRO, rope_theta=500000.0)
    tcfg = dataclasses.replace(RUN, model=other, out_dir=out_dir, mesh=(2, 2, 2))
    with pytest.raises(ValueError, match="another model.*rope_theta 10000.0 -> 500000.0"):
        train.train(tcfg)
    with open(os.path.join(out_dir, "config.json")) as f:
        assert f.read() == before
    checkpoint.check_same_model(MICRO, dataclasses.replace(MICRO, dtype="bfloat16", remat="full"), "x")  # allowed


def test_a_save_clears_uncommitted_leftovers_and_keeps_the_newest(one_checkpoint, tmp_path):
    path, mesh = one_checkpoint
    out_dir = os.path.dirname(path)
    for leftover in ("step_00000009", "step_00000003.tmp"):  # a folder without COMMIT, a half-written save
        os.makedirs(os.path.join(out_dir, leftover))
    with open(os.path.join(out_dir, "config.json.tmp"), "w") as f:  # another file's torn write: not ours
        f.write("{")
    params = sharding.init_params_sharded(MICRO, mesh, jax.random.key(0))
    checkpoint.save(out_dir, 2, {"params": params}, {}, {"model": dataclasses.asdict(MICRO)}, keep=1)
    assert sorted(os.listdir(out_dir)) == ["config.json.tmp", "step_00000002"]


def test_a_slice_several_devices_hold_is_read_once(one_checkpoint, monkeypatch):
    """Restored onto data 2 x tensor 2, every param slice is held by two devices or more: each distinct
    slice is read from the checkpoint once, and the params equal a restore onto the saving mesh."""
    path, mesh = one_checkpoint
    expected, _ = checkpoint.restore(path, {"params": sharding.param_structs(MICRO, mesh)})
    reads, read = collections.Counter(), checkpoint.Reader.read
    monkeypatch.setattr(checkpoint.Reader, "read", lambda self, key, index=(): reads.update(
        [(key, tuple((s.start, s.stop) for s in index))]) or read(self, key, index))
    replicated = sharding.make_mesh(2, 1, 2, devices=jax.devices()[:4])
    state, _ = checkpoint.restore(path, {"params": sharding.param_structs(MICRO, replicated)})
    assert len(reads) > len(jax.tree.leaves(expected)) and set(reads.values()) == {1}, reads  # tensor halves
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
