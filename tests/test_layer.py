"""One residual layer, three paths: model.layer is what the unsharded forward, sharding.py's
shard_map program and decode.py's cached decoding all run. Patching it (here: GPT-J's parallel
attention + MLP, an ablation a fork might try) must change all three the same way."""
import types
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decode
import model
import sharding

CFG = model.Config(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32,
                   dtype="float32")
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 17)).astype(np.int32)


def parallel_layer(lp, x, cfg, rope, attend, gather=lambda h: h, scatter=lambda y: y):
    """x + attention(norm(x)) + mlp(norm'(x)): both blocks read the layer's input."""
    dtype = jnp.dtype(cfg.dtype)
    h_attn = gather(model.rms_norm(x, lp["attn_norm"], cfg.norm_eps))
    h_mlp = gather(model.rms_norm(x, lp["mlp_norm"], cfg.norm_eps))
    return x + scatter(model.self_attention(lp, h_attn, rope, attend, dtype)) + scatter(model.mlp(lp, h_mlp, dtype))


def three_paths(params):
    """(unsharded, sharded, cached) views of the same computation, each traced afresh so that a
    patched model.layer is what they run: the loss sum of the batch, and the logits of the last
    prompt position after a prefill and of one more token after a decode step."""
    inputs, targets = TOKENS[:, :-1], TOKENS[:, 1:]
    logits = model.forward(params, jnp.asarray(TOKENS), CFG)  # (B, T+1, V): every position
    unsharded = {"loss": model.cross_entropy(logits[:, :-1], targets)[0],
                 "prefill": logits[:, -2], "decode": logits[:, -1]}
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])  # fsdp and tensor (sequence) parallel
    sharded_loss = jax.jit(partial(sharding.loss_sum, cfg=CFG, mesh=mesh))(
        sharding.shard_params(params, CFG, mesh), {"tokens": jnp.asarray(TOKENS)})[0]
    tensor = sharding.make_mesh(1, 1, 2, devices=jax.devices()[:2])  # decoding's kv-head split
    forward = jax.jit(partial(decode.forward, cfg=CFG, mesh=tensor))
    B, T = inputs.shape
    cache = decode.new_cache(CFG, tensor, B, CFG.max_seq_len)
    lengths = np.full(B, T, np.int32)
    prefill, cache = forward(decode.reshard(params, CFG, tensor), inputs, lengths, cache, np.zeros(B, np.int32))
    step, _ = forward(decode.reshard(params, CFG, tensor), TOKENS[:, -1:], lengths + 1, cache, lengths)
    return unsharded, {"loss": sharded_loss}, {"prefill": prefill, "decode": step}


def test_a_patched_layer_changes_all_three_paths_alike(monkeypatch):
    params = model.init_params(CFG, jax.random.key(0))
    before = three_paths(params)
    monkeypatch.setattr(model, "layer", parallel_layer)
    after = three_paths(params)
    unsharded, sharded, cached = after
    np.testing.assert_allclose(sharded["loss"], unsharded["loss"], rtol=1e-5)
    for key in ("prefill", "decode"):
        np.testing.assert_allclose(cached[key], unsharded[key], rtol=1e-5, atol=1e-5)
    for path_before, path_after in zip(before, after):  # the patch reached every path
        for key in path_after:
            assert np.abs(np.asarray(path_after[key]) - np.asarray(path_before[key])).max() > 1e-3, key


def test_unpatched_paths_agree():
    unsharded, sharded, cached = three_paths(model.init_params(CFG, jax.random.key(1)))
    np.testing.assert_allclose(sharded["loss"], unsharded["loss"], rtol=1e-5)
    for key in ("prefill", "decode"):
        np.testing.assert_allclose(cached[key], unsharded[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["sharding", "decode"])
def test_a_path_with_its_own_layer_is_caught(monkeypatch, path):
    """Guard: were one path to keep a copy of the old layer, the agreement check above fails."""
    original = model.layer
    monkeypatch.setattr(model, "layer", parallel_layer)
    module = {"sharding": sharding, "decode": decode}[path]
    monkeypatch.setattr(module, "model", types.SimpleNamespace(**{**vars(model), "layer": original}))
    unsharded, sharded, cached = three_paths(model.init_params(CFG, jax.random.key(0)))
    got = sharded["loss"] if path == "sharding" else cached["prefill"]
    want = unsharded["loss"] if path == "sharding" else unsharded["prefill"]
    assert np.abs(np.asarray(got) - np.asarray(want)).max() > 1e-3
