"""Attention: the causal self-attention of training in three implementations, and the plain masked
form that generation runs against its KV cache.

    jnp     causal_attention: FlashAttention-2's algorithm in jnp ops with its own backward pass.
            Runs anywhere; the reference the others are tested against.
    splash  The Pallas TPU kernel (jax.experimental.pallas.ops.tpu.splash_attention): causal plus
            the packed-document segment mask, grouped-query heads. On CPU devices it runs in
            Pallas interpret mode: slow, for tests and debugging.
    cudnn   jax.nn.dot_product_attention(implementation="cudnn") on NVIDIA GPUs. It takes no
            segment ids, so it cannot keep attention inside packed documents (document_mask).

Config.attention picks one: "auto" (the default) resolves from the platform of the devices the
program is built for, not from this host's default backend, so an ahead-of-time compile for a TPU
slice on a CPU machine compiles splash: splash on TPU, jnp on CPU and, until the GPU check
(bench/gpu.py) has verified cuDNN on a GPU, jnp on GPU too. An explicit choice that cannot run
there is an error.

All take q (B, T, N, H) and k/v (B, S, K, H) with grouped-query heads: kv head j serves query heads
j G .. j G + G - 1 (G = N/K). Scores, softmax and its statistics are fp32; matmul inputs stay in
q/k/v's dtype. Nothing here knows about meshes: under tensor parallelism sharding.py calls these on
each device's local heads.
"""
import math
from functools import partial

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "jnp", "splash", "cudnn")


def resolve(choice: str, platform: str, segments: bool = False) -> str:
    """The implementation `choice` means for a program on `platform` devices ("cpu", "tpu", "gpu");
    segments: whether attention must stay inside packed documents."""
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"attention={choice!r}: must be one of {', '.join(IMPLEMENTATIONS)}")
    if choice == "auto":
        return "splash" if platform == "tpu" else "jnp"
    if choice == "cudnn" and platform != "gpu":
        raise ValueError(f"attention='cudnn' needs NVIDIA GPUs; this program is built for {platform} devices")
    if choice == "cudnn" and segments:
        raise ValueError("attention='cudnn' takes no segment ids, so it cannot keep attention inside documents "
                         "(document_mask=True): use 'jnp' or 'auto'")
    if choice == "splash" and platform not in ("tpu", "cpu"):
        raise ValueError(f"attention='splash' is a TPU kernel (interpret mode on CPU), not for {platform} devices")
    return choice


def core(implementation: str, platform: str, segment_ids=None):
    """The causal attention function (q, k, v) -> out of a resolved implementation."""
    if implementation == "splash":
        return partial(splash_attention, segment_ids=segment_ids, interpret=platform != "tpu")
    if implementation == "cudnn":
        return cudnn_attention
    return partial(causal_attention, segment_ids=segment_ids)


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
    each value varies over the mesh axes (check_vma). The splash kernel's pallas_calls state no
    manual axis type for their outputs, which check_vma requires. Every value of the per-device
    program varies over all mesh axes alike, so while the kernel and its backward pass are traced
    their ShapeDtypeStructs default to q's: the VJP is taken here, inside that scope, not later by
    autodiff. Outside a shard_map q varies over nothing and the kernel runs as it is."""
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


def cudnn_attention(q, k, v):
    """Causal grouped-query attention through cuDNN's fused kernel (NVIDIA GPUs only)."""
    return jax.nn.dot_product_attention(q, k, v, scale=1 / math.sqrt(q.shape[-1]), is_causal=True,
                                        implementation="cudnn")

NEG_INF = float(jnp.finfo(jnp.float32).min)  # a masked score: exp() of it minus anything is 0


def attend(q, k, v, mask):
    """Grouped-query attention of q (B, T, N, H) over k/v (B, S, K, H) under any mask (B|1, T, S)
    bool: the plain form, used by generation against a KV cache (sample.py). Training's causal
    self-attention is causal_attention below. Scores and softmax in fp32; each kv head serves
    G = N/K consecutive query heads."""
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(H)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, N, H)


def causal_attention(q, k, v, segment_ids=None, block=128):
    """Causal grouped-query self-attention, softmax(q k^T / sqrt(H) + causal mask) v, computed
    flash-style. q (B, T, N, H), k/v (B, T, K, H); with segment_ids (B, T) a token only sees
    earlier tokens of its own segment (packed documents). Kv head j serves query heads
    j G .. j G + G - 1 (G = N/K).

    Queries go in blocks of `block` rows, and block i is multiplied only against the keys it can
    see, [0, end of block i): the masked upper triangle is never computed (with 4 blocks, 6 of the
    16 score tiles are skipped; with many, nearly half). The forward pass keeps each row's
    log-sum-exp instead of its probabilities, and the backward pass recomputes one block's
    probabilities at a time from it (FlashAttention-2's algorithm, written with jnp ops): no
    (T, T) matrix is ever held, whatever T. Scores, softmax and its statistics are fp32; matmul
    inputs stay in q/k/v's dtype."""
    return _flash(q, k, v, segment_ids, block)


def _flash_inputs(q, k, v, block):
    """The layouts the matmuls want: q as a list of query blocks, each (B, K, G R, H) for R rows
    (rows g-major within the block) and pre-scaled by 1/sqrt(H); k and v as (B, K, T, H)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    blocks = []
    for start in range(0, T, block):
        qb = (q[:, start:start + block].astype(jnp.float32) / math.sqrt(H)).astype(q.dtype)
        R = qb.shape[1]
        blocks.append(qb.reshape(B, R, K, N // K, H).transpose(0, 2, 3, 1, 4).reshape(B, K, -1, H))
    return blocks, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _flash_scores(qb, kt, segment_ids, start, G):
    """Masked fp32 scores (B, K, G, R, E) of the query block of rows start .. start + R - 1
    against the keys it can see, 0 .. E - 1 (E = start + R)."""
    B, K, GR, _ = qb.shape
    R = GR // G
    E = start + R
    scores = jnp.einsum("bkqh,bksh->bkqs", qb, kt[:, :, :E], preferred_element_type=jnp.float32)
    pos = jnp.arange(E)
    visible = (pos[start:, None] >= pos[None, :])[None]  # (1, R, E)
    if segment_ids is not None:
        visible = visible & (segment_ids[:, start:E, None] == segment_ids[:, None, :E])
    return jnp.where(visible[:, None, None], scores.reshape(B, K, G, R, E), NEG_INF)


def _flash_forward(q, k, v, segment_ids, block):
    """-> (out (B, T, N, H), log-sum-exp of each score row (B, K, G, T, 1) fp32, _flash_inputs)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    inputs = blocks, kt, vt = _flash_inputs(q, k, v, block)
    outs, lses = [], []
    for i, qb in enumerate(blocks):
        if outs:  # one block at a time (see _flash_bwd)
            qb, outs[-1], lses[-1] = jax.lax.optimization_barrier((qb, outs[-1], lses[-1]))
        scores = _flash_scores(qb, kt, segment_ids, i * block, G)  # (B, K, G, R, E)
        R, E = scores.shape[-2:]
        top = jnp.max(scores, axis=-1, keepdims=True)
        p = jnp.exp(scores - top)  # unnormalised probabilities
        total = jnp.sum(p, axis=-1, keepdims=True)
        out = jnp.einsum("bkqs,bksh->bkqh", p.reshape(B, K, G * R, E).astype(v.dtype), vt[:, :, :E],
                         preferred_element_type=jnp.float32)
        outs.append(out.reshape(B, K, G, R, H) / total)
        lses.append(top + jnp.log(total))
    out = jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)
    return out, jnp.concatenate(lses, axis=3), inputs


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids, block):
    return _flash_forward(q, k, v, segment_ids, block)[0]


def _flash_fwd(q, k, v, segment_ids, block):
    out, lse, inputs = _flash_forward(q, k, v, segment_ids, block)
    return out, (inputs, segment_ids, out, lse)


def _flash_bwd(block, residuals, dout):
    """dS = P * (dP - rowsum(dO * O)) per query block, P recomputed from the saved log-sum-exp."""
    (blocks, kt, vt), segment_ids, out, lse = residuals
    B, T, N, H = out.shape
    K = kt.shape[1]
    G = N // K
    dot = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    # rowsum(dO * O) (B, K, G, T, 1) and dO in the blocks' layout (B, K, G, T, H)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = delta.reshape(B, T, K, G).transpose(0, 2, 3, 1)[..., None]
    dout = dout.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
    dqs, dk, dv = [], 0.0, 0.0  # dk, dv as (B, K, H, T), the layout their fastest matmul form gives
    for i, qb in enumerate(blocks):
        if i:  # one block at a time: left free, XLA may keep every block's (R, E) matrices alive at
            # once (+4.5 GiB per chip on lemur70b, +7 on llama2_7b)
            qb, dk, dv, dqs[-1] = jax.lax.optimization_barrier((qb, dk, dv, dqs[-1]))
        start = i * block
        scores = _flash_scores(qb, kt, segment_ids, start, G)
        R, E = scores.shape[-2:]
        rows = slice(start, start + R)
        p = jnp.exp(scores - lse[:, :, :, rows])  # (B, K, G, R, E)
        do = dout[:, :, :, rows].reshape(B, K, G * R, H)
        dp = dot("bkqh,bksh->bkqs", do, vt[:, :, :E]).reshape(B, K, G, R, E)
        ds = (p * (dp - delta[:, :, :, rows])).reshape(B, K, G * R, E).astype(qb.dtype)
        p = p.reshape(B, K, G * R, E).astype(do.dtype)
        pad = ((0, 0), (0, 0), (0, 0), (0, T - E))
        dv = dv + jnp.pad(dot("bkqh,bkqs->bkhs", do, p), pad)  # dO^T P, summed over the G heads
        dk = dk + jnp.pad(dot("bkqh,bkqs->bkhs", qb, ds), pad)  # (q / sqrt(H))^T dS
        dqs.append(dot("bkqs,bksh->bkqh", ds, kt[:, :, :E]).reshape(B, K, G, R, H))
    dq = jnp.concatenate(dqs, axis=3) / math.sqrt(H)
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(out.dtype)
    dk, dv = (d.transpose(0, 3, 1, 2).astype(kt.dtype) for d in (dk, dv))
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
