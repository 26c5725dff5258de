"""The Pallas TPU splash-attention kernel (jax.experimental.pallas.ops.tpu.splash_attention):
performance code. Causal plus the packed-document segment mask, grouped-query heads; on CPU devices
it runs in Pallas interpret mode (slow: tests and debugging). It computes
attention.causal_attention's function (tests/test_attention.py).
"""
import math

import jax
import jax.numpy as jnp


def _block(T: int) -> int:
    for block in (512, 256, 128):
        if T % block == 0:
            return block
    return T  # short sequences (tests, interpret mode): one block


def splash_attention(q, k, v, segment_ids=None, interpret=False):
    """Causal grouped-query attention through the Pallas splash kernel, one example at a time.
    The kernel is built here, while the program is traced, for this T and number of local heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    B, T, N, H = q.shape
    b = _block(T)
    if not interpret and b % 128:
        raise ValueError(f"attention='splash' on TPU needs a sequence length divisible by 128, not {T}")
    blocks = kernels.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = masks.MultiHeadMask([masks.CausalMask((T, T)) for _ in range(N)])
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # (B, T, heads, H) -> (B, heads, T, H), the kernel's layout

    def attend(q, k, v, segment_ids):  # builds the kernel where it is traced: its mask tables are constants there
        kernel = kernels.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
        q = (q.astype(jnp.float32) / math.sqrt(H)).astype(q.dtype)  # the kernel does not scale
        if segment_ids is None:
            return heads_first(jax.vmap(kernel)(heads_first(q), heads_first(k), heads_first(v)))
        one = lambda q, k, v, s: kernel(q, k, v, segment_ids=kernels.SegmentIds(q=s, kv=s))
        return heads_first(jax.vmap(one)(heads_first(q), heads_first(k), heads_first(v), segment_ids))

    return _in_shard_map(attend)(q, k, v, segment_ids)


def _in_shard_map(kernel):
    """kernel(q, k, v, segment_ids) made traceable inside sharding.py's shard_map, which tracks how
    each value varies over the mesh axes (check_vma). The one workaround of the repository, kept
    here alone.

    Why: under check_vma, pallas_call refuses an output ShapeDtypeStruct whose manual_axis_type is
    None ("specify how the output should be varying ... or set check_vma=False"), and the splash
    kernel of jax 0.10 builds its out_shapes without one. The supported ways are for the kernel to
    pass manual_axis_type (only its own code can) or to switch check_vma off, which would give up
    the correct transposes of sharding.py's collectives under autodiff; wrapping the kernel in a
    custom_vjp that pvary's its outputs does not help (the error is raised inside the kernel's
    trace). So, while the kernel and its backward pass are traced, ShapeDtypeStruct defaults to
    q's manual axis type (every value of the per-device program varies over all mesh axes alike),
    and the VJP is taken here, inside that scope, not later by autodiff. Outside a shard_map q
    varies over nothing and the kernel runs as it is.

    When it can go: once the splash kernel sets manual_axis_type on its out_shapes. Return
    `kernel` itself here and run tests/test_attention.py::test_sharded_splash_equals_unsharded_jnp;
    if it passes, delete this function."""
    def scoped(mat, fn, *args):
        original = jax.ShapeDtypeStruct

        class VaryingLikeQ(original):
            def __init__(self, *args, manual_axis_type=None, **kwargs):
                super().__init__(*args, manual_axis_type=manual_axis_type or mat, **kwargs)

        jax.ShapeDtypeStruct = VaryingLikeQ
        try:
            return fn(*args)
        finally:
            jax.ShapeDtypeStruct = original

    @jax.custom_vjp
    def call(q, k, v, segment_ids):
        return fwd(q, k, v, segment_ids)[0]

    def fwd(q, k, v, segment_ids):  # segment_ids an argument of vjp, so no tracer hides in its closure
        return scoped(getattr(jax.typeof(q), "mat", None), jax.vjp, kernel, q, k, v, segment_ids)

    def bwd(vjp, dout):
        dq, dk, dv, _ = scoped(getattr(jax.typeof(dout), "mat", None), vjp, dout)
        return dq, dk, dv, None

    def traced(q, k, v, segment_ids):
        mat = getattr(jax.typeof(q), "mat", None)
        return call(q, k, v, segment_ids) if mat is not None and mat.varying else kernel(q, k, v, segment_ids)

    call.defvjp(fwd, bwd)
    return traced
