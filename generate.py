"""Generation with a KV cache: prefill the prompt once, then one jitted decode step reused for every
new token. The layers are model.layer, the same code as training, with an attention core that
attends over the cache; nothing of the cache lives in model.py.

    tokens = generate(params, cfg, [bos, ...prompt ids], 64, temperature=0.8, top_p=0.95, seed=1)

The cache holds k/v (L, B, S, K, H) in the compute dtype for S = the prompt plus max_new_tokens
rounded up to 256 (so few cache sizes compile), at most the context. Decoding is greedy
(temperature 0) or samples with temperature, top-k and top-p (nucleus) from a seed; it stops at a
stop token (included in the output), after max_new_tokens, or when the context is full. sample.py
is the command line over this module; train.py's loop prints a sample with it at the end of a run.
"""
import math
from functools import partial

import jax
import jax.numpy as jnp

import attention
import model


def forward_cached(params, tokens, cache, pos, cfg: model.Config):
    """tokens (B, T) at positions pos..pos+T-1, the cache holding positions < pos -> logits of the
    last position (B, V) fp32 and the cache with these T positions written."""
    T, S = tokens.shape[1], cache["k"].shape[2]
    rope = model.rope_tables(pos + jnp.arange(T), cfg.head_dim, cfg.rope_theta)
    mask = (jnp.arange(S)[None, :] <= pos + jnp.arange(T)[:, None])[None]  # (1, T, S): causal over the cache

    def layer(x, inputs):
        lp, k_cache, v_cache = inputs  # caches (B, S, K, H)
        written = {}

        def cached(q, k, v):  # the attention core: write this step's k/v, attend over the cache
            written["k"] = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, pos, 0, 0))
            written["v"] = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, pos, 0, 0))
            return attention.attend(q, written["k"], written["v"], mask)

        x = model.layer(lp, x, cfg, rope, cached)
        return x, (written["k"], written["v"])  # model.layer returns x only: the cache comes out here

    x = params["embed"].astype(cfg.dtype)[tokens]  # (B, T, D)
    x, (k, v) = jax.lax.scan(layer, x, (params["layers"], cache["k"], cache["v"]))
    h = model.rms_norm(x[:, -1:], params["norm"], cfg.norm_eps)
    return model.logits_from_hidden(params, h, cfg)[:, 0], {"k": k, "v": v}


def sample_logits(logits, key, temperature, top_k, top_p):
    """Next tokens (B,) from logits (B, V): argmax at temperature 0, else a draw from the softmax of
    logits / temperature restricted to the top_k tokens (0 = all), then to the fewest of those whose
    probability reaches top_p (1 = all). The options are traced values: one compiled step serves all."""
    V = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)
    desc = jnp.sort(scaled, axis=-1)[:, ::-1]
    in_top_k = jnp.arange(V) < jnp.where(top_k > 0, top_k, V)
    probs = jax.nn.softmax(jnp.where(in_top_k, desc, -jnp.inf), axis=-1)
    kept = in_top_k & (jnp.cumsum(probs, axis=-1) - probs < top_p)  # before reaching top_p, and the one that does
    cutoff = jnp.min(jnp.where(kept, desc, jnp.inf), axis=-1, keepdims=True)
    draw = jax.random.categorical(key, jnp.where(scaled < cutoff, -jnp.inf, scaled), axis=-1)
    return jnp.where(temperature == 0, jnp.argmax(logits, axis=-1), draw)


def check_options(temperature, top_k, top_p):
    """Refuse sampling options that cannot be right (top_p=0 would keep no token at all)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature}: must be a finite number >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}: must be >= 0 (0 = all tokens)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must lie in (0, 1] (1 = all tokens)")


@partial(jax.jit, static_argnames=("cfg", "vocab_size"), donate_argnames="cache")
def _next(params, tokens, cache, pos, key, opts, cfg, vocab_size):
    """Prefill (T = prompt length) or decode (T = 1, the same compiled step for every token)."""
    logits, cache = forward_cached(params, tokens, cache, pos, cfg)
    return sample_logits(logits[:, :vocab_size], key, *opts).astype(jnp.int32), cache


def generate(params, cfg: model.Config, prompt_tokens, max_new_tokens: int, *, temperature=0.0, top_k=0,
             top_p=1.0, seed=0, stop_tokens=(), vocab_size=None) -> list[int]:
    """The new tokens after prompt_tokens (a list of ids). vocab_size: sample only ids below it
    (a padded vocabulary's extra rows are never real tokens)."""
    check_options(temperature, top_k, top_p)
    n = len(prompt_tokens)
    if not 0 < n < cfg.max_seq_len:
        raise ValueError(f"the prompt has {n} tokens; it must have at least 1 and leave room in the "
                         f"model's context of {cfg.max_seq_len} tokens")
    size = min(cfg.max_seq_len, -(-(n + max_new_tokens) // 256) * 256)
    shape = (cfg.n_layers, 1, size, cfg.n_kv_heads, cfg.head_dim)
    cache = {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}
    key = jax.random.key(seed)
    opts = dict(opts=(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)), cfg=cfg,
                vocab_size=vocab_size or cfg.vocab_size)
    limit = min(max_new_tokens, size - n)
    if limit <= 0:
        return []
    token, cache = _next(params, jnp.asarray([prompt_tokens], jnp.int32), cache, jnp.int32(0), key, **opts)
    out = [int(token[0])]
    while len(out) < limit and out[-1] not in stop_tokens:  # feed the last new token at position n + len - 1
        token, cache = _next(params, token[:, None], cache, jnp.int32(n + len(out) - 1),
                             jax.random.fold_in(key, len(out)), **opts)
        out.append(int(token[0]))
    return out
