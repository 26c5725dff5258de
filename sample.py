"""Generate from a checkpoint with a KV cache: prefill the prompt once, then one jitted decode step
reused for every new token.

    python sample.py out/tiny --prompt "def fibonacci(n):"                 # a training out_dir: newest checkpoint
    python sample.py out/tiny_chat --chat --prompt 'What does `shlex.quote` do?'
    python sample.py out/tiny_chat                                          # interactive chat
    python sample.py Llama-2-7b-hf --prompt "..." --temperature 0.8 --top_p 0.95 --seed 1

Sources: a training out_dir (its newest complete checkpoint) or one checkpoint directory, saved on
any mesh: the params are restored onto one device (the checkpoint's meta.json gives the model
config; its run config the tokenizer, with Lemur-Chat's tokens for sft.py runs), or a Hugging Face
Llama directory (tokenizer.model and, if present, added_tokens.json in it). `--chat` wraps the
prompt in ChatML (sft.encode_prompt) and stops at `<|im_end|>`; without `--prompt` it chats.

Decoding: greedy (temperature 0, the default) or sampling with temperature, top-k and top-p
(nucleus), from a seed. The cache holds k/v (L, B, S, K, H) in the compute dtype for S = the
prompt plus max_new_tokens rounded up to 256 (so few cache sizes compile), at most the context.
The layers are model.py's blocks (rms_norm, rope, attend, mlp, the weights layout) with their own
cached attention here, so model.py's training path carries no cache. Decoding stops at a stop
token (included in the output), after max_new_tokens or when the context is full.
"""
import argparse
import json
import os
from functools import partial

import jax
import jax.numpy as jnp

import checkpoint
import data
import model
import sft


def forward_cached(params, tokens, cache, pos, cfg: model.Config):
    """tokens (B, T) at positions pos..pos+T-1, the cache holding positions < pos -> logits of the
    last position (B, V) fp32 and the cache with these T positions written."""
    dtype = jnp.dtype(cfg.dtype)
    c = lambda w: w.astype(dtype)
    T, S = tokens.shape[1], cache["k"].shape[2]
    cos, sin = model.rope_tables(pos + jnp.arange(T), cfg.head_dim, cfg.rope_theta)
    mask = (jnp.arange(S)[None, :] <= pos + jnp.arange(T)[:, None])[None]  # (1, T, S): causal over the cache

    def layer(x, inputs):
        lp, k_cache, v_cache = inputs  # caches (B, S, K, H)
        h = model.rms_norm(x, lp["attn_norm"], cfg.norm_eps)
        q = model.apply_rope(jnp.einsum("btd,dnh->btnh", h, c(lp["wq"])), cos, sin)
        k = model.apply_rope(jnp.einsum("btd,dkh->btkh", h, c(lp["wk"])), cos, sin)
        v = jnp.einsum("btd,dkh->btkh", h, c(lp["wv"]))
        k_cache = jax.lax.dynamic_update_slice(k_cache, k, (0, pos, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v, (0, pos, 0, 0))
        x = x + jnp.einsum("btnh,nhd->btd", model.attend(q, k_cache, v_cache, mask), c(lp["wo"]))
        x = x + model.mlp(lp, model.rms_norm(x, lp["mlp_norm"], cfg.norm_eps), dtype)
        return x, (k_cache, v_cache)

    x = params["embed"].astype(dtype)[tokens]  # (B, T, D)
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


@partial(jax.jit, static_argnames=("cfg", "vocab_size"), donate_argnames="cache")
def _next(params, tokens, cache, pos, key, opts, cfg, vocab_size):
    """Prefill (T = prompt length) or decode (T = 1, the same compiled step for every token)."""
    logits, cache = forward_cached(params, tokens, cache, pos, cfg)
    return sample_logits(logits[:, :vocab_size], key, *opts).astype(jnp.int32), cache


def generate(params, cfg: model.Config, prompt_tokens, max_new_tokens: int, *, temperature=0.0, top_k=0,
             top_p=1.0, seed=0, stop_tokens=(), vocab_size=None) -> list[int]:
    """The new tokens after prompt_tokens (a list of ids). vocab_size: sample only ids below it
    (a padded vocabulary's extra rows are never real tokens)."""
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


def run_tokenizer(run: dict) -> data.Tokenizer:
    """The tokenizer a training run used, from its config (meta.json's "config")."""
    base = run["tokenizer"] or data.demo_corpus(data.demo_dir(run["out_dir"]))[1]  # as in training
    return sft.chat_tokenizer(base) if "epochs" in run else data.Tokenizer(base)  # an SFTConfig


def load(path: str):
    """(params on one device, model config, tokenizer) of a training out_dir or checkpoint
    directory, or of a Hugging Face Llama directory."""
    if os.path.exists(os.path.join(path, "COMMIT")) or checkpoint.committed(path):
        ckpt = checkpoint.latest(path)
        with open(os.path.join(ckpt, "meta.json")) as f:
            meta = json.load(f)
        cfg, run = model.Config(**meta["model"]), meta["config"]
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                              jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0))))
        params = checkpoint.restore(ckpt, {"params": target})[0]["params"]
        return params, cfg, run_tokenizer(run)
    import convert
    cfg, params = convert.load_hf(path)
    added = {}
    if os.path.isfile(os.path.join(path, "added_tokens.json")):
        with open(os.path.join(path, "added_tokens.json")) as f:
            added = json.load(f)
    tokenizer = data.Tokenizer(os.path.join(path, "tokenizer.model"), added_tokens=tuple(sorted(added, key=added.get)))
    if any(tokenizer.added[t] != i for t, i in added.items()):
        raise ValueError(f"{path}/added_tokens.json: ids must follow the sentencepiece vocabulary without gaps")
    return params, cfg, tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate text from a checkpoint or a Hugging Face directory.")
    parser.add_argument("path", help="training out_dir, checkpoint directory or Hugging Face Llama directory")
    parser.add_argument("--prompt", help="generate once from this prompt (default: interactive chat)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in ChatML, stop at <|im_end|>")
    parser.add_argument("--system", default="", help="a system message for chat")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    params, cfg, tokenizer = load(args.path)
    chat = args.chat or args.prompt is None
    if chat and "<|im_end|>" not in tokenizer.added:
        raise SystemExit(f"{args.path}: not a chat model (its tokenizer has no <|im_end|>); pass --prompt without --chat")
    stop = (tokenizer.added["<|im_end|>"], tokenizer.eos_id) if chat else (tokenizer.eos_id,)
    opts = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_tokens=stop,
                vocab_size=tokenizer.vocab_size)
    history = [("system", args.system)] if args.system else []

    def reply(prompt: str) -> str:
        history.append(("user", prompt))
        tokens = sft.encode_prompt(history, tokenizer) if chat else [tokenizer.bos_id] + tokenizer.encode(prompt)
        out = generate(params, cfg, tokens, args.max_new_tokens, seed=args.seed, **opts)
        text = tokenizer.decode(out[:-1] if out and out[-1] in stop else out)
        history.append(("assistant", text))
        return text

    if args.prompt is not None:
        print(reply(args.prompt) if chat else args.prompt + reply(args.prompt))
        return
    print("chat: an empty line or Ctrl-D ends it")
    while (prompt := input_or_none("user> ")):
        print(f"assistant> {reply(prompt)}")


def input_or_none(prefix: str):
    try:
        return input(prefix)
    except EOFError:
        return None


if __name__ == "__main__":
    main()
