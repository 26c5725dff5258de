"""The device mesh, every PartitionSpec and every collective of training.

    mesh = make_mesh(1, 32, 8)                    # 256 v4 chips: FSDP 32 x tensor 8
    params = init_params_sharded(cfg, mesh, key)  # created sharded: nothing whole anywhere
    (loss_sum, weight_sum), grads = loss_sum_and_grad(params, batch, cfg, mesh)

Mesh axes and what they split (notation of the scaling book: X[B_(data,fsdp), T_tensor, D] is
split over data and fsdp jointly on B, over tensor on T, and whole on D):
- data: plain data parallelism. Params are replicated, the batch rows are split.
- fsdp: params are split (ZeRO-3) and so are the batch rows (FSDP devices are data parallel
  too). Each weight is cast to bf16 and all-gathered just before use, inside the remat'ed layer,
  so the backward pass gathers it again instead of keeping it alive; its gradient comes back
  reduce-scattered (the transpose of all-gather, derived by autodiff).
- tensor: Megatron tensor parallelism. wq/wk/wv/w_gate/w_up are split on their output (heads,
  kv heads, F), wo/w_down on their input, embedding and output layer on the vocabulary, and the
  cross-entropy never sees full-vocabulary logits. Between the blocks the residual stream is
  split over the sequence too (sequence parallelism): x[B, T_tensor, D] is all-gathered over T
  before attention and the MLP and their partial sums are reduce-scattered back (the same bytes
  as one psum), so the activations saved per layer shrink by the tensor size as well.

The per-device program is model.py's own math under `jax.shard_map` with check_vma on, so autodiff
knows which values are replicated and transposes every collective correctly: each layer is
model.layer on this device's gathered weights (its blocks read head counts from the weights), with
the sequence-parallel collectives passed in as its gather and scatter. Only the optimizer update
runs outside, in train.py.
"""
import glob
import importlib.util
import math
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import model

BATCH = ("data", "fsdp")  # the mesh axes that split the batch rows
# peak dense bf16 FLOP/s per device, by jax's device_kind (the loop's MFU, tools/aot.py's estimate);
# a kind not listed (e.g. a CPU) has no MFU
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA H100 80GB HBM3": 989e12,
              "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12}


# ----------------------------------------------------------------------------- processes and mesh

def _tpu_chips_attached() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def select_platforms():
    """Call first, before anything touches a device. On a machine without TPU chips, keep JAX from
    starting libtpu (installed with jax[tpu] for ahead-of-time compiles, it prints errors while it
    looks for chips): use NVIDIA GPUs when there are some and JAX's CUDA plugin is installed, else
    the CPU. A machine with TPU chips is left alone: it uses them or fails loudly, never falls back
    to the CPU unnoticed. JAX_PLATFORMS, when set, decides instead."""
    if os.environ.get("JAX_PLATFORMS") or _tpu_chips_attached():
        return
    cuda = glob.glob("/dev/nvidia[0-9]*") and any(importlib.util.find_spec(p) for p in
                                                   ("jax_cuda13_plugin", "jax_cuda12_plugin"))
    jax.config.update("jax_platforms", "cuda,cpu" if cuda else "cpu")


def initialize_distributed():
    """Connect the processes of a multi-host run; does nothing for a single process.

    Explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID. On a TPU VM
    (one or many hosts), under SLURM (srun, several tasks) or Open MPI (mpirun, several ranks), JAX
    finds the coordinator and this process's id in the launcher's environment itself."""
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env["JAX_PROCESS_ID"]))
    elif (_tpu_chips_attached() or int(env.get("SLURM_NTASKS", 1)) > 1
          or int(env.get("OMPI_COMM_WORLD_SIZE", 1)) > 1):
        jax.distributed.initialize()


def make_mesh(data: int, fsdp: int, tensor: int, devices=None) -> Mesh:
    """Mesh (data, fsdp, tensor) over `devices` (default: all devices of all processes). On TPU
    the order follows the physical torus, so the tensor axis (the most traffic) gets a ring of
    neighbouring chips."""
    devices = jax.devices() if devices is None else list(devices)
    assert data * fsdp * tensor == len(devices), "config.check_mesh refuses this"
    grid = mesh_utils.create_device_mesh((data, fsdp, tensor), devices, allow_split_physical_axes=True)
    return Mesh(grid, ("data", "fsdp", "tensor"))


def check_divisible(cfg: model.Config, mesh_shape: dict, batch_rows: int, seq_len: int | None = None):
    """Raise naming the dimension and the mesh axis when a split would not be even (config.validate
    calls it; shard_map itself refuses an uneven split, less clearly). mesh_shape:
    {axis: size} (a Mesh's .shape); batch_rows: rows per microbatch; seq_len: tokens per row fed to
    the model (split over tensor)."""
    splits = [("batch rows per microbatch", batch_rows, BATCH), ("dim", cfg.dim, ("fsdp",)),
              ("n_heads", cfg.n_heads, ("tensor",)), ("n_kv_heads", cfg.n_kv_heads, ("tensor",)),
              ("ffn_dim", cfg.ffn_dim, ("tensor",)), ("vocab_size", cfg.vocab_size, ("tensor",))]
    if seq_len is not None:
        splits.append(("seq_len", seq_len, ("tensor",)))
    for name, size, axes in splits:
        ways = math.prod(mesh_shape[a] for a in axes)
        if size % ways:
            raise ValueError(f"{name}={size} does not divide by mesh axis {' x '.join(axes)} "
                             f"(size {ways}) that splits it")


# ----------------------------------------------------------------------------- param layout

def param_specs(cfg: model.Config) -> dict:
    """PartitionSpec of every param, in the params' tree structure (checked: no param without one).
    The leading L axis of layer weights is never split: the layer scan walks it on every device."""
    specs = {
        "embed": P("tensor", "fsdp"),  # E[V_tensor, D_fsdp]
        "layers": {
            "attn_norm": P(None, None),  # [L, D], replicated (tiny)
            "wq": P(None, "fsdp", "tensor", None),  # [L, D_fsdp, N_tensor, H] column-parallel
            "wk": P(None, "fsdp", "tensor", None),  # [L, D_fsdp, K_tensor, H]
            "wv": P(None, "fsdp", "tensor", None),  # [L, D_fsdp, K_tensor, H]
            "wo": P(None, "tensor", None, "fsdp"),  # [L, N_tensor, H, D_fsdp] row-parallel
            "mlp_norm": P(None, None),  # [L, D]
            "w_gate": P(None, "fsdp", "tensor"),  # [L, D_fsdp, F_tensor] column-parallel
            "w_up": P(None, "fsdp", "tensor"),  # [L, D_fsdp, F_tensor]
            "w_down": P(None, "tensor", "fsdp"),  # [L, F_tensor, D_fsdp] row-parallel
        },
        "norm": P(None),  # [D]
        "output": P("fsdp", "tensor"),  # W[D_fsdp, V_tensor]
    }
    is_shape = lambda s: isinstance(s, tuple) and not isinstance(s, P)
    shapes = dict(jax.tree_util.tree_flatten_with_path(model.param_shapes(cfg), is_leaf=is_shape)[0])
    flat = dict(jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, P))[0])
    name = jax.tree_util.keystr
    if shapes.keys() != flat.keys():
        raise ValueError(f"params without a PartitionSpec: {sorted(map(name, shapes.keys() - flat.keys()))}; "
                         f"specs without a param: {sorted(map(name, flat.keys() - shapes.keys()))}")
    for path, shape in shapes.items():
        if len(flat[path]) != len(shape):
            raise ValueError(f"PartitionSpec {flat[path]} of {name(path)} does not match its shape {shape}")
    return specs


def _tree_map_specs(fn, specs):
    return jax.tree.map(fn, specs, is_leaf=lambda s: isinstance(s, P))


def param_shardings(cfg: model.Config, mesh: Mesh) -> dict:
    return _tree_map_specs(lambda s: NamedSharding(mesh, s), param_specs(cfg))


def param_structs(cfg: model.Config, mesh: Mesh) -> dict:
    """jax.ShapeDtypeStruct of every param (fp32) with its sharding: the target of a restore or a
    sharded load, and the arguments of an ahead-of-time compile. Nothing is allocated."""
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, param_shardings(cfg, mesh))


def shard_params(params, cfg: model.Config, mesh: Mesh):
    return jax.device_put(params, param_shardings(cfg, mesh))


def init_params_sharded(cfg: model.Config, mesh: Mesh, key):
    """model.init_params with each device computing only its own shards (70B never whole)."""
    return jax.jit(partial(model.init_params, cfg), out_shardings=param_shardings(cfg, mesh))(key)


# ----------------------------------------------------------------------------- batches

def batch_sharding(mesh: Mesh, microbatched: bool = False) -> NamedSharding:
    """Rows split over (data, fsdp): tokens[B_(data,fsdp), T+1], or with a leading microbatch
    axis tokens[M, B_(data,fsdp), T+1]."""
    return NamedSharding(mesh, P(None, BATCH) if microbatched else P(BATCH))


def global_batch(local: dict, mesh: Mesh, microbatches: int | None = None) -> dict:
    """Global arrays from this process's rows {name: array (rows, ...)}: each process supplies only
    the rows its own devices hold. With `microbatches` = M, the rows are first split into M
    sequential microbatches, (M, rows / M, ...): the layout train steps scan over."""
    if microbatches is not None:
        local = {k: np.asarray(v).reshape(microbatches, -1, *np.shape(v)[1:]) for k, v in local.items()}
    sharding = batch_sharding(mesh, microbatched=microbatches is not None)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


# ----------------------------------------------------------------------------- per-device program

# Tiled all-gather and reduce-scatter along one array axis. Over a mesh axis of size 1 both are
# the identity, but XLA CPU still runs them as copies: skipped (BENCHMARKS.md, "The CPU-only tricks").

def _all_gather(x, axis_name, axis):
    return x if jax.lax.axis_size(axis_name) == 1 else jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)


def _psum_scatter(x, axis_name, axis):
    if jax.lax.axis_size(axis_name) == 1:
        return x
    return jax.lax.psum_scatter(x, axis_name, scatter_dimension=axis, tiled=True)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _all_gather_fsdp(w, axis, dtype):
    # W[.., D_fsdp, ..] -> cast to bf16 (half the bytes), all-gather over fsdp -> W[.., D, ..]
    return _all_gather(w.astype(dtype), "fsdp", axis)


def _all_gather_fsdp_bwd(axis, dtype, _, grad):
    # dW[.., D, ..] -> reduce-scatter over fsdp, in fp32 -> dW[.., D_fsdp, ..]. Autodiff would
    # reduce in bf16 (the transpose of the cast comes after); fp32 keeps the sum of many devices'
    # partial gradients exact to fp32 and gives XLA's loop code motion the pattern it expects.
    return (_psum_scatter(grad.astype(jnp.float32), "fsdp", axis),)


_all_gather_fsdp.defvjp(lambda w, axis, dtype: (_all_gather_fsdp(w, axis, dtype), None), _all_gather_fsdp_bwd)


def _gather(w, spec, dtype):
    """One weight shard -> the weight this device computes with. spec: its PartitionSpec."""
    # W is replicated over data; marking it data-varying here puts autodiff's gradient all-reduce
    # over data (the transpose of this cast) on this fp32 shard rather than on the gathered weight
    w = jax.lax.pcast(w, "data", to="varying")
    if "fsdp" not in spec:
        return w  # norm scales: whole already, and model.py reads them in fp32
    return _all_gather_fsdp(w, spec.index("fsdp"), dtype)


def embed_rows(table, tokens):
    """Vocab-parallel lookup: E[V_tensor, D], tokens[B, T] -> rows[B, T, D], the rows of the
    tokens this shard owns and zeros elsewhere (one shard holds each row: a sum over tensor gives x)."""
    V = table.shape[0]
    local = tokens - jax.lax.axis_index("tensor") * V
    owned = (local >= 0) & (local < V)
    return jnp.where(owned[..., None], table[jnp.clip(local, 0, V - 1)], 0)


def _embed(table, tokens):
    """E[V_tensor, D], tokens[B, T] -> x[B, T_tensor, D]."""
    # rows[B, T, D] {one shard holds each row} -> reduce-scatter over tensor along T -> x[B, T_tensor, D]
    return _psum_scatter(embed_rows(table, tokens), "tensor", 1)


def target_logprobs(logits, targets):
    """Vocab-parallel log-softmax at the targets: logits[B, T, V_tensor] fp32, targets[B, T] ->
    (log p(target) [B, T], whether the target is the argmax [B, T]). No device ever holds
    full-vocabulary logits."""
    V = logits.shape[-1]
    # max over V_tensor -> all-reduce max over tensor -> max over V (a shift: no gradient needed)
    m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), "tensor")
    # sum over V_tensor of exp -> all-reduce sum over tensor -> sum over V
    logz = m + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1), "tensor"))
    local = targets - jax.lax.axis_index("tensor") * V
    owned = (local >= 0) & (local < V)
    picked = jnp.take_along_axis(logits, jnp.clip(local, 0, V - 1)[..., None], axis=-1)[..., 0]
    # the target logit, held by one shard -> all-reduce sum over tensor -> on every shard
    target_logit = jax.lax.psum(jnp.where(owned, picked, 0.0), "tensor")
    return target_logit - logz, target_logit >= m


def _cross_entropy(logits, targets, weights):
    """Vocab-parallel model.cross_entropy: weighted loss sum over this device's rows."""
    return jnp.sum(-target_logprobs(logits, targets)[0] * weights)


def _device_loss_sum(params, batch, cfg: model.Config, platform: str):
    """One device's program: its param shards and rows -> (loss_sum, weight_sum) of the batch.
    platform: of the mesh's devices, which decides the attention kernel (model.causal)."""
    specs, dtype, eps = param_specs(cfg), jnp.dtype(cfg.dtype), cfg.norm_eps
    tokens = batch["tokens"]  # [B_(data,fsdp), T+1]
    segment_ids = batch.get("segment_ids")
    segment_ids = None if segment_ids is None else segment_ids[:, :-1]  # of the inputs
    rope = model.rope_tables(np.arange(tokens.shape[1] - 1), cfg.head_dim, cfg.rope_theta)
    x = _embed(_gather(params["embed"], specs["embed"], dtype), tokens[:, :-1])  # x[B, T_tensor, D]
    attend = model.causal(cfg, platform, segment_ids)  # on this device's local heads, whole sequence

    def layer(x, lp):  # x[B, T_tensor, D]; lp: this layer's shards, gathered here under the remat
        w = {k: _gather(v, specs["layers"][k][1:], dtype) for k, v in lp.items()}
        return model.layer(w, x, cfg, rope, attend,
                           # h[B, T_tensor, D] -> all-gather over tensor along T -> h[B, T, D]
                           gather=lambda h: _all_gather(h, "tensor", 1),
                           # out[B, T, D] {partial sum over the local heads or F slice}
                           #   -> reduce-scatter over tensor along T -> out[B, T_tensor, D]
                           scatter=lambda out: _psum_scatter(out, "tensor", 1))

    x = model.scan_layers(layer, x, params["layers"], cfg.remat)
    # h[B, T_tensor, D] -> all-gather over tensor along T -> h[B, T, D]
    h = _all_gather(model.rms_norm(x, _gather(params["norm"], specs["norm"], dtype), eps), "tensor", 1)
    output = _gather(params["output"], specs["output"], dtype)  # W[D, V_tensor]
    weights = batch.get("weights", jnp.ones(tokens[:, 1:].shape, jnp.float32)).astype(jnp.float32)

    logits = model.logits_from_hidden({"output": output}, h, cfg)  # [B, T, V_tensor] fp32
    sums = (_cross_entropy(logits, tokens[:, 1:], weights), jnp.sum(weights))
    # sums over this device's rows -> all-reduce over data and fsdp -> sums over the whole batch
    return jax.lax.psum(sums, BATCH)


# ----------------------------------------------------------------------------- public steps

def loss_sum(params, batch: dict, cfg: model.Config, mesh: Mesh):
    """(loss_sum, weight_sum) of a batch {"tokens": (rows, T+1) int32, optional "weights":
    (rows, T) per target token, optional "segment_ids": (rows, T+1)}, as model.cross_entropy."""
    platform = mesh.devices.flat[0].platform
    return jax.shard_map(partial(_device_loss_sum, cfg=cfg, platform=platform), mesh=mesh,
                         in_specs=(param_specs(cfg), {k: P(BATCH) for k in batch}),
                         out_specs=P())(params, batch)


def loss_sum_and_grad(params, batch: dict, cfg: model.Config, mesh: Mesh):
    """((loss_sum, weight_sum), d loss_sum / d params), the gradients sharded like the params.
    Summed, not averaged, so microbatches add up to exactly the big batch."""
    def f(p):
        total, count = loss_sum(p, batch, cfg, mesh)
        return total, count
    return jax.value_and_grad(f, has_aux=True)(params)


def loss_and_grad(params, tokens, cfg: model.Config, mesh: Mesh):
    """Mean next-token loss of tokens (rows, T+1) and its gradients, as jax.value_and_grad(model.loss_fn)."""
    (total, count), grads = loss_sum_and_grad(params, {"tokens": tokens}, cfg, mesh)
    count = jnp.maximum(count, 1.0)
    return total / count, jax.tree.map(lambda g: g / count, grads)
