"""Llama-2 in plain JAX: the math only (config, init, the residual layer, forward, loss).

Pre-norm RMSNorm, rotary embeddings in the rotate-half layout that Hugging Face checkpoints use
(their wq/wk load without permutation), grouped-query attention, SwiGLU MLP, untied embeddings,
no biases. Params are a plain nested dict of fp32 arrays; per-layer weights are stacked on a
leading layer axis and run through one `lax.scan` under `jax.checkpoint`. Matmuls run in
`cfg.dtype` (bf16 by default), softmax, logits and the loss in fp32. The attention core lives in
attention.py.

`layer` is the one residual layer of the project: the unsharded forward below, sharding.py's
per-device program and decode.py's cached decoding all call it, passing in what differs (the
collectives around each block, the attention core with or without a KV cache). An ablation of the
block edits `layer` (or a block it calls) once. The blocks read head counts from the weights they
are given, not from the config, so they run unchanged on a tensor-parallel device's local heads.
No collectives, no mesh and no generation cache live here.

Dimension letters: B batch, T sequence, D model, F ffn, N query heads, K kv heads, G = N/K query
heads per kv head, H head dim, V vocab, L layers.
"""
import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

import attention


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
    # the attention kernel of training: "auto" (splash on TPU, jnp elsewhere), "jnp", "splash" or
    # "cudnn" (attention.py); like dtype and remat it changes how, not what, is computed
    attention: str = "auto"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


REMAT_POLICIES = ("none", "full", "dots", "offload")
# the fields that change how, not what, is computed: a checkpoint of one setting continues under another
HOW = ("dtype", "remat", "attention")


def math_changes(old: Config, new: Config, ignore: tuple = ()) -> list[str]:
    """["field old -> new", ...] for every field that changes what the model computes (all but the
    HOW fields and `ignore`): empty when params of `old` are params of `new`."""
    return [f"{f.name} {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}" for f in dataclasses.fields(Config)
            if f.name not in HOW + tuple(ignore) and getattr(old, f.name) != getattr(new, f.name)]


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
    assert cfg.dim % cfg.n_heads == 0 and cfg.n_heads % cfg.n_kv_heads == 0, "config.check_model refuses this"
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


def flops_per_token(cfg: Config, seq_len: int) -> float:
    """Model FLOPs per trained token (the numerator of MFU): 6 per matmul weight (2 forward, 4
    backward) plus causal attention (QK^T and AV over T/2 keys on average, forward and backward:
    6 L T D). The embedding is a lookup, not a matmul; remat's recompute is not counted."""
    matmul_params = param_count(cfg) - cfg.vocab_size * cfg.dim
    return 6 * matmul_params + 6 * cfg.n_layers * seq_len * cfg.dim


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
    angles = positions.astype(xp.float32)[..., None] * inv_freq  # (T, H/2), or (B, T, H/2) per row
    angles = xp.concatenate([angles, angles], axis=-1)  # (..., H)
    return xp.cos(angles), xp.sin(angles)


def apply_rope(x, cos, sin):
    """x: (B, T, heads, H); cos, sin: (T, H), or (B, T, H) when rows sit at different positions
    (batched decoding). Rotate pairs (i, i+H/2), computed in fp32."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]  # over the heads
    return (x32 * cos + rotated * sin).astype(x.dtype)


def dense(x, w, contract=1, **kwargs):
    """x (..., in) times w (in, ...) -> (..., out), where `in` is the last `contract` dims of x and
    the first of w, computed as one 2-D matmul (rows = all leading dims of x). Written this way,
    the backward pass's matmuls need no transposed copies of activations on XLA CPU (an einsum
    over batch and sequence dims made it copy each (B, T, F) gradient transposed): a CPU-only
    trick kept because it pays (BENCHMARKS.md, "The CPU-only tricks")."""
    lead, out = x.shape[:x.ndim - contract], w.shape[contract:]
    y = jnp.matmul(x.reshape(math.prod(lead), -1), w.reshape(math.prod(w.shape[:contract]), -1), **kwargs)
    return y.reshape(*lead, *out)


def self_attention(lp, x, rope, attend, dtype):
    """Self-attention block without its residual. x (B, T, D) normed; lp holds wq/wk/wv/wo (local
    heads under tensor parallelism: the output is then a partial sum over heads); rope: the
    (cos, sin) tables of x's positions; attend(q, k, v) -> (B, T, N, H): the attention core."""
    c = lambda w: w.astype(dtype)
    q = dense(x, c(lp["wq"]))  # (B, T, N, H)
    k = dense(x, c(lp["wk"]))  # (B, T, K, H)
    v = dense(x, c(lp["wv"]))
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return dense(attend(q, k, v), c(lp["wo"]), contract=2)


def mlp(lp, x, dtype):
    """SwiGLU: w_down(silu(x w_gate) * (x w_up)). x (B, T, D) normed; local F slice under TP."""
    c = lambda w: w.astype(dtype)
    gate, up = dense(x, c(lp["w_gate"])), dense(x, c(lp["w_up"]))
    return dense(jax.nn.silu(gate) * up, c(lp["w_down"]))


def _same(x):
    return x


def layer(lp, x, cfg: Config, rope, attend, gather=_same, scatter=_same):
    """One pre-norm residual layer: x + attention(norm(x)), then + mlp(norm(x)).

    lp: this layer's weights (dtype-cast by the blocks); rope: (cos, sin) of x's positions;
    attend(q, k, v): the attention core (training: `causal` below; generation: attention over its
    KV cache). gather / scatter: what the callers put between the residual stream and
    the blocks. Unsharded they do nothing; sharding.py passes the collectives of sequence
    parallelism (gather: x[B, T_tensor, D] -> x[B, T, D] before each block; scatter: the block's
    partial sum over local heads or F -> x[B, T_tensor, D])."""
    dtype = jnp.dtype(cfg.dtype)
    x = checkpoint_name(x, "layer_input")  # what remat="offload" keeps, in host memory
    h = gather(rms_norm(x, lp["attn_norm"], cfg.norm_eps))
    x = x + scatter(self_attention(lp, h, rope, attend, dtype))
    h = gather(rms_norm(x, lp["mlp_norm"], cfg.norm_eps))
    return x + scatter(mlp(lp, h, dtype))


def causal(cfg: Config, platform: str, segment_ids=None):
    """The attention core of training for a program on `platform` devices: causal self-attention,
    kept inside each segment (packed document) when segment_ids (B, T) are given, by the kernel
    cfg.attention resolves to there (attention.py)."""
    implementation = attention.resolve(cfg.attention, platform, segment_ids is not None)
    return attention.core(implementation, platform, segment_ids)


def scan_layers(fn, x, layers, policy: str):
    """x -> fn(x, layer 0's weights) -> ... -> through all layers (`layers`: the stacked
    per-layer weights), as one lax.scan with `fn` under remat(policy). Without remat ("none")
    the loop is unrolled: a scan would copy every layer's saved activations into stacked buffers
    and back (a CPU-only trick that pays: BENCHMARKS.md, "The CPU-only tricks"). With remat, the
    scan keeps compile time flat in depth."""
    fn = remat(fn, policy)
    return jax.lax.scan(lambda x, lp: (fn(x, lp), None), x, layers, unroll=policy == "none")[0]


def remat(fn, policy: str):
    """Wrap a layer function in jax.checkpoint according to Config.remat."""
    if policy == "none":
        return fn
    policies = {"full": jax.checkpoint_policies.nothing_saveable,
                "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
                    names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
                    offload_src="device", offload_dst="pinned_host")}
    if policy not in policies:
        raise ValueError(f"unknown remat policy {policy!r}; known: none, {', '.join(policies)}")
    return jax.checkpoint(fn, policy=policies[policy])


# ----------------------------------------------------------------------------- model

def forward(params, tokens, cfg: Config, segment_ids=None):
    """tokens (B, T) int -> logits (B, T, V) fp32."""
    return logits_from_hidden(params, hidden(params, tokens, cfg, segment_ids), cfg)


def hidden(params, tokens, cfg: Config, segment_ids=None):
    """tokens (B, T) -> final normed hidden states (B, T, D) in cfg.dtype."""
    rope = rope_tables(np.arange(tokens.shape[1]), cfg.head_dim, cfg.rope_theta)
    x = params["embed"].astype(cfg.dtype)[tokens]  # (B, T, D)
    attend = causal(cfg, jax.default_backend(), segment_ids)
    x = scan_layers(lambda x, lp: layer(lp, x, cfg, rope, attend), x, params["layers"], cfg.remat)
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
