"""One layer's causal attention, forward + backward, on the CPU: attention.causal_attention against
the plain masked softmax (attention.attend under a causal mask, differentiated by JAX) and torch's
`scaled_dot_product_attention(is_causal=True)` (what Hugging Face's Llama calls, a fused kernel).

    python bench/attention.py                   # batch 8, seq 512, 8 heads on 8 kv heads of 64, fp32
    python bench/attention.py --kv_heads 2      # grouped-query
    python bench/attention.py --block 64        # another query block size for ours
    python bench/attention.py --smoke           # tiny sizes (tests/test_bench.py runs it)

Each side computes the output and the gradients of sum(out * dout) w.r.t. q, k, v (a fixed random
dout), jitted for JAX; the best of `--repeats` runs after a warm-up, all in one process on the
same cores. The first line after the table checks ours against the plain form (max |diff| of
the gradients). Last line: one JSON object with milliseconds per side.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_of(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("batch", 8), ("seq", 512), ("heads", 8), ("kv_heads", 8), ("head_dim", 64),
                          ("block", 128), ("repeats", 7)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.heads, args.kv_heads, args.head_dim, args.block, args.repeats = 2, 32, 4, 2, 8, 8, 1
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import attention

    B, T, N, K, H = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(0)
    q, dout = (rng.standard_normal((B, T, N, H), np.float32) for _ in range(2))
    k, v = (rng.standard_normal((B, T, K, H), np.float32) for _ in range(2))
    mask = jnp.tril(jnp.ones((T, T), bool))[None]

    def jax_side(attn):
        grads = jax.jit(lambda q, k, v: jax.vjp(attn, q, k, v)[1](jnp.asarray(dout)))
        return lambda: jax.block_until_ready(grads(q, k, v))

    ours = jax_side(lambda q, k, v: attention.causal_attention(q, k, v, block=args.block))
    plain = jax_side(lambda q, k, v: attention.attend(q, k, v, mask))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ours(), plain()))

    tq, tk, tv = (torch.tensor(x).transpose(1, 2).requires_grad_() for x in (q, k, v))  # (B, heads, T, H)
    tdout = torch.tensor(dout).transpose(1, 2)

    def sdpa():
        for t in (tq, tk, tv):
            t.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=K != N)
        out.backward(tdout)

    ms = {name: 1e3 * best_of(fn, args.repeats) for name, fn in
          [("ours_ms", ours), ("plain_ms", plain), ("torch_sdpa_ms", sdpa)]}
    print(f"causal attention fwd+bwd, batch {B} x seq {T}, {N} heads on {K} kv heads of {H}, fp32, "
          f"{torch.get_num_threads()} torch threads; ours: blocks of {args.block} rows")
    for name, value in ms.items():
        print(f"  {name[:-3]:11s} {value:8.1f} ms")
    print(f"ours against plain: max |grad diff| {diff:.1e}")
    print(json.dumps({**ms, "grad_max_abs_diff": diff, "ours_over_sdpa": ms["torch_sdpa_ms"] / ms["ours_ms"],
                      "dims": {k: getattr(args, k) for k in ("batch", "seq", "heads", "kv_heads", "head_dim", "block")},
                      "smoke": args.smoke}))


if __name__ == "__main__":
    main(sys.argv[1:])
