"""Decoding and scoring with a KV cache, on any mesh: the one decode path of the project.

    params, cfg, tokenizer = weights.for_serving(path, mesh)   # each process reads its own slices
    outs = decode.generate(params, cfg, mesh, [[bos, ...], [bos, ...]], 64, stop_tokens=(eos,))
    engine = decode.Engine(params, cfg, mesh, slots=8, context=4096)   # continuous batching (the server)
    params = decode.reshard(train_params, cfg, mesh)           # training's params, in this layout

sample.py (one device is the mesh (1, 1, 1)), train.py's end-of-run sample, the evaluation and the
OpenAI server all decode here: `generate` is the batch API, all prompts started at once in an
`Engine`, whose slots the server fills and empties as requests come and go; both run `step`.
Greedy (temperature 0) or sampled with temperature, top-k and top-p (nucleus), per row, with a
key from the row's seed and the index of its token; each row stops at a stop token (included in
its output), after max_new_tokens, or when its context is full.

The layout. Decoding one token per row reads every weight once per step and does little math
with it, so its cost is the bytes of weights each chip reads. Training's FSDP split would
all-gather every weight at every token (each chip would read the whole model); here params are
tensor-parallel only, in the compute dtype (bf16: 140 GB for 70B, where fp32 would not fit a
v4-16): query heads, the MLP's F and the vocabulary split over the `tensor` axis, replicated over
`data` and `fsdp`, which split the batch rows instead. The KV cache (L, B, S, K, H) splits its kv
heads over `tensor`. Where the tensor axis is larger than the number of kv heads (16 chips, 8 kv
heads) every kv head is replicated over its group of tensor/K chips, as Megatron does: wk/wv are
then replicated and each chip computes the one kv head its query heads read, and the cache holds
one kv head per chip. Decode cannot split the sequence as training does (one token per row), so
where training reduce-scatters a block's partial sums over the sequence, decoding all-reduces them.

Each device runs model.layer, the layer of training, with an attention core over its cache.
Each row keeps its own position (RoPE, the causal mask over the cache and where its next k/v are
written). A prompt is prefilled into its own row of the cache in chunks of `prefill_chunk` tokens
through the same step as decoding (so the prefill's attention scores, not the prompt, bound its
memory; the chips of the other rows' batch shards compute along and write nothing), and the row's
first token comes from the chunk that holds its last prompt token. A chunk is padded at the end
(the last one to a power of two from 16, so a short prompt costs little and few shapes compile);
padded positions are never attended to: a row's mask stops at its own position, and its decode
steps overwrite the padding as they go. Rows not decoding in a step (free, or still prefilling)
step at a position past the cache, where nothing is written.
"""
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import attention
import model
from sharding import BATCH, embed_rows, target_logprobs


def replicated_kv(cfg: model.Config, tensor: int) -> bool:
    """Whether kv heads are replicated over groups of chips (tensor axis larger than n_kv_heads)."""
    return tensor > cfg.n_kv_heads


def check(cfg: model.Config, mesh_shape: dict):
    """Refuse a mesh this layout cannot split cfg over, naming the size that does not divide."""
    T = mesh_shape["tensor"]
    sizes = {"n_heads": cfg.n_heads, "ffn_dim": cfg.ffn_dim, "vocab_size": cfg.vocab_size}
    if not replicated_kv(cfg, T):
        sizes["n_kv_heads"] = cfg.n_kv_heads
    elif T % cfg.n_kv_heads:
        raise ValueError(f"tensor axis {T} must be a multiple of n_kv_heads {cfg.n_kv_heads} to replicate kv heads")
    for name, size in sizes.items():
        if size % T:
            raise ValueError(f"{name}={size} does not divide by the mesh's tensor axis ({T})")


def param_specs(cfg: model.Config, tensor: int) -> dict:
    """PartitionSpecs of the serving layout (see the module doc), in the params' tree structure."""
    kv = P(None, None, None, None) if replicated_kv(cfg, tensor) else P(None, None, "tensor", None)
    return {
        "embed": P("tensor", None),  # E[V_tensor, D]
        "layers": {
            "attn_norm": P(None, None), "mlp_norm": P(None, None),
            "wq": P(None, None, "tensor", None),  # [L, D, N_tensor, H]
            "wk": kv, "wv": kv,  # [L, D, K_tensor, H], or whole when kv heads are replicated
            "wo": P(None, "tensor", None, None),  # [L, N_tensor, H, D]
            "w_gate": P(None, None, "tensor"), "w_up": P(None, None, "tensor"),  # [L, D, F_tensor]
            "w_down": P(None, "tensor", None),  # [L, F_tensor, D]
        },
        "norm": P(None),
        "output": P(None, "tensor"),  # W[D, V_tensor]
    }


def param_structs(cfg: model.Config, mesh) -> dict:
    """ShapeDtypeStructs of the serving params (compute dtype, serving shardings): the target of a
    load and the arguments of an ahead-of-time compile."""
    specs = param_specs(cfg, mesh.shape["tensor"])
    return jax.tree.map(lambda shape, spec: jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.dtype),
                                                                 sharding=NamedSharding(mesh, spec)),
                        model.param_shapes(cfg), specs, is_leaf=lambda s: isinstance(s, tuple))


def cache_heads(cfg: model.Config, tensor: int) -> int:
    """The kv-head dim of the global cache: K, or one copy per chip when kv heads are replicated."""
    return max(cfg.n_kv_heads, tensor)


def cache_spec() -> P:
    return P(None, BATCH, None, "tensor", None)  # [L, B_(data,fsdp), S, K_tensor, H]


def _all_reduce(out):
    # a block's output is a partial sum over this chip's heads or F slice -> all-reduce over tensor
    return jax.lax.psum(out, "tensor")


def _local_kv(lp, cfg: model.Config):
    """One layer's weights with wk/wv of this chip's kv heads: as sharded, or where kv heads are
    replicated (whole wk/wv on every chip), the one head this chip's query heads read."""
    tensor = jax.lax.axis_size("tensor")
    if not replicated_kv(cfg, tensor):
        return lp
    head = jax.lax.axis_index("tensor") // (tensor // cfg.n_kv_heads)
    return {**lp, "wk": jax.lax.dynamic_slice_in_dim(lp["wk"], head, 1, axis=1),
            "wv": jax.lax.dynamic_slice_in_dim(lp["wv"], head, 1, axis=1)}


def _embed(params, tokens):
    # vocab-parallel lookup: rows[B, T, D] {one shard holds each row} -> all-reduce over tensor ->
    # x[B, T, D] on every chip of the tensor group (no sequence split in decoding)
    return jax.lax.psum(embed_rows(params["embed"], tokens), "tensor")


def _device_step(params, tokens, lengths, cache, start, slot, cfg: model.Config):
    """One device's program: tokens [B_b, T] at positions start + (0..T-1) per row (a prefill
    chunk: start its offset; decode: T 1, start each row's position) -> logits [B_b, V] at each
    row's last prompt token (position lengths - 1; the chunk's nearest position when it lies
    outside), and the cache with these positions written. Positions past the cache are not
    written (a masked row: start = the cache's size). With `slot` (a cache row), tokens [1, T] are
    one row's prefill chunk into that row of the cache, every other row untouched."""
    B, T = tokens.shape
    S, local_rows = cache["k"].shape[2], cache["k"].shape[1]
    positions = start[:, None] + jnp.arange(T)[None, :]  # [B, T]
    rope = model.rope_tables(positions, cfg.head_dim, cfg.rope_theta)  # per row: (B, T, H)
    # each row sees the cache up to its own position (prefill: its prompt's causal triangle)
    mask = jnp.arange(S)[None, None, :] <= positions[:, :, None]  # [B, T, S]
    if slot is None:
        rows, owner, view = jnp.arange(B)[:, None], None, lambda c: c
    else:  # the slot's row on the chips of its batch shard; on the others an out-of-range row: writes drop
        local = slot - jax.lax.axis_index(BATCH) * local_rows
        owner = (0 <= local) & (local < local_rows)
        rows = jnp.where(owner, local, local_rows)[None, None]
        view = lambda c: jax.lax.dynamic_slice_in_dim(c, jnp.clip(local, 0, local_rows - 1), 1, axis=0)

    x = _embed(params, tokens)

    # The whole cache rides through the layer loop and each layer writes its rows in place: a scan
    # that returned each layer's cache would stack them into a new one, a copy of the whole cache
    # per step, which cost more than the step itself (BENCHMARKS.md section 7).
    def layer(carry, lp):
        x, i, k_cache, v_cache = carry  # caches [L, B_local, S, K_local, H]; i: this layer
        lp = _local_kv(lp, cfg)
        written = {}

        def cached(q, k, v):  # write this step's k/v at each row's positions, attend over its cache row
            written["k"] = k_cache.at[i, rows, positions].set(k.astype(k_cache.dtype), mode="drop")
            written["v"] = v_cache.at[i, rows, positions].set(v.astype(v_cache.dtype), mode="drop")
            return attention.attend(q, view(written["k"][i]), view(written["v"][i]), mask)

        x = model.layer(lp, x, cfg, rope, cached, scatter=_all_reduce)
        return (x, i + 1, written["k"], written["v"]), None

    (x, _, k, v), _ = jax.lax.scan(layer, (x, 0, cache["k"], cache["v"]), params["layers"])
    last = x[jnp.arange(B), jnp.clip(lengths - 1 - start, 0, T - 1)]  # each row's last prompt token
    h = model.rms_norm(last[:, None], params["norm"], cfg.norm_eps)
    logits = model.logits_from_hidden(params, h, cfg)[:, 0]  # [B, V_tensor] fp32
    # logits[B, V_tensor] -> all-gather over tensor -> [B, V]: every chip samples the same token
    logits = jax.lax.all_gather(logits, "tensor", axis=1, tiled=True)
    if owner is not None:  # logits[1, V] {right on the slot's chips only} -> all-reduce over data, fsdp -> every chip
        logits = jax.lax.psum(jnp.where(owner, logits, 0.0), BATCH)
    return logits, {"k": k, "v": v}


def forward(params, tokens, lengths, cache, start, cfg: model.Config, mesh, slot=None):
    """The step's program over the mesh (traced inside `step`; tests call it under jit): logits
    [B, V] fp32 at each row's last prompt token (see _device_step) and the cache with the tokens'
    positions written; with `slot`, tokens [1, T] go to that row of the cache (its prefill)."""
    cache_specs = {"k": cache_spec(), "v": cache_spec()}
    params_spec = param_specs(cfg, mesh.shape["tensor"])
    if slot is None:
        rows = P(BATCH)
        return jax.shard_map(partial(_device_step, slot=None, cfg=cfg), mesh=mesh,
                             in_specs=(params_spec, rows, rows, cache_specs, rows), out_specs=(rows, cache_specs),
                             check_vma=False)(params, tokens, lengths, cache, start)
    return jax.shard_map(partial(_device_step, cfg=cfg), mesh=mesh,  # one row, on every chip
                         in_specs=(params_spec, P(), P(), cache_specs, P(), P()), out_specs=(P(), cache_specs),
                         check_vma=False)(params, tokens, lengths, cache, start, slot)


def sample_logits(logits, keys, temperature, top_k, top_p):
    """Next tokens (B,) from logits (B, V), each row with its own key and options (arrays (B,), or
    one value for all rows): argmax at temperature 0, else a draw from the softmax of logits /
    temperature restricted to the top_k tokens (0 = all), then to the fewest of those whose
    probability reaches top_p (1 = all). The options are traced values: one compiled step serves all."""
    B, V = logits.shape
    temperature, top_k, top_p = (jnp.broadcast_to(jnp.asarray(o), (B,))[:, None] for o in (temperature, top_k, top_p))
    scaled = logits / jnp.maximum(temperature, 1e-6)
    desc = jnp.sort(scaled, axis=-1)[:, ::-1]
    in_top_k = jnp.arange(V) < jnp.where(top_k > 0, top_k, V)
    probs = jax.nn.softmax(jnp.where(in_top_k, desc, -jnp.inf), axis=-1)
    kept = in_top_k & (jnp.cumsum(probs, axis=-1) - probs < top_p)  # before reaching top_p, and the one that does
    cutoff = jnp.min(jnp.where(kept, desc, jnp.inf), axis=-1, keepdims=True)
    draw = jax.vmap(jax.random.categorical)(jnp.broadcast_to(keys, (B,)), jnp.where(scaled < cutoff, -jnp.inf, scaled))
    return jnp.where(temperature[:, 0] == 0, jnp.argmax(logits, axis=-1), draw)


def row_seed(*entropy: int) -> int:
    """A row's 32-bit sampling seed from any ints (a request's seed; generate's seed and row)."""
    return int(np.random.SeedSequence([e % 2 ** 64 for e in entropy]).generate_state(1)[0])


def check_options(temperature, top_k, top_p):
    """Refuse sampling options that cannot be right (top_p=0 would keep no token at all): called
    by the commands that take them, before anything is loaded."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature}: must be a finite number >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}: must be >= 0 (0 = all tokens)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must lie in (0, 1] (1 = all tokens)")


@partial(jax.jit, static_argnames=("cfg", "mesh", "vocab_size"), donate_argnames="cache")
def step(params, tokens, lengths, cache, start, sampling, cfg, mesh, vocab_size, slot=None):
    """The jitted step over the mesh: a prefill chunk (with `slot`: one row's, into that cache row)
    or a decode step, then each row's next token. sampling: per row (temperature, top_k, top_p,
    seed, index); a row's key is its seed folded with the index of the token it draws, so a row's
    draws depend on neither the step count nor its neighbours."""
    logits, cache = forward(params, tokens, lengths, cache, start, cfg, mesh, slot)
    temperature, top_k, top_p, seed, index = sampling
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed, index)
    logits = logits[:, :vocab_size]
    # greedy steps (MINT, lm-eval) skip sample_logits' sort of the vocabulary, which costs as much as a row's step
    token = jax.lax.cond(jnp.any(temperature > 0), lambda: sample_logits(logits, keys, temperature, top_k, top_p),
                         lambda: jnp.argmax(logits, axis=-1)).astype(jnp.int32)
    # every process reads every row's token (multi-host: the rows live on other hosts too)
    return jax.lax.with_sharding_constraint(token, NamedSharding(mesh, P())), cache


def reshard(params, cfg: model.Config, mesh):
    """Params in any layout (training's fp32, sharded over its mesh or any other devices) -> this
    module's layout on `mesh`, in the compute dtype (the cast model.layer would make at each matmul,
    made once, where the params are)."""
    cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(cfg.dtype), p))(params)
    return jax.device_put(cast, jax.tree.map(lambda s: s.sharding, param_structs(cfg, mesh)))


def new_cache(cfg: model.Config, mesh, rows: int, size: int):
    """A zero KV cache {k, v}: (L, rows, size, kv heads, H) in the compute dtype, sharded."""
    shape = (cfg.n_layers, rows, size, cache_heads(cfg, mesh.shape["tensor"]), cfg.head_dim)
    sharding = NamedSharding(mesh, cache_spec())
    zeros = jax.jit(lambda: jnp.zeros(shape, cfg.dtype), out_shardings=sharding)
    return {"k": zeros(), "v": zeros()}


class Engine:
    """Continuous batching over `step`: `slots` rows share one KV cache of `context` positions.

        engine = decode.Engine(params, cfg, mesh, slots=8, context=4096)
        engine.join(slot, prompt, 256, temperature=0.7, seed=decode.row_seed(1), stop_tokens=(eos,))
        for slot, token, finish in engine.advance(): ...   # finish: None, "stop" or "length"

    A prompt joins a free slot and is prefilled into that slot's row of the cache, one chunk per
    `advance`, while the other rows keep their positions; each `advance` then runs one decode step
    of all slots (the free and the prefilling ones masked: nothing of theirs is written). A row
    leaves at one of its stop tokens (included), its max_new_tokens or the end of the context,
    freeing its slot, or when `leave` is called. Each row samples with its own options and a key
    of its seed and token index: a seeded row's tokens depend on neither its slot nor its
    neighbours. The engine's state lives on the host and changes only by these calls, so the
    processes of a multi-host mesh stay in step by making the same calls in the same order.

    A free slot's cache row keeps what its last row wrote: a prompt that starts with those tokens
    (the next turn of a conversation: the last prompt, the reply, then the new message) is
    prefilled from where they end (`reusable`), and the scheduler gives a request the free slot
    that holds most of its prompt. Positions past them are overwritten before any row reads them
    (a row attends only up to its own position). `counts`: prefill and decode steps run, tokens
    produced, prompt tokens reused."""

    def __init__(self, params, cfg: model.Config, mesh, slots: int, context: int, *, vocab_size=None,
                 prefill_chunk: int = 512):
        check(cfg, mesh.shape)
        ways = math.prod(mesh.shape[a] for a in BATCH)
        if slots < 1 or slots % ways:
            raise ValueError(f"slots={slots} must be a positive multiple of the mesh's batch ways (data x fsdp = {ways})")
        if not 1 < context <= cfg.max_seq_len:
            raise ValueError(f"context={context} must lie in [2, the model's context of {cfg.max_seq_len}]")
        self.params, self.context, self.chunk = params, context, min(prefill_chunk, context)
        self.options = dict(cfg=cfg, mesh=mesh, vocab_size=vocab_size or cfg.vocab_size)
        self.cache = new_cache(cfg, mesh, slots, context)
        self.rows = [None] * slots  # per slot: None (free) or the row's dict
        self.kept = [np.zeros(0, np.int32)] * slots  # per free slot: the tokens its cache row holds
        self.counts = {"prefill_steps": 0, "decode_steps": 0, "tokens": 0, "reused_tokens": 0}

    def join(self, slot: int, prompt: list, max_new_tokens: int, *, temperature=0.0, top_k=0, top_p=1.0, seed=0,
             stop_tokens=()):
        """Start `prompt` (at least 1 token, fewer than the context) in the free `slot`; seed: the
        row's 32-bit sampling seed (row_seed)."""
        if self.rows[slot] is not None:
            raise ValueError(f"slot {slot} is taken")
        if not 0 < len(prompt) < self.context or max_new_tokens < 1:
            raise ValueError(f"a prompt of {len(prompt)} tokens and max_new_tokens={max_new_tokens}: the prompt "
                             f"must have at least 1 token and leave room in the context of {self.context}")
        reused = self.reusable(slot, prompt)
        self.counts["reused_tokens"] += reused
        self.rows[slot] = {"prompt": np.asarray(prompt, np.int32), "prefilled": reused, "out": [],
                           "stop": set(stop_tokens), "limit": min(max_new_tokens, self.context - len(prompt)),
                           "sampling": (temperature, top_k, top_p, seed)}

    def reusable(self, slot: int, prompt: list) -> int:
        """How many of the prompt's first tokens the free slot's cache row holds already (all but
        the last at most: the step of the last prompt token gives the first new one)."""
        kept, prompt = self.kept[slot], np.asarray(prompt, np.int32)
        n = min(len(kept), len(prompt) - 1)
        differ = np.flatnonzero(kept[:n] != prompt[:n])
        return int(differ[0]) if differ.size else n

    def leave(self, slot: int):
        """The slot's row ends; its cache keeps the prompt tokens prefilled and the tokens decoded
        (each but the newest, which no step has written yet)."""
        row = self.rows[slot]
        if row is not None:
            self.kept[slot] = np.concatenate([row["prompt"][:row["prefilled"]], np.asarray(row["out"][:-1], np.int32)])
        self.rows[slot] = None

    def free_slots(self) -> list[int]:
        return [s for s, row in enumerate(self.rows) if row is None]

    def busy(self) -> bool:
        return any(row is not None for row in self.rows)

    def _sampling(self, rows: list) -> tuple:
        """The per-row sampling arrays of `step` (a free row: greedy, index 0)."""
        t, k, p, seed = zip(*[r["sampling"] if r else (0.0, 0, 1.0, 0) for r in rows])
        index = [len(r["out"]) if r else 0 for r in rows]
        return (np.array(t, np.float32), np.array(k, np.int32), np.array(p, np.float32), np.array(seed, np.uint32),
                np.array(index, np.int32))

    def _emit(self, slot: int, token) -> tuple:
        row = self.rows[slot]
        row["out"].append(int(token))
        self.counts["tokens"] += 1
        finish = "stop" if row["out"][-1] in row["stop"] else "length" if len(row["out"]) >= row["limit"] else None
        if finish:
            self.leave(slot)
        return slot, row["out"][-1], finish

    def advance(self) -> list[tuple[int, int, str | None]]:
        """One prefill chunk of each slot still prefilling (the chunk of its last prompt token gives
        its first token), then one decode step of every slot that has tokens: [(slot, token,
        finish)], finish None, "stop" (a stop token) or "length" (max_new_tokens or the context)."""
        events = []
        for slot, row in enumerate(self.rows):
            if row is None or row["prefilled"] >= len(row["prompt"]):
                continue
            n, offset = len(row["prompt"]), row["prefilled"]
            # padded at the end to a power of two, 16 to `chunk`: a short prompt costs little, few shapes compile
            size = min(self.chunk, max(16, 1 << (n - offset - 1).bit_length()))
            tokens = np.zeros((1, size), np.int32)
            tokens[0, :min(size, n - offset)] = row["prompt"][offset:offset + size]
            token, self.cache = step(self.params, tokens, np.array([n], np.int32), self.cache,
                                     np.array([offset], np.int32), self._sampling([row]), slot=np.int32(slot),
                                     **self.options)
            row["prefilled"] += size
            self.counts["prefill_steps"] += 1
            if row["prefilled"] >= n:
                events.append(self._emit(slot, np.asarray(token)[0]))
        decoding = [s for s, row in enumerate(self.rows) if row is not None and row["out"]]
        if not decoding:
            return events
        B = len(self.rows)
        tokens, start = np.zeros((B, 1), np.int32), np.full(B, self.context, np.int32)  # masked: written nowhere
        for s in decoding:  # a row's newest token sits at prompt + out - 1
            tokens[s, 0], start[s] = self.rows[s]["out"][-1], len(self.rows[s]["prompt"]) + len(self.rows[s]["out"]) - 1
        sampling = self._sampling([row if s in decoding else None for s, row in enumerate(self.rows)])
        new, self.cache = step(self.params, tokens, np.ones(B, np.int32), self.cache, start, sampling, **self.options)
        self.counts["decode_steps"] += 1
        new = np.asarray(new)
        return events + [self._emit(s, new[s]) for s in decoding]


def generate(params, cfg: model.Config, mesh, prompts: list, max_new_tokens: int, *, temperature=0.0, top_k=0,
             top_p=1.0, seed=0, stop_tokens=(), vocab_size=None, prefill_chunk=512) -> list[list[int]]:
    """The new tokens of each prompt (lists of ids of any lengths), all started at once in an
    Engine of one slot per prompt (rounded up to the mesh's batch ways). Each row stops at its own
    stop token (included), after max_new_tokens, or when its context is full; row r samples with
    row_seed(seed, r). vocab_size: sample only ids below it (a padded vocabulary's extra rows are
    never real tokens). The cache holds the longest prompt plus max_new_tokens, rounded up to 256
    positions (few compiled sizes), at most the context."""
    check(cfg, mesh.shape)
    lengths = [len(p) for p in prompts]
    if not prompts or not all(0 < n < cfg.max_seq_len for n in lengths):
        raise ValueError(f"prompts of {lengths} tokens: each must have at least 1 and leave room in the "
                         f"model's context of {cfg.max_seq_len} tokens")
    out = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return out
    ways = math.prod(mesh.shape[a] for a in BATCH)
    size = min(cfg.max_seq_len, -(-(max(lengths) + max_new_tokens) // 256) * 256)
    engine = Engine(params, cfg, mesh, -(-len(prompts) // ways) * ways, size, vocab_size=vocab_size,
                    prefill_chunk=min(prefill_chunk, max(lengths)))
    for r, prompt in enumerate(prompts):
        engine.join(r, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=row_seed(seed, r), stop_tokens=stop_tokens)
    while engine.busy():
        for r, token, _ in engine.advance():
            out[r].append(token)
    return out


def _device_score(params, inputs, targets, cfg: model.Config, platform: str):
    """One device's program: inputs, targets [B_b, T] -> log p(targets[:, t] | inputs[:, :t+1])
    [B_b, T] and whether each target is the argmax, through model.layer with training's causal
    attention core (on TPU the splash kernel: T a multiple of 128)."""
    rope = model.rope_tables(np.arange(inputs.shape[1]), cfg.head_dim, cfg.rope_theta)
    attend = model.causal(cfg, platform)
    layer = lambda x, lp: model.layer(_local_kv(lp, cfg), x, cfg, rope, attend, scatter=_all_reduce)
    x = model.scan_layers(layer, _embed(params, inputs), params["layers"], "none")
    h = model.rms_norm(x, params["norm"], cfg.norm_eps)
    return target_logprobs(model.logits_from_hidden(params, h, cfg), targets)


@partial(jax.jit, static_argnames=("cfg", "mesh"))
def score(params, inputs, targets, cfg: model.Config, mesh):
    """(log-probabilities [B, T] of targets [B, T] after each prefix of inputs [B, T], is-argmax
    flags): the loglikelihoods of evaluation (harness.py), on the mesh of generation, returned to
    every process. B must divide by the mesh's batch ways (data x fsdp)."""
    rows = P(BATCH)
    out = jax.shard_map(partial(_device_score, cfg=cfg, platform=mesh.devices.flat[0].platform), mesh=mesh,
                        in_specs=(param_specs(cfg, mesh.shape["tensor"]), rows, rows), out_specs=(rows, rows),
                        check_vma=False)(params, inputs, targets)
    return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P()))
