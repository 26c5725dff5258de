"""sharding.py against the single-device model.py: loss, every gradient and an Adam step on each
mesh layout, multi-process runs, real sharding of the params, and clear errors (CPU, 8 devices)."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import config
import decode
import model
import sharding

# 8 heads on 8 kv heads so every head count divides a tensor axis of 8; and grouped-query (8 on 2)
MHA = model.Config(vocab_size=64, dim=32, n_layers=2, n_heads=8, n_kv_heads=8, ffn_dim=48,
                   max_seq_len=32, dtype="float32")
GQA = model.Config(vocab_size=64, dim=32, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=48,
                   max_seq_len=32, dtype="float32")
MESHES = [(1, 1, 8), (1, 8, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2), (2, 4, 1)]
MP_MESH = (2, 2, 2)
GEN_MESH = (1, 2, 4)  # rows over fsdp, kv heads replicated over pairs of chips, across the two processes
GEN_PROMPTS = [[1, 5, 9, 33], [1], [1, 60, 2, 7, 7, 41, 12]]


def for_generation(params):
    """Output scaled so greedy decoding never meets a near-tie."""
    return {**params, "output": params["output"] * 30}
ROWS, T = 8, 16
RTOL = 1e-5


def batch_for(cfg, weights=False, segments=False):
    """A deterministic batch: tokens (ROWS, T+1); optionally a 0/1 loss mask and packed documents."""
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, cfg.vocab_size, (ROWS, T + 1)).astype(np.int32)}
    if weights:
        batch["weights"] = (rng.random((ROWS, T)) < 0.7).astype(np.float32)
    if segments:  # each row: documents starting at random positions
        batch["segment_ids"] = np.cumsum(rng.random((ROWS, T + 1)) < 0.2, axis=1).astype(np.int32)
    return batch


def reference(params, batch, cfg):
    """(loss_sum, weight_sum) and d loss_sum / d params on one device, from model.py alone."""
    def f(p):
        seg = batch.get("segment_ids")
        logits = model.forward(p, batch["tokens"][:, :-1], cfg, None if seg is None else seg[:, :-1])
        return model.cross_entropy(logits, batch["tokens"][:, 1:], batch.get("weights"))
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)


def assert_trees_close(actual, expected):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.abs(b).max(), err_msg=jax.tree_util.keystr(path))


def sharded_run(params, batch, cfg, shape):
    mesh = sharding.make_mesh(*shape)
    p = sharding.shard_params(params, cfg, mesh)
    b = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
    return mesh, p, jax.jit(partial(sharding.loss_sum_and_grad, cfg=cfg, mesh=mesh))(p, b)


def adam_step(params, grads):
    """Global-norm clipping (a reduction across all shards) and Adam, as train.py does."""
    tx = optax.chain(optax.clip_by_global_norm(1e-3), optax.adam(1e-2))
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_matches_single_device(shape):
    cfg = MHA if shape[2] > 2 else GQA
    params, batch = model.init_params(cfg, jax.random.key(0)), batch_for(cfg)
    (ref_loss, ref_count), ref_grads = reference(params, batch, cfg)
    mesh, p, ((loss, count), grads) = sharded_run(params, batch, cfg, shape)
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    assert count == ref_count == ROWS * T
    assert_trees_close(grads, ref_grads)
    for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(sharding.param_shardings(cfg, mesh))):
        assert g.sharding.is_equivalent_to(s, g.ndim)
    # an Adam step on the sharded arrays (outside shard_map) == the same step on whole arrays
    new = jax.jit(adam_step)(p, grads)
    assert_trees_close(new, adam_step(params, jax.tree.map(np.asarray, grads)))
    for x, s in zip(jax.tree.leaves(new), jax.tree.leaves(sharding.param_shardings(cfg, mesh))):
        assert x.sharding.is_equivalent_to(s, x.ndim)


def test_loss_weights_and_segments():
    params, batch = model.init_params(GQA, jax.random.key(0)), batch_for(GQA, weights=True, segments=True)
    (ref_loss, ref_count), ref_grads = reference(params, batch, GQA)
    assert ref_count < ROWS * T and len(np.unique(batch["segment_ids"])) > 2  # the test has teeth
    _, _, ((loss, count), grads) = sharded_run(params, batch, GQA, (2, 2, 2))
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    np.testing.assert_allclose(count, ref_count)
    assert_trees_close(grads, ref_grads)


def test_mean_loss_and_grad_match_loss_fn():
    params, tokens = model.init_params(GQA, jax.random.key(0)), batch_for(GQA)["tokens"]
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(model.loss_fn), static_argnums=2)(params, tokens, GQA)
    mesh = sharding.make_mesh(1, 4, 2)
    loss, grads = jax.jit(partial(sharding.loss_and_grad, cfg=GQA, mesh=mesh))(sharding.shard_params(params, GQA, mesh), tokens)
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    assert_trees_close(grads, ref_grads)


def test_dropped_collective_is_caught(monkeypatch):
    """Guard for the tests above: a reduce-scatter that forgets to sum (keeps its own slice) must
    make the sharded loss differ from the reference."""
    def scatter_without_sum(x, axis_name, scatter_dimension, tiled):
        n = x.shape[scatter_dimension] // jax.lax.axis_size(axis_name)
        return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis_name) * n, n, scatter_dimension)
    monkeypatch.setattr(jax.lax, "psum_scatter", scatter_without_sum)
    params, batch = model.init_params(GQA, jax.random.key(0)), batch_for(GQA)
    (ref_loss, _), _ = reference(params, batch, GQA)
    mesh = sharding.make_mesh(1, 4, 2)
    loss, _ = jax.jit(partial(sharding.loss_sum, cfg=GQA, mesh=mesh))(sharding.shard_params(params, GQA, mesh), batch)
    assert abs(float(loss) - float(ref_loss)) > 100 * RTOL * abs(float(ref_loss))


def test_params_are_created_sharded():
    cfg, mesh = GQA, sharding.make_mesh(1, 4, 2)
    params = sharding.init_params_sharded(cfg, mesh, jax.random.key(0))
    assert_trees_close(params, model.init_params(cfg, jax.random.key(0)))  # same values as unsharded
    specs = sharding.param_specs(cfg)
    for (path, x), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(
            specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))):
        assert x.sharding.spec == spec
        per_device = {s.data.nbytes for s in x.addressable_shards}
        split = 8 if ("fsdp" in spec and "tensor" in spec) else 1  # the matrices: fsdp 4 x tensor 2
        assert per_device == {x.nbytes // split}, jax.tree_util.keystr(path)


def test_every_param_needs_a_spec(monkeypatch):
    shapes = model.param_shapes
    monkeypatch.setattr(model, "param_shapes", lambda cfg: {**shapes(cfg), "bias": (cfg.dim,)})
    with pytest.raises(ValueError, match="without a PartitionSpec.*bias"):
        sharding.param_specs(GQA)


def test_mesh_must_match_device_count():
    with pytest.raises(ValueError, match=r"needs 12 devices, this run has 8"):
        config.check_mesh((2, 2, 3), 8)
    with pytest.raises(ValueError, match=r"--mesh=1,x,2: must be three positive sizes"):
        config.parse_mesh("1,x,2", 8)
    assert config.parse_mesh("1,1,2", 8, all_devices=False) == (1, 1, 2)


@pytest.mark.parametrize("field, value, mesh, rows, message", [
    ("n_heads", 12, (1, 1, 8), 8, "n_heads=12 .* tensor"),
    ("n_kv_heads", 2, (1, 1, 8), 8, "n_kv_heads=2 .* tensor"),
    ("ffn_dim", 44, (1, 1, 8), 8, "ffn_dim=44 .* tensor"),
    ("vocab_size", 100, (1, 1, 8), 8, "vocab_size=100 .* tensor"),
    ("dim", 36, (1, 8, 1), 8, "dim=36 .* fsdp"),
    ("dim", 32, (2, 2, 2), 6, "batch rows per microbatch=6 .* data x fsdp"),
])
def test_indivisible_sizes_are_named(field, value, mesh, rows, message):
    cfg = dataclasses.replace(MHA, **{field: value})
    with pytest.raises(ValueError, match=message):
        sharding.check_divisible(cfg, sharding.make_mesh(*mesh).shape, rows)


def test_sequence_must_divide_by_tensor():
    with pytest.raises(ValueError, match="seq_len=12 .* tensor"):
        sharding.check_divisible(MHA, sharding.make_mesh(1, 1, 8).shape, 8, seq_len=12)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    """2 processes x 4 devices (gloo collectives on localhost) == 1 process x 8 devices, and
    their checkpoint (each process writing its own shards) restores in 1 process on another mesh."""
    from conftest import HANG  # not at the top: the worker imports this module, and conftest forces 8 devices
    worker = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
    port, out = free_port(), tmp_path / "grads.npz"
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen([sys.executable, worker, str(out), str(tmp_path / "ckpt")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=HANG)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n\n".join(logs)[-5000:]

    params, batch = model.init_params(GQA, jax.random.key(0)), batch_for(GQA)
    _, _, ((loss, count), grads) = sharded_run(params, batch, GQA, MP_MESH)
    got = np.load(out)
    np.testing.assert_allclose(got["loss"], loss, rtol=RTOL)
    assert got["count"] == count
    flat = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert set(flat) == set(got.files) - {"loss", "count"}
    assert_trees_close({k: got[k] for k in flat}, flat)

    from formats import checkpoint
    saved = checkpoint.step_dir(str(tmp_path / "ckpt"), 1)
    assert sorted(f for f in os.listdir(saved) if f.startswith("shards")) == [
        "shards.p00000.safetensors", "shards.p00001.safetensors"]
    mesh = sharding.make_mesh(1, 4, 2)  # not MP_MESH, and one process
    restored, reader = checkpoint.restore(saved, {"params": sharding.param_structs(GQA, mesh)})
    assert reader.data_states() == [{"process": 0}, {"process": 1}]
    for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(params)):  # init jitted there, not here:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)  # equal up to an ulp
    with open(str(out) + ".gen.json") as f:  # decoded and scored across the two processes
        served = json.load(f)
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    assert served["generated"] == decode.generate(decode.reshard(for_generation(restored["params"]), GQA, one), GQA,
                                                  one, GEN_PROMPTS, 6)
    rows = batch_for(GQA)["tokens"][:4]
    logits = model.forward(restored["params"], jnp.asarray(rows[:, :-1]), GQA)
    expected = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), rows[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(served["logprobs"], expected, atol=1e-4)
