"""One of the processes of tests/test_sharding.py's multi-process test (not a test itself).

    python tests/multiprocess_worker.py OUT.npz CKPT_DIR   # with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID

Joins the others through sharding.initialize_distributed (gloo collectives on CPU), supplies only
its own rows of the test batch, writes the loss and the gathered gradients (process 0 only), and
saves the params as checkpoint 1 in CKPT_DIR, each process writing only its own shards. Then both
restore them in decode.py's layout on another mesh, decode GEN_PROMPTS as one batch and score
rows of the test batch; process 0 writes both to OUT.npz.gen.json.
"""
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import decode  # noqa: E402
import sharding  # noqa: E402
from formats import checkpoint  # noqa: E402
from test_sharding import GEN_MESH, GEN_PROMPTS, GQA, MP_MESH, batch_for, for_generation  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
sharding.initialize_distributed()
assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())

mesh = sharding.make_mesh(*MP_MESH)
params = sharding.init_params_sharded(GQA, mesh, jax.random.key(0))
full = batch_for(GQA)
# the rows this process's devices hold, in order
index_map = sharding.batch_sharding(mesh).addressable_devices_indices_map(full["tokens"].shape)
rows = sorted({r for idx in index_map.values() for r in range(*idx[0].indices(full["tokens"].shape[0]))})
batch = sharding.global_batch({k: v[rows] for k, v in full.items()}, mesh)
(loss, count), grads = jax.jit(lambda p, b: sharding.loss_sum_and_grad(p, b, GQA, mesh))(params, batch)
grads = multihost_utils.process_allgather(grads, tiled=True)
if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(p): np.asarray(g) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    np.savez(sys.argv[1], loss=float(loss), count=float(count), **flat)
checkpoint.save(sys.argv[2], 1, {"params": params}, {"process": jax.process_index()}, {}, keep=1)

mesh = sharding.make_mesh(*GEN_MESH)
served = checkpoint.restore(checkpoint.step_dir(sys.argv[2], 1), {"params": decode.param_structs(GQA, mesh)})[0]
outs = decode.generate(for_generation(served["params"]), GQA, mesh, GEN_PROMPTS, 6)
rows = np.array(batch_for(GQA)["tokens"][:4], np.int32)  # scored as harness.py does, on every process
logprobs, _ = decode.score(served["params"], rows[:, :-1], rows[:, 1:], GQA, mesh)
if jax.process_index() == 0:
    with open(sys.argv[1] + ".gen.json", "w") as f:
        json.dump({"generated": outs, "logprobs": np.asarray(logprobs).tolist()}, f)
