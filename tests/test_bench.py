"""Smoke runs of the benchmarks on tiny sizes, so they cannot silently rot (they are not timed tests).
bench/data.py's smoke run lives in tests/test_data.py."""
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import HANG, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args, timeout=HANG):
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
    assert result["grad_max_rel_diff"] < 1e-5, result  # ours agrees with the plain masked softmax


def test_serve_benchmark_smoke():
    for package in ("torch", "transformers", "openai", "fastapi", "uvicorn"):
        pytest.importorskip(package)
    result = run_bench("bench/serve.py", "--smoke", timeout=300)
    assert result["same_replies"] and result["eight_clients"]["tokens"] == result["one_client"]["tokens"] == 64
    assert result["decode_steps_8_clients"] < 64 and result["transformers_one_by_one"]["tokens"] == 64, result


def test_agent_benchmark_smoke():
    """bench/agent.py on tests/mint_layout: both sides run every episode to the same verdicts, and
    the batched side shares decode steps."""
    result = run_bench("bench/agent.py", "--smoke")
    [(one, many)] = result["pairs"]
    assert one["episodes"] == many["episodes"] == 2 and one["tokens"] == many["tokens"] > 0, result
    assert many["decode_steps"] < one["decode_steps"] and one["environment_seconds"] > 0, result


def gpu_script():
    """bench/gpu.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(ROOT, "bench", "gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_smoke(tmp_path):
    """The whole GPU script at tiny sizes on the CPU: every check but cuDNN's (no GPU here) and
    torch.compile's (minutes on a CPU) runs, passes, and lands in gpu.json, gpu.md and the trace summary."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    result = run_bench("bench/gpu.py", "--smoke", f"--out={tmp_path}", timeout=3 * HANG)
    saved = json.loads((tmp_path / "gpu.json").read_text())
    failed = {f"{name} {part}": value.get("error") for name, check in saved["checks"].items()
              for part, value in check.get("parts", {}).items() if not value.get("ok")}
    assert not failed, failed
    assert result["ok"] and result["checks"] == {"env": True, "correctness": True, "step/ours-jnp": True,
                                                 "step/hf-sdpa": True, "step/hf-eager": True, "decode": True,
                                                 "attention": True, "compile": None}, result
    assert "cuDNN" in saved["not_checked"] and saved["checks"]["env"]["parts"]["versions"]["versions"]["jax"]
    correctness = saved["checks"]["correctness"]["parts"]
    assert correctness["sharded_fp32"]["mesh"] == [1, 2, 2] and correctness["sharded_fp32"]["grad_max_rel_diff"] < 1e-4
    assert correctness["attention"]["errors"]["jnp"]["dq"] < correctness["attention"]["tolerance"]
    ours, eager = (saved["checks"][f"step/{side}"]["parts"]["timing"] for side in ("ours-jnp", "hf-eager"))
    assert ours["model_flops_per_token"] == eager["model_flops_per_token"] and ours["params"] == eager["params"]
    assert saved["goals"]["over_hf_eager"] == ours["tokens_per_sec"] / eager["tokens_per_sec"]
    decode = saved["checks"]["decode"]["parts"]
    assert decode["rows-1"]["tokens_per_sec"] > 0 and decode["rows-8"]["tokens_per_sec"] > 0, decode
    # fp32: each of the 8 rows decoded together equals its prompt decoded alone
    assert decode["rows-8"]["dtype"] == "float32" and decode["rows-8"]["rows_equal_alone"] == 8, decode
    attention = saved["checks"]["attention"]["parts"]
    assert set(attention) == {f"{impl}-seq{T}" for impl in ("jnp", "sdpa") for T in (64, 128)}
    summary = (tmp_path / "trace_top.txt").read_text()
    # which ops rank first depends on the machine and its load: the summary's shape is checked here,
    # its classification of kernels on a synthetic trace below
    assert "top kernels by time" in summary and "top HLO ops by time" in summary and "by kind of work" in summary, summary
    table = (tmp_path / "gpu.md").read_text()
    assert "step/hf-eager" in table and "x HF eager" in table and "compile | skipped" in table, table
    assert "8/8 rows as decoded alone" in table, table


def test_gpu_script_records_a_dead_worker_and_goes_on(tmp_path):
    gpu = gpu_script()
    record, saves = {}, []
    with open(tmp_path / "log.txt", "w") as log:
        gpu.run_check("broken", {"worker": "no-such-worker", "gpu": False}, 60, record, lambda: saves.append(1), log)
    assert record["ok"] is False and record["exit_code"] == 1 and "exit code 1" in record["error"] and saves
    assert "no-such-worker" in (tmp_path / "log.txt").read_text()


def test_trace_summary_of_a_gpu_trace(tmp_path):
    """summarise_trace on a trace laid out as jax.profiler writes a GPU's: kernels on stream lines
    (two streams overlapping), HLO ops on the "XLA Ops" line, host events not counted."""
    gpu = gpu_script()
    meta = lambda kind, pid, tid, name: {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}
    span = lambda pid, tid, name, ts, dur: {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}
    events = [meta("process_name", 1, None, "/device:GPU:0"), meta("process_name", 2, None, "/host:CPU"),
              meta("thread_name", 1, 7, "Stream #7(Compute)"), meta("thread_name", 1, 8, "Stream #8(Compute)"),
              meta("thread_name", 1, 9, "XLA Ops"), meta("thread_name", 2, 1, "python"),
              span(1, 7, "nvjet_tst_128x256_64x4_gemm", 0, 60), span(1, 7, "loop_multiply_fusion", 60, 10),
              span(1, 8, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 50, 30),
              span(1, 7, "nvjet_tst_128x256_64x4_gemm", 100, 60),
              span(1, 9, "dot.1", 0, 60), span(1, 9, "dot.1", 100, 60), span(1, 9, "custom-call.2", 50, 30),
              span(2, 1, "PjitFunction(step)", 0, 500)]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = gpu.summarise_trace(str(path))
    assert summary["kernel_ms"] == 0.16 and summary["window_ms"] == 0.16
    assert summary["busy_fraction"] == 140 / 160  # 0-80 and 100-160: the overlap counted once
    assert [(k, round(ms, 3)) for k, ms, _ in summary["kinds"]] == [("matmul", 0.12), ("attention", 0.03),
                                                                     ("other (elementwise fusions)", 0.01)]
    assert summary["top_kernels"][0][0] == "nvjet_tst_128x256_64x4_gemm" and summary["top_kernels"][0][3] == 2
    assert [name for name, *_ in summary["top_ops"]] == ["dot.1", "custom-call.2"]
    assert "PjitFunction(step)" not in gpu.format_trace(summary)
