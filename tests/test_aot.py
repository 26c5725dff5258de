"""aot.py: the slice table, the MFU formula, and real TPU compiles from this CPU (needs libtpu,
i.e. `pip install jax[tpu]`; skipped without it). The 70B compile takes about a minute."""
import math

import pytest

import aot
import config
import model


def tpu_available():
    try:
        return len(aot.topology_devices(aot.slice_spec("v4-8"))) == 4
    except Exception:  # no libtpu: jax cannot describe TPU chips
        return False


needs_tpu = pytest.mark.skipif(not tpu_available(), reason="libtpu (jax[tpu]) cannot describe TPU topologies here")


def test_slice_table():
    v4 = aot.slice_spec("v4-512")
    assert (v4["topology"], v4["chips"], v4["wrap"], v4["hbm_gib"]) == ("v4:4x8x8", 256, (True, True, True), 32.0)
    assert aot.slice_spec("v4-8")["topology"] == "v4:2x2x1" and aot.slice_spec("v4-8")["wrap"] == (False,) * 3
    assert aot.slice_spec("v5e-256")["topology"] == "v5e:16x16" and aot.slice_spec("v5e-256")["chips"] == 256
    assert aot.slice_spec("v5p-128")["topology"] == "v5p:4x4x4"
    with pytest.raises(ValueError, match="unknown TPU slice 'v4-500'.*v4-512"):
        aot.slice_spec("v4-500")
    with pytest.raises(ValueError, match="unknown TPU slice 'v9-8'"):
        aot.slice_spec("v9-8")


def test_mfu_formula_by_hand():
    """Pure FSDP on 256 v4 chips, one microbatch: the formula written out for Llama-2-70B."""
    tcfg = config.TrainConfig(model="llama2_70b", batch_size=1024, seq_len=4096, microbatches=1, mesh=(1, 256, 1))
    cfg = model.LLAMA2_70B
    n = 68_976_648_192 - 32000 * 8192  # matmul params
    n_layers = n - 32000 * 8192 - 8192
    tokens = 1024 * 4096
    model_flops = tokens * (6 * n + 6 * 80 * 4096 * 8192)
    compute = (model_flops + tokens * (2 * n_layers + 2 * 80 * 4096 * 8192)) / (256 * 275e12)
    comms = 3 * 2 * n / 9e10  # fsdp only: gather, gather again, reduce-scatter
    expected = model_flops / (256 * 275e12) / max(compute, comms)
    assert math.isclose(aot.mfu_estimate(tcfg, cfg, aot.slice_spec("v4-512")), expected, rel_tol=1e-9)
    assert 0.7 < expected < 0.76  # compute-bound: full remat costs about a quarter


@needs_tpu
def test_lemur70b_fits_v4_512():
    tcfg = config.load("configs/lemur70b.py", ["--mesh=1,32,8", "--microbatches=4"])
    result = aot.compile_train_step(tcfg, "v4-512")
    assert result["fits"] and result["hbm_per_chip_gib"] <= 30.0, result
    assert result["chips"] == 256 and result["microbatches"] == 4


@needs_tpu
def test_oversized_batch_reports_not_fits(capsys):
    """All 1024 sequences in one microbatch: over the chip's HBM, reported, no crash."""
    result = aot.compile_train_step(config.load("configs/lemur70b.py", ["--mesh=1,32,8", "--microbatches=1"]), "v4-512")
    assert result["fits"] is False and "RESOURCE_EXHAUSTED" in result["error"]
    assert "does not fit" in capsys.readouterr().out
