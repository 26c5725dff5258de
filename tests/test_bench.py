"""Smoke runs of the benchmarks on tiny sizes, so they cannot silently rot (they are not timed tests).
bench/data.py's smoke run lives in tests/test_data.py."""
import json
import os
import subprocess
import sys

import pytest
from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args, timeout=120):
    # not conftest's 8 forced devices; test_aot.py's libtpu in this process holds its lockfile
    env = subprocess_env(ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_step_benchmark_smoke():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    result = run_bench("bench/step.py", "--smoke", "--kv_heads=2")
    for key in ("ours_tokens_per_sec", "hf_torch_tokens_per_sec", "ratio", "flops_fraction_of_matmul"):
        assert result[key] > 0, result
    assert result["smoke"] and result["dims"]["kv_heads"] == 2


def test_aot_benchmark_smoke():
    from test_aot import tpu_available
    if not tpu_available():
        pytest.skip("libtpu (jax[tpu]) cannot describe TPU topologies here")
    (row,) = run_bench("bench/aot.py", "--smoke")["rows"]
    assert row["topology"] == "v4-8" and row["fits"] and 0 <= row["hbm_per_chip_gib"] < 1, row
    hbm = row["hbm_bytes"]
    assert row["argument_gib"] == hbm["argument"] / 2**30 > 0 and row["temp_gib"] == hbm["temp"] / 2**30, row
    assert hbm["total"] == hbm["argument"] + hbm["output"] + hbm["temp"] + hbm["alias"], row


def test_attention_benchmark_smoke():
    pytest.importorskip("torch")
    result = run_bench("bench/attention.py", "--smoke")
    assert result["smoke"] and min(result["ours_ms"], result["plain_ms"], result["torch_sdpa_ms"]) > 0, result
    assert result["grad_max_abs_diff"] < 1e-4, result  # ours agrees with the plain masked softmax
