"""One layer's causal attention, forward + backward: our implementations against the plain masked
softmax (attention.causal_attention, the reference, differentiated by JAX) and torch's
`scaled_dot_product_attention(is_causal=True)` (what Hugging Face's Llama calls, a fused kernel).

    python bench/attention.py                   # batch 8, seq 512, 8 heads on 8 kv heads of 64, fp32, CPU
    python bench/attention.py --kv_heads 2      # grouped-query
    python bench/attention.py --block 64        # another query block size for ours
    python bench/attention.py --smoke           # tiny sizes (tests/test_bench.py runs it)

Each side computes the output and the gradients of sum(out * dout) w.r.t. q, k, v (a fixed random
dout), jitted for JAX; the best of `--repeats` runs after a warm-up, all in one process on the
same cores. The first line after the table checks ours against the plain form (max |diff| of
the gradients). Last line: one JSON object with milliseconds per side.

`measure` is the same measurement for any dtype and device; bench/gpu.py calls it on a GPU, where
it also times cuDNN (implementation "cudnn") and checks every implementation against an fp32
reference.
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


def causal_flops(B, T, N, H):
    """FLOPs of causal attention forward + backward, FlashAttention's count: the forward's two
    matmuls over the visible half of the scores (2 B N T^2 H), the backward 2.5 times that."""
    return 3.5 * 2 * B * N * T * T * H


def measure(B, T, N, K, H, dtype="float32", implementations=("jnp", "plain"), block=128, repeats=7,
            torch_device="cpu", check=False):
    """Time forward + backward of each implementation ("jnp", "plain", "cudnn", and torch's
    "sdpa" when torch_device is given) on the same random inputs in `dtype`.
    -> {"ms": {name: ms}} (with repeats > 0) and, with check, {"errors": {name: {out, dq, dk, dv}}}:
    max |x - reference| / max |reference|, the reference being the plain form in fp32 on the same
    (dtype-rounded) inputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, ROOT)
    import attention

    rng = np.random.default_rng(0)
    q, dout = (jnp.asarray(rng.standard_normal((B, T, N, H), np.float32), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, H), np.float32), dtype) for _ in range(2))
    kernels = {"jnp": lambda q, k, v: attention.flash_attention(q, k, v, block=block),
               "plain": attention.causal_attention,
               "cudnn": attention.cudnn_attention}

    def forward_backward(attn, dtype=dtype):
        def run(q, k, v, dout):
            out, vjp = jax.vjp(attn, q, k, v)
            return (out, *vjp(dout))
        cast = lambda x: x.astype(dtype)
        fn = jax.jit(run)
        return lambda: jax.block_until_ready(fn(cast(q), cast(k), cast(v), cast(dout)))

    result = {"ms": {}}
    if check:
        reference = [np.asarray(x, np.float32) for x in forward_backward(kernels["plain"], jnp.float32)()]
        result["errors"] = {}
    for name in implementations:
        if name == "sdpa":
            continue
        run = forward_backward(kernels[name])
        if check:
            got = [np.asarray(x, np.float32) for x in run()]
            result["errors"][name] = {part: float(np.abs(g - r).max() / np.abs(r).max())
                                      for part, g, r in zip(("out", "dq", "dk", "dv"), got, reference)}
        if repeats:
            result["ms"][name] = 1e3 * best_of(run, repeats)
    if "sdpa" in implementations and repeats:
        result["ms"]["sdpa"] = 1e3 * best_of(torch_sdpa(q, k, v, dout, torch_device), repeats)
    return result


def torch_sdpa(q, k, v, dout, device):
    """torch's fused causal attention forward + backward on copies of the JAX arrays, as a
    function that returns when the device is done."""
    import numpy as np
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[str(q.dtype)]
    to_torch = lambda x: torch.tensor(np.asarray(x, np.float32), device=device, dtype=dtype).transpose(1, 2)
    tq, tk, tv = (to_torch(x).requires_grad_() for x in (q, k, v))  # (B, heads, T, H)
    tdout = to_torch(dout)
    gqa = tk.shape[1] != tq.shape[1]

    def sdpa():
        for t in (tq, tk, tv):
            t.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=gqa)
        out.backward(tdout)
        if device != "cpu":
            torch.cuda.synchronize()
    return sdpa


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
    import torch

    B, T, N, K, H = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    result = measure(B, T, N, K, H, implementations=("jnp", "plain", "sdpa"), block=args.block,
                     repeats=args.repeats, check=True)
    ms = {f"{'ours' if name == 'jnp' else 'torch_sdpa' if name == 'sdpa' else name}_ms": value
          for name, value in result["ms"].items()}
    # ours against plain, both fp32: the largest gradient difference, relative to the gradient's scale
    diff = max(result["errors"]["jnp"][part] for part in ("dq", "dk", "dv"))
    print(f"causal attention fwd+bwd, batch {B} x seq {T}, {N} heads on {K} kv heads of {H}, fp32, "
          f"{torch.get_num_threads()} torch threads; ours: blocks of {args.block} rows")
    for name, value in ms.items():
        print(f"  {name[:-3]:11s} {value:8.1f} ms")
    print(f"ours against plain: max |grad diff| {diff:.1e} of the gradient's largest value")
    print(json.dumps({**ms, "grad_max_rel_diff": diff, "ours_over_sdpa": ms["torch_sdpa_ms"] / ms["ours_ms"],
                      "dims": {k: getattr(args, k) for k in ("batch", "seq", "heads", "kv_heads", "head_dim", "block")},
                      "smoke": args.smoke}))


if __name__ == "__main__":
    main(sys.argv[1:])
