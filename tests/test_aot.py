"""aot.py: the slice table, the MFU estimate, and real TPU compiles from this CPU (needs libtpu,
i.e. `pip install jax[tpu]`; skipped without it). The 70B compile takes about a minute."""

import pytest

import config
import model
from tools import aot


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


def test_model_flops_per_token_is_palms_formula():
    """6 FLOPs per matmul weight and token plus causal attention (PaLM, appendix B: 6 N + 12 L T D
    for full attention, half of the attention term for causal), from Llama-2-70B's published
    parameter count less its embedding (a lookup): 428.4 GFLOP per token at T = 4096."""
    n_matmul = 68_976_648_192 - 32000 * 8192
    assert model.flops_per_token(model.LLAMA2_70B, 4096) == 6 * n_matmul + 6 * 80 * 4096 * 8192 == 428_393_152_512


def mfu(**overrides):
    fields = dict(model="llama2_70b", batch_size=1024, seq_len=4096, microbatches=1, mesh=(1, 256, 1))
    return aot.mfu_estimate(config.TrainConfig(**{**fields, **overrides}), model.LLAMA2_70B, aot.slice_spec("v4-512"))


def test_mfu_estimate_in_its_limits():
    """The estimate where it can be worked out by hand: Llama-2-70B on 256 v4 chips."""
    # compute-bound (a huge batch hides every collective): full remat runs the layers' forward pass
    # twice, 8 FLOPs per weight where the model counts 6, so MFU is just above 3/4 (the output
    # layer and the attention term are not recomputed)
    assert 0.75 < mfu(batch_size=1 << 20) < 0.752
    # communication-bound, pure FSDP, 16 rows: each step moves the bf16 weights 3 times (gather,
    # gather again for the backward pass, reduce-scatter the gradients) over one 90 GB/s ICI axis:
    # 3 x 2 B x 68.71e9 / 9e10 = 4.58 s, while the model FLOPs of 16 x 4096 tokens x 428.4e9 take
    # 2.808e16 / (256 x 275e12) = 0.399 s at peak: MFU 0.0871
    assert abs(mfu(batch_size=16) - 0.0871) < 1e-4
    assert abs(mfu(batch_size=32) - 2 * 0.0871) < 2e-4  # twice the tokens for the same traffic
    assert abs(mfu(batch_size=32, microbatches=2) - 0.0871) < 1e-4  # gathered again per microbatch
    # tensor parallelism adds its activation collectives: at 16 rows on fsdp 32 x tensor 8 the
    # weights move over fsdp only once per 8 chips, so the step is faster but not compute-bound
    assert 0.0871 < mfu(batch_size=16, mesh=(1, 32, 8)) < 0.75


@needs_tpu
def test_lemur70b_fits_v4_512_with_the_splash_kernel():
    """The paper's run as configured: attention "auto" compiles the Pallas splash kernels (found in
    the compiled TPU program, forward and both backward passes) and the step fits a v4 chip."""
    tcfg = config.load("configs/lemur70b.py", ["--mesh=1,32,8", "--microbatches=4"])
    result = aot.compile_train_step(tcfg, "v4-512")
    assert result["fits"] and result["hbm_per_chip_gib"] <= 30.0, result
    assert result["chips"] == 256 and result["microbatches"] == 4
    assert result["attention"] == "splash" and {k.split("_no_")[0].split("_residuals")[0]
                                                for k in result["attention_kernels"]} == {
        "splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"}, result


@needs_tpu
def test_oversized_batch_reports_not_fits(capsys):
    """All 1024 sequences in one microbatch: over the chip's HBM, reported, no crash."""
    result = aot.compile_train_step(config.load("configs/lemur70b.py", ["--mesh=1,32,8", "--microbatches=1"]), "v4-512")
    assert result["fits"] is False and "RESOURCE_EXHAUSTED" in result["error"]
    assert "does not fit" in capsys.readouterr().out


@needs_tpu
def test_the_servers_steps_fit_a_v4_16():
    """decode.Engine's two steps (the OpenAI server's, and generate's) for Llama-2-70B with 8 slots
    of 4096 positions: a prefill chunk of 512 tokens into one slot, a decode step of all 8."""
    result = aot.compile_generate("v4-16")
    assert result["fits"] and result["prefill"]["hbm_per_chip_gib"] < 20 and result["decode"]["hbm_per_chip_gib"] < 20
    assert (result["batch"], result["context"], result["chips"]) == (8, 4096, 8)
