"""Attention: the reference that a reader expects, and the choice of the implementation that runs.

The reference is the plain masked softmax: scores q k^T / sqrt(H) as an einsum, masked, softmax in
fp32, then an einsum with v. `attend` takes any mask (generation runs it against its KV cache);
`causal_attention` is the causal self-attention of training (kept inside each packed document when
segment ids are given). It holds a (T, T) score matrix per head, which is what the fused
implementations of kernels/ avoid; each computes the same function, proven equal to
`causal_attention` in tests/test_attention.py:

    jnp     kernels/flash.py    FlashAttention-2 in jnp ops with its own backward pass: anywhere
    splash  kernels/splash.py   the Pallas TPU kernel (interpret mode on CPUs: tests only)
    cudnn   kernels/cudnn.py    cuDNN on NVIDIA GPUs; takes no segment ids (document_mask)

Config.attention picks one: "auto" (the default) resolves from the platform of the devices the
program is built for, not from this host's default backend, so an ahead-of-time compile for a TPU
slice on a CPU machine compiles splash: splash on TPU, jnp elsewhere (until bench/gpu.py has
verified cuDNN on a GPU, jnp there too). An explicit choice that cannot run there is an error.

All take q (B, T, N, H) and k/v (B, S, K, H) with grouped-query heads: kv head j serves query heads
j G .. j G + G - 1 (G = N/K). Scores and softmax are fp32; matmul inputs stay in q/k/v's dtype.
Nothing here knows about meshes: under tensor parallelism sharding.py calls these on each device's
local heads.
"""
import math
from functools import partial

import jax
import jax.numpy as jnp

from kernels.cudnn import cudnn_attention
from kernels.flash import flash_attention
from kernels.splash import splash_attention

IMPLEMENTATIONS = ("auto", "jnp", "splash", "cudnn")


def attend(q, k, v, mask):
    """Grouped-query attention of q (B, T, N, H) over k/v (B, S, K, H) under a boolean mask
    (B or 1, T, S): softmax(q k^T / sqrt(H), masked) v. Every row must see at least one key."""
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)  # each kv head's G query heads together
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(H)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, N, H)


def causal_attention(q, k, v, segment_ids=None):
    """Causal self-attention (S = T): each token sees itself and the tokens before it, and with
    segment_ids (B, T) only those of its own segment (packed documents)."""
    T = q.shape[1]
    mask = jnp.tril(jnp.ones((T, T), bool))[None]  # (1, T, T)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])  # (B, T, T)
    return attend(q, k, v, mask)


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
    return partial(flash_attention, segment_ids=segment_ids)
