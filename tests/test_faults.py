"""Nothing lost, nothing silently wrong: kills at any moment, corrupt and non-finite checkpoints, a
resume with another model, preemption of one host of two, and the messages of what goes wrong."""
import collections
import dataclasses
import json
import os
import re
import shutil
import signal
import socket

import jax
import numpy as np
import optax
import pytest
from conftest import HANG, subprocess_env
from runs import MICRO, SLOW_FEED, run, start, wait_for_step, write_config

import config
import sharding
import train
from formats import checkpoint
from formats.tokenizer import Tokenizer
from tools import campaign


def saved_arrays(path) -> dict:
    reader = checkpoint.Reader(path)
    return {key: reader.read(key) for key in reader.pieces}


def records(out_dir) -> list:
    """metrics.jsonl without its wall-clock fields."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_sec", "mfu")} for line in f]


def test_killed_on_a_seeded_schedule_ends_as_if_never_killed(corpus, reference, tmp_path):
    """The kill campaign (tools/campaign.py), short: SIGKILLs at moments drawn from a seed, counted
    in events (so the verdict is the same on any machine), three of them mid-write, each followed by
    a resume. The params, Adam state, loader and loop positions and metrics.jsonl (log_every=1, bar
    wall-clock fields) end identical, byte for byte, to the uninterrupted run's."""
    cfg = str(reference[0].parent / "cfg.py")
    figures = campaign.campaign(cfg, str(tmp_path), kills=6, seed=3, env=subprocess_env(4), reference=str(reference[0]),
                                log=lambda line: None)
    assert (figures["kills"], figures["finished_early"]) == (6, False), figures
    assert figures["mid_write_kills"] == 3 and figures["resumes"] >= 4, figures
    assert figures["bytes_different"] == 0 and figures["parts"]["opt_state"][0] > 0, figures
    assert not [n for n in os.listdir(tmp_path / "killed") if n.endswith((".tmp", ".corrupt"))]


def test_the_campaign_sees_one_flipped_byte(reference, tmp_path):
    """The campaign's comparison can fail: a copy of the reference with one bit of Adam's state
    flipped differs by one byte there, and nowhere else."""
    shutil.copytree(reference[0], tmp_path / "copy")
    step_dir = checkpoint.step_dir(str(tmp_path / "copy"), 16)
    state, reader = checkpoint.restore(step_dir, structs())
    mu = optax.tree_utils.tree_get(state["opt_state"], "mu")
    norm = np.array(mu["norm"])
    norm.view(np.uint32)[0] ^= 1  # the lowest bit of one float
    flipped = optax.tree_utils.tree_set(state["opt_state"], mu={**mu, "norm": jax.device_put(norm, mu["norm"].sharding)})
    meta = {k: v for k, v in reader.meta.items() if k not in ("step", "process_count", "tokenizer")}
    data_state, tokenizer = reader.data_states()[0], reader.tokenizer()
    shutil.rmtree(step_dir)
    checkpoint.save(str(tmp_path / "copy"), 16, {**state, "opt_state": flipped}, data_state, meta, 10, tokenizer)
    parts = campaign.compare(str(tmp_path / "copy"), str(reference[0]))
    assert parts["opt_state"][1] == 1 and sum(d for _, d in parts.values()) == 1, parts


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


def reference_config(reference, out_dir, *overrides):
    """The reference run's config, in out_dir, on this process's 8 devices (a mesh may change)."""
    return config.load(str(reference[0].parent / "cfg.py"), [f"--out_dir={out_dir}", "--mesh=2,2,2", *overrides])


def snapshot(folder) -> dict:
    """{path: (size, mtime)} of everything under folder."""
    return {os.path.join(d, n): (os.stat(os.path.join(d, n)).st_size, os.stat(os.path.join(d, n)).st_mtime_ns)
            for d, _, names in os.walk(folder) for n in names}


@pytest.mark.parametrize("override, message", [
    ("--seed=5", "seed=5 (it was trained with 0)"), ("--batch_size=16", "batch_size=16 (it was trained with 8)"),
    ("--seq_len=16", "seq_len=16 (it was trained with 32)"),
    ("--sources.code.weight=3", "sources.code.weight=3.0 (it was trained with 10.0)"),
    ("--model.rope_theta=500000", "model.rope_theta=500000.0 (it was trained with 10000.0)")])
def test_a_resume_that_changes_the_run_is_refused_before_anything_is_written(reference, tmp_path, override, message):
    """A key outside config.RESUMABLE, changed on resume, stops the run in one line naming the key,
    both values and the way out, before anything in out_dir is written."""
    out_dir = copy_run(reference, tmp_path)
    before = snapshot(out_dir)
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        train.train(reference_config(reference, out_dir, override))
    assert "\n" not in str(refused.value) and f"--init_from=ckpt:{checkpoint.step_dir(out_dir, 16)}" in str(refused.value)
    assert snapshot(out_dir) == before
    checkpoint.check_same_model(MICRO, dataclasses.replace(MICRO, dtype="bfloat16", remat="full"), "x")  # allowed


def test_a_resume_applies_safe_changes_and_records_them_once(reference, tmp_path):
    """lr, steps, checkpoint_every and the mesh change on resume from step 16: the new lr schedule
    trains steps 17-18, and the change is recorded once, at step 17, in metrics.jsonl, config.json
    and the checkpoints' meta.json, also after a second start."""
    out_dir = copy_run(reference, tmp_path)
    changed = reference_config(reference, out_dir, "--lr=1e-2", "--steps=18", "--checkpoint_every=2")
    train.train(changed)
    changes = {"out_dir": [str(reference[0]), out_dir], "steps": [16, 18], "lr": [0.003, 0.01],  # a moved run, too
               "mesh": [[1, 2, 2], [2, 2, 2]], "checkpoint_every": [4, 2]}
    train.train(changed)  # a finished run: it changes nothing, and records nothing twice
    with open(os.path.join(out_dir, "config.json")) as f:
        run = json.load(f)
    assert run["history"] == [{"step": 17, "changes": changes}] and run["lr"] == 0.01 and run["seed"] == 0
    assert checkpoint.Reader(checkpoint.step_dir(out_dir, 18)).meta["config_history"] == run["history"]
    logged = records(out_dir)
    assert [r for r in logged if "config_changes" in r] == [{"step": 17, "config_changes": changes}]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 19))
    lr = {r["step"]: r["lr"] for r in logged if "loss" in r}
    np.testing.assert_allclose(lr[17], float(train.lr_schedule(changed)(16)), rtol=1e-6)
    assert lr[16] == records(reference[0])[-2]["lr"]  # steps before the change keep their record


def test_a_save_clears_its_own_leftovers_sets_others_aside_and_keeps_the_newest(one_checkpoint, tmp_path, capsys):
    """A half-written save (step_X.tmp) and a marked, uncommitted folder (an interrupted delete) are
    the loop's own: removed. A folder whose COMMIT went some other way is set aside, by name."""
    path, mesh = one_checkpoint
    out_dir = os.path.dirname(path)
    for leftover in ("step_00000009", "step_00000003.tmp", "step_00000005"):
        os.makedirs(os.path.join(out_dir, leftover))
    open(os.path.join(out_dir, "step_00000005", checkpoint.UNFINISHED), "w").close()
    with open(os.path.join(out_dir, "config.json.tmp"), "w") as f:  # another file's torn write: not ours
        f.write("{")
    params = sharding.init_params_sharded(MICRO, mesh, jax.random.key(0))
    checkpoint.save(out_dir, 2, {"params": params}, {}, {"model": dataclasses.asdict(MICRO)}, keep=1)
    assert sorted(os.listdir(out_dir)) == ["config.json.tmp", "step_00000002", "step_00000009.corrupt"]
    printed = capsys.readouterr().out
    assert f"{os.path.join(out_dir, 'step_00000009')} has no COMMIT" in printed
    assert f"removing {os.path.join(out_dir, 'step_00000005')}: an interrupted save or delete" in printed


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


# ----------------------------------------------------------------------------- one clear line

def test_a_users_error_is_one_line_and_debug_shows_the_traceback(capsys):
    """config.command, every command's __main__: a user's error (ValueError, OSError, ImportError)
    is one `error:` line and exit status 1; --debug re-raises it; a bug keeps its traceback."""
    def main(argv):
        assert "--debug" not in argv
        raise FileNotFoundError("tokenizer model 'x.model' does not exist\n(a second line)")
    with pytest.raises(SystemExit) as stopped:
        config.command(main, ["cfg.py"])
    assert stopped.value.code == 1
    assert capsys.readouterr().err == "error: tokenizer model 'x.model' does not exist (a second line)\n"
    with pytest.raises(FileNotFoundError):
        config.command(main, ["cfg.py", "--debug"])

    def buggy(argv):
        raise TypeError("a bug")
    with pytest.raises(TypeError):
        config.command(buggy, [])


def test_bad_data_is_named_before_anything_is_written(reference, corpus, tmp_path):
    """A file that is not a sentencepiece model, a source that yields no records: each fails
    naming its file, and out_dir is never created."""
    (tmp_path / "bad.model").write_text("not a model")
    (tmp_path / "empty.jsonl").write_text("")
    out_dir = tmp_path / "out"
    for override, message in ((f"--tokenizer={tmp_path / 'bad.model'}", "bad.model: not a sentencepiece model"),
                              (f"--sources.code.paths={tmp_path / 'empty.jsonl'}", "found no training records in")):
        with pytest.raises(ValueError, match=message):
            train.train(reference_config(reference, out_dir, override))
        assert not out_dir.exists()


def test_a_refused_resume_from_the_command_line_is_one_line(reference, tmp_path):
    out_dir = copy_run(reference, tmp_path)
    rc, out = run(str(reference[0].parent / "cfg.py"), 4, f"--out_dir={out_dir}", "--seed=5")
    assert rc == 1 and "Traceback" not in out, out[-3000:]
    assert out.strip().splitlines()[-1].startswith(f"error: config: cannot resume {checkpoint.step_dir(out_dir, 16)} "
                                                   "with seed=5 (it was trained with 0)")
