"""Runs in a bucket: everything a run reads and writes at gs:// URLs, against a real GCS API (the
gcp-storage-emulator, started here on 127.0.0.1 and reached by gcsfs through STORAGE_EMULATOR_HOST).
The emulator counts the bytes it sends, so the tests see that reads fetch ranges, not objects."""
import dataclasses
import json
import os
import signal
import socket
import time

import jax
import numpy as np
import pytest
from conftest import subprocess_env
from runs import MICRO, run, start, write_config

# the newest gcsfs first asks over gRPC what kind of bucket it has, which the emulator does not
# serve (a 60 s timeout); these runs do not need it. Read when gcsfs is imported.
ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
os.environ.update(ENV)
pytest.importorskip("gcsfs", reason="install gcsfs (requirements-cloud.txt) to test gs:// storage")
emulator = pytest.importorskip("gcp_storage_emulator.server", reason="install gcp-storage-emulator to test gs:// storage")

import sharding  # noqa: E402
import train  # noqa: E402
from formats import checkpoint, hf, readers, storage, tensorfile  # noqa: E402
from tools import convert, plot  # noqa: E402
from tools.campaign import FAULT  # noqa: E402

BUCKET = "gs://lemur-test"


class Emulator:
    """A GCS API on 127.0.0.1 in this process, counting the bytes of its responses."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.sent = 0
        handler, counter = emulator.RequestHandler, self

        class Counted:
            def __init__(self, raw):
                self.raw = raw

            def write(self, data):
                counter.sent += len(data)
                return self.raw.write(data)

            def __getattr__(self, name):
                return getattr(self.raw, name)

        self._setup = handler.setup

        def setup(request_handler):
            self._setup(request_handler)
            request_handler.wfile = Counted(request_handler.wfile)

        handler.setup = setup
        self.server = emulator.create_server("127.0.0.1", self.port, in_memory=True,
                                             default_bucket=BUCKET.split("://")[1])
        self.env = {**ENV, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{self.port}"}

    def start(self):
        self.server.start()

    def stop(self):
        self.server.stop()
        emulator.RequestHandler.setup = self._setup

    def lose(self):
        """The bucket's service goes away (its contents stay, for a restart)."""
        self.server.stop()

    def restart(self):
        self.server._api = emulator.APIThread("127.0.0.1", self.port, self.server._storage)
        self.server.start()


@pytest.fixture(scope="module")
def gcs():
    server = Emulator()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    server.start()
    storage._filesystem.cache_clear()  # a filesystem made before the emulator would not reach it
    yield server
    server.stop()
    storage._filesystem.cache_clear()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def upload(local: str, url: str):
    with open(local, "rb") as f:
        storage.write_bytes(url, f.read())


def test_writes_are_whole_or_absent_and_listings_are_fresh(gcs):
    storage.write_bytes(f"{BUCKET}/basics/a.txt", b"hello")
    with pytest.raises(RuntimeError):
        with storage.writer(f"{BUCKET}/basics/b.txt") as f:
            f.write(b"half of it")
            raise RuntimeError("killed mid-write")
    assert storage.listdir(f"{BUCKET}/basics") == ["a.txt"]
    assert storage.glob(f"{BUCKET}/**/*.txt") == [f"{BUCKET}/basics/a.txt"]
    assert storage.read_ranges(f"{BUCKET}/basics/a.txt", [(3, 5), (0, 2)]) == [b"lo", b"he"]
    storage.rmtree(f"{BUCKET}/basics")
    assert not storage.exists(f"{BUCKET}/basics/a.txt") and storage.listdir(f"{BUCKET}/basics") == []


def test_reads_fetch_byte_ranges_not_objects(gcs, tmp_path):
    """A slice of a checkpoint array, a row block of a safetensors tensor and one parquet column
    fetch about their own bytes, a small part of the objects they lie in."""
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    big = np.arange(512 * 256, dtype=np.float32).reshape(512, 256)  # 512 KiB
    state = {"w": jax.device_put(big, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))}
    checkpoint.save(f"{BUCKET}/ranges", 1, state, {}, {}, keep=1, chunk_bytes=4096)
    shards = f"{BUCKET}/ranges/step_00000001/shards.p00000.safetensors"
    reader = checkpoint.Reader(f"{BUCKET}/ranges/step_00000001")
    gcs.sent = 0
    np.testing.assert_array_equal(reader.read("w", (slice(100, 108),)), big[100:108])  # 8 KiB
    assert gcs.sent < 16 << 10 < storage.size(shards) // 16, gcs.sent

    tensorfile.write_safetensors(f"{BUCKET}/ranges/plain.safetensors", [("w", big.shape, big.dtype, lambda: big)])
    saved = tensorfile.SafetensorsDir(f"{BUCKET}/ranges")
    gcs.sent = 0
    np.testing.assert_array_equal(saved.get_slice("w", (slice(8, 24), slice(0, 256))), big[8:24])  # 16 KiB
    assert gcs.sent < 24 << 10, gcs.sent

    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(0)
    table = pa.table({"content": [f"def f{i}(): pass" for i in range(64)],
                      "blob": [rng.bytes(32768) for _ in range(64)]})  # other columns, as The Stack has
    pq.write_table(table, tmp_path / "code.parquet", row_group_size=16)
    upload(str(tmp_path / "code.parquet"), f"{BUCKET}/ranges/code.parquet")
    gcs.sent = 0
    rows = list(readers.read(f"{BUCKET}/ranges/code.parquet", "content"))
    assert [r["content"] for _, r in rows] == table.column("content").to_pylist()
    assert gcs.sent < storage.size(f"{BUCKET}/ranges/code.parquet") // 10, gcs.sent


def test_a_run_in_a_bucket_killed_mid_checkpoint_equals_the_run_on_disk(gcs, corpus, reference, tmp_path):
    """Sources, tokenizer and out_dir in the bucket; SIGKILL while the step-8 checkpoint is being
    written in place (shards there, no COMMIT), then a resume. Losses, metrics.jsonl and the final
    params equal the uninterrupted run on local disk; the export and the hf: init read the bucket."""
    for name in ("code.jsonl", "text.jsonl", "tok.model"):
        upload(str(corpus / name), f"{BUCKET}/corpus/{name}")
    out_dir = f"{BUCKET}/run"
    cfg = write_config(tmp_path / "cfg.py", f"{BUCKET}/corpus", out_dir)
    rc, out = run(cfg, env=subprocess_env(4, FAULT="shards:2", **gcs.env), code=FAULT)
    assert rc == -signal.SIGKILL, out[-3000:]
    assert checkpoint.committed(out_dir) == [4] and storage.exists(f"{out_dir}/step_00000008/shards.p00000.safetensors")
    rc, out = run(cfg, env=subprocess_env(4, **gcs.env))
    assert rc == 0 and f"resumed from {out_dir}/step_00000004" in out, out[-3000:]
    assert checkpoint.committed(out_dir) == [4, 8, 12, 16]
    lines = storage.read_bytes(f"{out_dir}/metrics.jsonl").decode().splitlines()
    ours = {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}
    assert ours == reference[1] and len([line for line in lines if '"loss"' in line]) == 16
    assert storage.glob(f"{out_dir}/tensorboard/events.out.tfevents.*")
    plot.main([out_dir])
    assert storage.read_bytes(f"{out_dir}/loss.png").startswith(b"\x89PNG")

    convert.main([out_dir, f"{BUCKET}/hf", "--dtype", "float32"])
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(storage.listdir(f"{BUCKET}/hf"))
    saved = checkpoint.Reader(checkpoint.step_dir(str(reference[0]), 16))
    mcfg = saved.model_config()
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    params = train.load_params(f"hf:{BUCKET}/hf", mcfg, mesh)
    for key, value in hf.flatten(params):
        np.testing.assert_array_equal(np.asarray(value), saved.read("params/" + key), err_msg=key)


def test_a_checkpoint_that_does_not_verify_is_set_aside_without_rename(gcs, monkeypatch):
    """A read that fails with a network error stops the resume and sets nothing aside; a damaged
    newest checkpoint is copied to .corrupt, then deleted (no rename in a bucket), and the resume
    falls back to the one before."""
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    out_dir, meta = f"{BUCKET}/fallback", {"model": dataclasses.asdict(MICRO)}
    for step in (1, 2):
        state = {"w": jax.device_put(np.full((64, 64), step, np.float32), spec)}
        checkpoint.save(out_dir, step, state, {}, meta, keep=2)
    structs = {"w": jax.ShapeDtypeStruct((64, 64), np.float32, sharding=spec)}
    read_ranges = storage.read_ranges

    def timing_out(path, ranges):
        raise TimeoutError("the read timed out")  # what aiohttp raises after gcsfs's retries
    monkeypatch.setattr(storage, "read_ranges", timing_out)
    with pytest.raises(SystemExit, match="TimeoutError: the read timed out.*nothing was set aside"):
        checkpoint.restore_newest(out_dir, structs, MICRO)
    monkeypatch.setattr(storage, "read_ranges", read_ranges)
    assert checkpoint.committed(out_dir) == [1, 2]

    shards = f"{out_dir}/step_00000002/shards.p00000.safetensors"
    data = bytearray(storage.read_bytes(shards))
    data[-1] ^= 0xFF
    storage.write_bytes(shards, bytes(data))
    state, reader, _ = checkpoint.restore_newest(out_dir, structs, MICRO)
    assert reader.meta["step"] == 1 and float(state["w"][0, 0]) == 1.0
    assert checkpoint.committed(out_dir) == [1]
    assert "COMMIT" in storage.listdir(f"{out_dir}/step_00000002.corrupt")
    assert not storage.exists(f"{out_dir}/step_00000002/COMMIT")


def test_a_missing_bucket_says_so(gcs):
    with pytest.raises(FileNotFoundError, match="bucket gs://no-such-bucket does not exist"):
        storage.write_bytes("gs://no-such-bucket/run/config.json", b"{}")


# train.py that waits, once step 4 is saved, until the test has taken the bucket away. gcsfs's own
# retries (about 33 s a request) are off: storage.py's bounded retries are what is tested.
LOSE_BUCKET = """
import os, sys, time
import gcsfs.retry
gcsfs.retry.is_retriable = lambda e: False
import train
save = train.save
def save_then_wait(cfg, mcfg, step, *args):
    save(cfg, mcfg, step, *args)
    if step == 4:
        open(os.environ["SAVED"], "w").close()
        while os.path.exists(os.environ["SAVED"]):
            time.sleep(0.05)
train.save = save_then_wait
train.main(sys.argv[1:])
"""


def test_a_lost_bucket_stops_the_run_in_one_line_naming_the_committed_step(gcs, corpus, reference, tmp_path):
    """The bucket goes away after step 4 is committed: the run retries for
    LEMUR_STORAGE_RETRY_SECONDS, then stops with one line naming step 4 as safe and no traceback;
    with the bucket back, the same command resumes from step 4 and ends as the run on disk."""
    for name in ("code.jsonl", "text.jsonl", "tok.model"):
        upload(str(corpus / name), f"{BUCKET}/lost/corpus/{name}")
    out_dir, saved = f"{BUCKET}/lost/run", tmp_path / "saved"
    cfg = write_config(tmp_path / "cfg.py", f"{BUCKET}/lost/corpus", out_dir)
    env = subprocess_env(4, LEMUR_STORAGE_RETRY_SECONDS="3", SAVED=str(saved), **gcs.env)
    proc = start(cfg, code=LOSE_BUCKET, env=env)
    try:
        while not saved.exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        gcs.lose()
        saved.unlink()
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
        if not gcs.server._api.is_running.is_set():
            gcs.restart()
    last = out.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert last.startswith("stopping in step ") and "storage unreachable, retried for" in last, last
    assert last.endswith(f"step 4 is safely committed in {out_dir}/step_00000004: run the same command again to "
                         "resume from it"), last
    rc, out = run(cfg, env=subprocess_env(4, **gcs.env))
    assert rc == 0 and f"resumed from {out_dir}/step_00000004" in out, out[-3000:]
    lines = storage.read_bytes(f"{out_dir}/metrics.jsonl").decode().splitlines()
    assert {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r} == reference[1]
