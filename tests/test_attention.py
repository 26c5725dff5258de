"""The fused attention of kernels/ against attention.py's reference (the plain masked softmax):
FlashAttention in jnp and the splash kernel (in Pallas interpret mode on the CPU), alone and inside
the sharded program; cuDNN traced inside it; and which kernel each platform gets."""
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
import model
import sharding

B, T, N, K, H = 2, 384, 4, 2, 32  # grouped-query heads (2 per kv head), 3 blocks of 128 rows


def qkv_and_segments():
    q, k, v = (jax.random.normal(jax.random.key(i), (B, T, N if i == 0 else K, H)) for i in range(3))
    segment_ids = jnp.cumsum(jax.random.bernoulli(jax.random.key(3), 0.01, (B, T)), axis=1).astype(jnp.int32)
    return q, k, v, segment_ids


@pytest.mark.parametrize("block", [4, 5, 16])
def test_flash_matches_the_reference_values_and_gradients(block):
    """flash_attention (query blocks, skipped masked tiles, its own backward pass) against the
    reference differentiated by JAX: values and grads, grouped-query heads (4 on 2) and packed
    documents."""
    T = 16
    q, k, v = (jax.random.normal(jax.random.key(i), (2, T, 4 if i == 0 else 2, 8)) for i in range(3))
    segment_ids = jnp.cumsum(jax.random.bernoulli(jax.random.key(3), 0.2, (2, T)), axis=1)
    ours = lambda q, k, v: jnp.sum(jnp.sin(attention.flash_attention(q, k, v, segment_ids, block)))
    plain = lambda q, k, v: jnp.sum(jnp.sin(attention.causal_attention(q, k, v, segment_ids)))
    for a, b in zip(*(jax.tree.leaves(jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v))
                      for f in (ours, plain))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("segments", [False, True], ids=["causal", "documents"])
def test_splash_matches_the_reference_values_and_gradients(segments):
    q, k, v, segment_ids = qkv_and_segments()
    segment_ids = segment_ids if segments else None
    assert segment_ids is None or 2 < len(np.unique(segment_ids)) < T // 10  # documents across block edges
    results = []
    for attend in (partial(attention.splash_attention, interpret=True), attention.causal_attention):
        f = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, segment_ids)) * jnp.arange(H))  # every output counts
        results.append(jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v))
    (splash_value, splash_grads), (value, grads) = results
    np.testing.assert_allclose(splash_value, value, rtol=1e-5)
    for a, b in zip(splash_grads, grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_sharded_splash_equals_unsharded_jnp():
    """The shard_map program with attention="splash" on fsdp 2 x tensor 2 (each device its own rows
    and heads), against model.py's unsharded jnp path: loss and every gradient."""
    cfg = model.Config(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=256,
                       dtype="float32")
    params = model.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 64, (4, 257)).astype(np.int32),
             "segment_ids": np.cumsum(rng.random((4, 257)) < 0.02, axis=1).astype(np.int32)}

    def reference(p):
        logits = model.forward(p, batch["tokens"][:, :-1], cfg, batch["segment_ids"][:, :-1])
        return model.cross_entropy(logits, batch["tokens"][:, 1:])

    (loss, _), grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
    splash = dataclasses.replace(cfg, attention="splash")
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    (sharded_loss, _), sharded_grads = jax.jit(partial(sharding.loss_sum_and_grad, cfg=splash, mesh=mesh))(
        sharding.shard_params(params, splash, mesh), batch)
    np.testing.assert_allclose(sharded_loss, loss, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(sharded_grads)[0], jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("choice, platform, segments, expected", [
    ("auto", "tpu", True, "splash"), ("auto", "cpu", False, "jnp"), ("auto", "gpu", True, "jnp"),
    ("jnp", "tpu", False, "jnp"), ("splash", "cpu", True, "splash"), ("cudnn", "gpu", False, "cudnn"),
    ("cudnn", "cpu", False, "needs NVIDIA GPUs"), ("cudnn", "gpu", True, "takes no segment ids"),
    ("splash", "gpu", False, "is a TPU kernel"), ("flash", "cpu", False, "must be one of"),
])
def test_each_platform_gets_the_kernel_it_can_run(choice, platform, segments, expected):
    if expected in attention.IMPLEMENTATIONS:
        assert attention.resolve(choice, platform, segments) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            attention.resolve(choice, platform, segments)


def test_cudnn_composes_with_the_sharded_step(monkeypatch):
    """attention="cudnn" inside the shard_map program (fsdp 2 x tensor 2, remat, gradients) traces
    to cuDNN's own forward and backward kernels. Only traced: the CPU cannot run cuDNN, so JAX's
    cuDNN detection is faked (a private module: skipped when it moves); bench/gpu.py runs it."""
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    if not all(hasattr(fused, f) for f in ("check_cudnn_version", "check_compute_capability",
                                           "is_cuda_compute_capability_equal")):
        pytest.skip("this jax detects cuDNN differently")
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)  # a Hopper GPU with cuDNN 9.10
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(fused, "is_cuda_compute_capability_equal", lambda capability: False)
    causal = model.causal
    monkeypatch.setattr(model, "causal", lambda cfg, platform, segment_ids=None: causal(cfg, "gpu", segment_ids))
    cfg = model.Config(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=128,
                       attention="cudnn")
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    params = sharding.param_structs(cfg, mesh)
    tokens = jax.ShapeDtypeStruct((4, 129), jnp.int32)
    traced = jax.jit(partial(sharding.loss_and_grad, cfg=cfg, mesh=mesh)).trace(params, tokens)
    text = str(traced.jaxpr)
    assert "dot_product_attention_fwd" in text and "dot_product_attention_bwd" in text
