"""FlashAttention-2's algorithm in jnp ops, with its own backward pass: performance code.

It computes attention.causal_attention's function (tests/test_attention.py holds the two equal,
output and gradients) without ever holding a (T, T) matrix: queries go in blocks, each block
multiplied only against the keys it can see (the masked upper triangle is skipped), the forward
pass keeps each row's log-sum-exp, and the backward pass recomputes one block's probabilities at
a time from it. Runs anywhere; `attention="auto"` picks it on CPUs and GPUs. On a CPU the step is
faster with it and the whole run fits in memory at any T (BENCHMARKS.md, "Attention alone").
"""
import math
from functools import partial

import jax
import jax.numpy as jnp

NEG_INF = float(jnp.finfo(jnp.float32).min)  # a masked score: exp() of it minus any row max is 0


def flash_attention(q, k, v, segment_ids=None, block=128):
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
