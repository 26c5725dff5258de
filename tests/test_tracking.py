"""Watching a run: TensorBoard event files and an offline W&B run hold what metrics.jsonl holds,
once per step across a kill and a resume; plot.py draws several runs into one PNG."""
import glob
import json
import os
import shutil
import signal
import struct

import pytest
from conftest import subprocess_env
from runs import run, write_config

from tools import plot
from tools.campaign import FAULT


def train_records(out_dir) -> dict:
    """{step: record} of metrics.jsonl's train records, and {step: record} of its evaluations."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return {r["step"]: r for r in lines if "loss" in r}, {r["step"]: r for r in lines if "loss" not in r}


def test_tensorboard_holds_each_logged_step_once_across_a_kill(corpus, tmp_path):
    """Killed while fetching the batch of step 11 (steps 9 and 10 already logged, the checkpoint is
    at 8), then resumed: TensorBoard's own reader shows every step once, with metrics.jsonl's values."""
    pytest.importorskip("tensorboardX")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out_dir = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.py", corpus, out_dir)
    rc, out = run(cfg, env=subprocess_env(4, FAULT="batch:11"), code=FAULT)
    assert rc == -signal.SIGKILL, out[-3000:]
    rc, out = run(cfg)
    assert rc == 0 and "resumed from" in out, out[-3000:]
    train, evals = train_records(out_dir)
    events = event_accumulator.EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    files = sorted(glob.glob(str(out_dir / "tensorboard" / "events.*")))
    assert len(files) == 2  # one file per start
    # the resumed start opens with TensorBoard's restart marker at the step it redoes first: readers
    # drop what the killed start logged from there on (without it only an out-of-order guess would)
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    starts = [e.step for e in EventFileLoader(files[1]).Load() if e.HasField("session_log")]
    assert starts == [9]
    for tag, expected in [("train/loss", {s: r["loss"] for s, r in train.items()}),
                          ("train/grad_norm", {s: r["grad_norm"] for s, r in train.items()}),
                          ("eval/code", {s: r["eval/code"] for s, r in evals.items()})]:
        points = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in points] == sorted(expected), tag  # each step once
        assert all(abs(v - expected[s]) <= 1e-6 * abs(expected[s]) for s, v in points), tag
    assert sorted(train) == list(range(1, 17)) and sorted(evals) == [8, 16]


def wandb_history(out_dir) -> list[dict]:
    """The history rows of the offline W&B runs under out_dir/wandb, read from their .wandb files
    (a LevelDB-style log of protobuf records, after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        with open(path, "rb") as f:
            raw = f.read()
        pos, data = 7, b""
        while pos + 7 <= len(raw):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
            if kind == 0:
                break
            data = (b"" if kind in (1, 2) else data) + raw[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(data)
                if record.WhichOneof("record_type") == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_an_offline_wandb_run_holds_the_scalars(corpus, tmp_path):
    pytest.importorskip("wandb")
    out_dir = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.py", corpus, out_dir, steps=8, wandb_project="lemur-test", tensorboard=False)
    rc, out = run(cfg, env=subprocess_env(4, WANDB_MODE="offline", WANDB_SILENT="true"))
    assert rc == 0, out[-3000:]
    train, evals = train_records(out_dir)
    rows = wandb_history(out_dir)
    logged = {row["_step"]: row for row in rows}
    assert sorted(logged) == list(range(1, 9)) and not os.path.exists(out_dir / "tensorboard")
    for step, record in train.items():
        assert logged[step]["train/loss"] == pytest.approx(record["loss"], rel=1e-6)
        assert logged[step]["train/lr"] == pytest.approx(record["lr"], rel=1e-6)
    assert logged[8]["eval/code"] == pytest.approx(evals[8]["eval/code"], rel=1e-6)
    with open(out_dir / "wandb_id") as f:  # the run W&B holds is the one a resume will continue
        assert glob.glob(str(out_dir / "wandb" / f"offline-run-*-{f.read().strip()}"))


def test_plot_draws_two_runs_into_one_png(reference, tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(reference[0] / "config.json", other)
    with open(reference[0] / "metrics.jsonl") as f, open(other / "metrics.jsonl", "w") as g:
        for line in f:  # the same run, a quarter of a nat worse everywhere
            g.write(json.dumps({k: v + 0.25 if k == "loss" or k.startswith("eval/") else v
                                for k, v in json.loads(line).items()}) + "\n")
    curves = plot.read_run(str(other))
    assert set(curves) == {"train", "eval/code", "eval/text"} and curves["eval/code"][0] == [8 * 256, 16 * 256]
    plot.main([str(reference[0]), str(other), "--out", str(tmp_path / "both.png")])
    image = matplotlib_image.imread(tmp_path / "both.png")
    assert image.shape[0] >= 300 and image.shape[1] >= 3 * 400  # three panels: train, code, text
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path)])  # not a run
