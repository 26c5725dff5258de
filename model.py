"""Llama-2 in plain JAX: the math only (config, init, forward, loss).

Pre-norm RMSNorm, rotary embeddings in the rotate-half layout that Hugging Face checkpoints use
(their wq/wk load without permutation), grouped-query attention, SwiGLU MLP, untied embeddings,
no biases. Params are a plain nested dict of fp32 arrays; per-layer weights are stacked on a
leading layer axis and run through one `lax.scan` under `jax.checkpoint`. Matmuls run in
`cfg.dtype` (bf16 by default), softmax, logits and the loss in fp32. Attention is flash-style
(causal_attention: blocked, the masked triangle skipped, its own backward pass).

The blocks (`attention`, `mlp`, `rms_norm`, ...) read head counts from the weights they are given,
not from the config, so sharding.py can call them on its local shards (a tensor-parallel device
holds N/t query heads and K/t kv heads) and add the collectives around them. No collectives, no
mesh and no generation cache live here.

Dimension letters: B batch, T sequence, D model, F ffn, N query heads, K kv heads, G = N/K query
heads per kv head, H head dim, V vocab, L layers.
"""
import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class Config:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    ffn_dim: int = 11008
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "bfloat16"  # compute dtype of the matmuls; params stay fp32
    # what the backward pass recomputes: "full" saves only each layer's input, "dots" also saves
    # matmul outputs (more memory, less recompute), "none" saves everything (no remat)
    remat: str = "full"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


LLAMA2_7B = Config(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008)
LLAMA2_13B = Config(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824)
LLAMA2_70B = Config(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672)
# 6.3M params, for the CPU demo (configs/tiny.py): vocab of the demo tokenizer, fp32 and no
# remat (a CPU has memory to spare; recomputing the forward pass would cost a quarter of the step)
TINY = Config(vocab_size=1024, dim=256, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=688, max_seq_len=256,
              dtype="float32", remat="none")
PRESETS = {"tiny": TINY, "llama2_7b": LLAMA2_7B, "llama2_13b": LLAMA2_13B, "llama2_70b": LLAMA2_70B}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


# ----------------------------------------------------------------------------- params

def param_shapes(cfg: Config) -> dict:
    """Shape of every param, in the params' own tree structure."""
    L, D, F, V = cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.vocab_size
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return {
        "embed": (V, D),
        "layers": {
            "attn_norm": (L, D),
            "wq": (L, D, N, H),
            "wk": (L, D, K, H),
            "wv": (L, D, K, H),
            "wo": (L, N, H, D),
            "mlp_norm": (L, D),
            "w_gate": (L, D, F),
            "w_up": (L, D, F),
            "w_down": (L, F, D),
        },
        "norm": (D,),
        "output": (D, V),
    }


def init_params(cfg: Config, key) -> dict:
    """Random fp32 params: norms at 1, matrices normal(0, 0.02) (Llama's init; residual
    projections scaled by 1/sqrt(2 L) as in GPT-2). Under `jax.jit(..., out_shardings=...)` each
    device only ever holds its own shard."""
    if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"dim {cfg.dim} must divide by n_heads {cfg.n_heads}, "
                         f"and n_heads by n_kv_heads {cfg.n_kv_heads}")
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda s: isinstance(s, tuple))[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "norm" in path:
            out.append(jnp.ones(shape, jnp.float32))
        else:
            std = 0.02 / math.sqrt(2 * cfg.n_layers) if ("wo" in path or "w_down" in path) else 0.02
            out.append(std * jax.random.normal(k, shape, jnp.float32))
    return jax.tree.unflatten(treedef, out)


def param_count(cfg: Config) -> int:
    """Number of parameters, computed from shapes alone (nothing is allocated)."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


# ----------------------------------------------------------------------------- blocks

def rms_norm(x, weight, eps):
    """RMSNorm in fp32, returned in the input's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions, head_dim, theta):
    """cos, sin of shape (T, H) for the rotate-half layout: frequency i drives dims i and i+H/2.
    Computed in fp32 like Hugging Face's. Positions given as a numpy array (training's 0..T-1)
    give numpy tables, which XLA embeds as constants; from traced positions XLA would recompute
    cos and sin inside every fusion that reads them, once per element of q and k (~15x the cost
    of the rotation itself on a CPU)."""
    xp = np if isinstance(positions, np.ndarray) else jnp
    inv_freq = 1.0 / theta ** (xp.arange(0, head_dim, 2, dtype=xp.float32) / head_dim)
    angles = positions.astype(xp.float32)[:, None] * inv_freq[None, :]  # (T, H/2)
    angles = xp.concatenate([angles, angles], axis=-1)  # (T, H)
    return xp.cos(angles), xp.sin(angles)


def apply_rope(x, cos, sin):
    """x: (B, T, heads, H). Rotate pairs (i, i+H/2), computed in fp32."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


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


def dense(x, w, contract=1, **kwargs):
    """x (..., in) times w (in, ...) -> (..., out), where `in` is the last `contract` dims of x and
    the first of w, computed as one 2-D matmul (rows = all leading dims of x). Written this way,
    the backward pass's matmuls need no transposed copies of activations on XLA CPU (an einsum
    over batch and sequence dims made it copy each (B, T, F) gradient transposed)."""
    lead, out = x.shape[:x.ndim - contract], w.shape[contract:]
    y = jnp.matmul(x.reshape(math.prod(lead), -1), w.reshape(math.prod(w.shape[:contract]), -1), **kwargs)
    return y.reshape(*lead, *out)


def attention(lp, x, cos, sin, segment_ids, dtype):
    """Causal self-attention block without its residual. x (B, T, D) normed; lp holds
    wq/wk/wv/wo (local heads under tensor parallelism: the output is then a partial sum over
    heads); segment_ids (B, T) or None."""
    c = lambda w: w.astype(dtype)
    q = dense(x, c(lp["wq"]))  # (B, T, N, H)
    k = dense(x, c(lp["wk"]))  # (B, T, K, H)
    v = dense(x, c(lp["wv"]))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = causal_attention(q, k, v, segment_ids)  # (B, T, N, H)
    return dense(out, c(lp["wo"]), contract=2)


def mlp(lp, x, dtype):
    """SwiGLU: w_down(silu(x w_gate) * (x w_up)). x (B, T, D) normed; local F slice under TP."""
    c = lambda w: w.astype(dtype)
    gate, up = dense(x, c(lp["w_gate"])), dense(x, c(lp["w_up"]))
    return dense(jax.nn.silu(gate) * up, c(lp["w_down"]))


def scan_layers(layer, x, layers, policy: str):
    """x -> layer(x, layer 0's weights) -> ... -> through all layers (`layers`: the stacked
    per-layer weights), as one lax.scan with `layer` under remat(policy). Without remat ("none")
    the loop is unrolled: a scan would copy every layer's saved activations into stacked buffers
    and back (6-8% of a CPU step). With remat, the scan keeps compile time flat in depth."""
    layer = remat(layer, policy)
    return jax.lax.scan(lambda x, lp: (layer(x, lp), None), x, layers, unroll=policy == "none")[0]


def remat(fn, policy: str):
    """Wrap a layer function in jax.checkpoint according to Config.remat."""
    if policy == "none":
        return fn
    policies = {"full": jax.checkpoint_policies.nothing_saveable,
                "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    if policy not in policies:
        raise ValueError(f"unknown remat policy {policy!r}; known: none, {', '.join(policies)}")
    return jax.checkpoint(fn, policy=policies[policy])


# ----------------------------------------------------------------------------- model

def forward(params, tokens, cfg: Config, segment_ids=None):
    """tokens (B, T) int -> logits (B, T, V) fp32."""
    return logits_from_hidden(params, hidden(params, tokens, cfg, segment_ids), cfg)


def hidden(params, tokens, cfg: Config, segment_ids=None):
    """tokens (B, T) -> final normed hidden states (B, T, D) in cfg.dtype."""
    dtype = jnp.dtype(cfg.dtype)
    T = tokens.shape[1]
    cos, sin = rope_tables(np.arange(T), cfg.head_dim, cfg.rope_theta)
    x = params["embed"].astype(dtype)[tokens]  # (B, T, D)

    def layer(x, lp):
        x = x + attention(lp, rms_norm(x, lp["attn_norm"], cfg.norm_eps), cos, sin, segment_ids, dtype)
        return x + mlp(lp, rms_norm(x, lp["mlp_norm"], cfg.norm_eps), dtype)

    x = scan_layers(layer, x, params["layers"], cfg.remat)
    return rms_norm(x, params["norm"], cfg.norm_eps)


def logits_from_hidden(params, h, cfg: Config):
    return dense(h, params["output"].astype(h.dtype), preferred_element_type=jnp.float32)


def cross_entropy(logits, targets, weights=None):
    """Summed token losses and summed weights (so callers can average over any number of
    microbatches and devices). logits (B, T, V) fp32, targets (B, T), weights (B, T) or None."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    losses = logz - target_logit
    weights = jnp.ones_like(losses) if weights is None else weights.astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights)


def loss_fn(params, tokens, cfg: Config, weights=None, segment_ids=None):
    """Mean next-token loss of rows tokens (B, T+1): inputs tokens[:, :-1], targets tokens[:, 1:].
    `weights` (B, T) masks or weights the loss per target token (SFT trains on replies only)."""
    logits = forward(params, tokens[:, :-1], cfg, None if segment_ids is None else segment_ids[:, :-1])
    total, count = cross_entropy(logits, tokens[:, 1:], weights)
    return total / jnp.maximum(count, 1.0)


if __name__ == "__main__":  # a smoke run: python model.py
    cfg = TINY
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 65), 0, cfg.vocab_size)
    loss = jax.jit(loss_fn, static_argnums=2)(params, tokens, cfg)
    print(f"tiny Llama: {param_count(cfg):,} params, loss on random tokens {float(loss):.3f} "
          f"(uniform would be {math.log(cfg.vocab_size):.3f})")
