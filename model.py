"""Llama-2 in plain JAX: the math only (config, init, forward, loss).

Pre-norm RMSNorm, rotary embeddings in the rotate-half layout that Hugging Face checkpoints use
(their wq/wk load without permutation), grouped-query attention, SwiGLU MLP, untied embeddings,
no biases. Params are a plain nested dict of fp32 arrays; per-layer weights are stacked on a
leading layer axis and run through one `lax.scan` under `jax.checkpoint`. Matmuls run in
`cfg.dtype` (bf16 by default), softmax, logits and the loss in fp32.

The blocks (`attention`, `mlp`, `rms_norm`, ...) read head counts from the weights they are given,
not from the config, so sharding.py can call them on its local shards (a tensor-parallel device
holds N/t query heads and K/t kv heads) and add the collectives around them. No collectives, no
mesh and no generation cache live here.

Dimension letters: B batch, T sequence, D model, F ffn, N query heads, K kv heads, G = N/K query
heads per kv head, H head dim, V vocab, L layers.
"""
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp


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
    """cos, sin of shape (T, H) for the rotate-half layout: frequency i drives dims i and i+H/2."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (T, H/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (T, H)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x: (B, T, heads, H). Rotate pairs (i, i+H/2), computed in fp32."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def attend(q, k, v, mask, block=512):
    """Causal grouped-query attention. q (B, T, N, H), k/v (B, S, K, H), mask (B|1, T, S) bool.
    Scores and softmax in fp32. Each kv head serves G = N/K consecutive query heads.

    Long self-attention (T == S, a multiple of `block` above it) runs as a loop over query blocks
    of `block` rows, each under jax.checkpoint: neither pass holds more than a (block, T) fp32
    score matrix per head instead of (T, T)."""
    B, T, N, H = q.shape
    if T != k.shape[1] or T <= block or T % block:
        return _attend_block(q, k, v, mask)
    q_blocks = q.reshape(B, T // block, block, N, H).swapaxes(0, 1)  # (T/block, B, block, N, H)
    mask_blocks = mask.reshape(mask.shape[0], T // block, block, T).swapaxes(0, 1)
    out = jax.lax.map(jax.checkpoint(lambda qm: _attend_block(qm[0], k, v, qm[1])), (q_blocks, mask_blocks))
    return out.swapaxes(0, 1).reshape(B, T, N, H)


def _attend_block(q, k, v, mask):
    """attend() for queries q (B, T, N, H) against all keys k/v (B, S, K, H), mask (B|1, T, S)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(H)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(B, T, N, H)


def causal_mask(T, segment_ids=None):
    """(1|B, T, T) bool: position t sees s <= t (and only its own document, given segment ids)."""
    mask = jnp.tril(jnp.ones((T, T), bool))[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def attention(lp, x, cos, sin, mask, dtype):
    """Attention block without its residual. x (B, T, D) normed; lp holds wq/wk/wv/wo (local
    heads under tensor parallelism: the output is then a partial sum over heads)."""
    c = lambda w: w.astype(dtype)
    q = jnp.einsum("btd,dnh->btnh", x, c(lp["wq"]))
    k = jnp.einsum("btd,dkh->btkh", x, c(lp["wk"]))
    v = jnp.einsum("btd,dkh->btkh", x, c(lp["wv"]))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = attend(q, k, v, mask)  # (B, T, N, H)
    return jnp.einsum("btnh,nhd->btd", out, c(lp["wo"]))


def mlp(lp, x, dtype):
    """SwiGLU: w_down(silu(x w_gate) * (x w_up)). x (B, T, D) normed; local F slice under TP."""
    c = lambda w: w.astype(dtype)
    gate = jnp.einsum("btd,df->btf", x, c(lp["w_gate"]))
    up = jnp.einsum("btd,df->btf", x, c(lp["w_up"]))
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, c(lp["w_down"]))


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
    cos, sin = rope_tables(jnp.arange(T), cfg.head_dim, cfg.rope_theta)
    mask = causal_mask(T, segment_ids)
    x = params["embed"].astype(dtype)[tokens]  # (B, T, D)

    def layer(x, lp):
        x = x + attention(lp, rms_norm(x, lp["attn_norm"], cfg.norm_eps), cos, sin, mask, dtype)
        x = x + mlp(lp, rms_norm(x, lp["mlp_norm"], cfg.norm_eps), dtype)
        return x, None

    x, _ = jax.lax.scan(remat(layer, cfg.remat), x, params["layers"])
    return rms_norm(x, params["norm"], cfg.norm_eps)


def logits_from_hidden(params, h, cfg: Config):
    return jnp.einsum("btd,dv->btv", h, params["output"].astype(h.dtype),
                      preferred_element_type=jnp.float32)


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
