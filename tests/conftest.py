"""Test setup: 8 forced CPU devices (multi-device code runs on one machine), CPU only; the demo
corpus built once per test run; one JAX compilation cache shared by the subprocesses tests start."""
import atexit
import os
import shutil
import sys
import tempfile

import pytest

# Must happen before jax is imported anywhere.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# A hang guard, in seconds, for a subprocess a test waits on: wide enough for a machine 10x slower
# than the 2 idle cores the suite is timed on. No verdict depends on wall-clock speed: limits that
# decide a test are CPU-time or memory limits (the sandbox's) or counts of steps.
HANG = 900

# train.py runs started by the tests compile the same few programs again and again: with a cache
# shared by those processes, each is compiled once per test run
_SUBPROCESS_JAX_CACHE = tempfile.mkdtemp(prefix="lemur-test-jax-cache-")
atexit.register(shutil.rmtree, _SUBPROCESS_JAX_CACHE, ignore_errors=True)


def subprocess_env(devices: int | None = None, **extra) -> dict:
    """The environment for a subprocess of a test: CPU only, `devices` forced host devices (None:
    no forced devices), and the test run's shared compilation cache."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=_SUBPROCESS_JAX_CACHE,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory):
    """A folder for runs of the demo data: its demo_data/ (where demo.cache_dir puts the data of
    any out_dir inside it) holds the demo corpus and chat set, built once for the whole test run."""
    from formats import demo
    root = tmp_path_factory.mktemp("runs")
    demo.corpus(demo.cache_dir(str(root / "any_run")))
    demo.chat_sources(demo.cache_dir(str(root / "any_run")))
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Two small JSONL sources and a sentencepiece model trained on them (tests/runs.py)."""
    import runs
    return runs.make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def reference(corpus, tmp_path_factory):
    """An uninterrupted 16-step run (runs.write_config): what every resumed run must reproduce.
    (its out_dir, {step: loss})"""
    import runs
    root = tmp_path_factory.mktemp("reference")
    rc, out = runs.run(runs.write_config(root / "cfg.py", corpus, root / "out"))
    assert rc == 0, out
    result = runs.losses(root / "out")
    assert sorted(result) == list(range(1, 17)), result
    return root / "out", result
