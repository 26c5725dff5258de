"""CPU train-step throughput: our jitted step against Hugging Face `LlamaForCausalLM` + torch AdamW.

    python bench/step.py                    # dim 512, 8 layers, 8 heads, seq 512, batch 8, fp32
    python bench/step.py --kv_heads 2       # the grouped-query variant
    python bench/step.py --remat full       # our default remat policy instead of the CPU choice
    python bench/step.py --smoke            # tiny sizes; tests/test_bench.py runs it so it cannot rot
    python bench/step.py --xla_flags=--xla_cpu_experimental_ynn_fusion_type=   # extra XLA flags (ours)
    python bench/step.py --against ../other_checkout   # ours against ours at another commit, not HF

Ours: train.make_train_step (sharding.py's shard_map program on a (1, 1, 1) mesh, clip + Adam,
donated state) on one microbatch of `batch` rows. Model knobs: remat "none" by default (a CPU has
memory to spare, so nothing is recomputed; `--remat` changes it), compute dtype fp32.
Theirs: transformers' LlamaForCausalLM (same dims, untied embeddings, its default attention
implementation), model.train(), loss from `labels=`, loss.backward(), clip_grad_norm_(1.0),
torch.optim.AdamW(betas=(0.9, 0.95), weight_decay=0), zero_grad(set_to_none=True).
`--dtype bfloat16` computes in bf16 on both sides over fp32 params (torch.autocast for HF);
`--device gpu`, `--attention`, `--hf_attention`, `--fused_adamw` and `--torch_compile` are the
settings of bench/gpu.py, which calls `ours` and `hf` below on one GPU. `--against DIR` makes
the other side ours again, from the checkout in DIR (another commit, a variant of the math), so a
change's speed is measured side by side the same way.

One worker process per side, both pinned to the same first `--threads` cores
(os.sched_setaffinity, like taskset) plus torch.set_num_threads(threads); XLA sizes its CPU thread
pool from the cores the process may run on, so both sides get the same cores. XLA_FLAGS from the
environment (plus `--xla_flags`) reach our worker and are printed in the JSON; by default none.
Each worker builds its model, compiles/warms up, then waits; the parent asks them in
turn (A B A B ...) to time `--steps` steps, `--repeats` times, so load from anything else on the
machine hits both sides alike. Reported: medians of the per-run tokens/s and the median of the
per-pair ratios ours/theirs. Model FLOPs: model.flops_per_token (6 N per token + causal
attention 6 L T D), as a fraction of the fp32 matmul rate measured by a jitted 2048^3 jnp.dot in
the same worker at the same time (the best of several tries). Last line: one JSON object.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--remat", default="none", help="our model.Config.remat: none, dots or full")
    parser.add_argument("--dtype", default="float32", help="compute dtype: float32, or bfloat16 (fp32 params "
                        "on both sides: our model.Config.dtype, torch.autocast for HF)")
    parser.add_argument("--attention", default="auto", help="our model.Config.attention")
    parser.add_argument("--hf_attention", default=None, help="HF attn_implementation (default: its own)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="where both sides run")
    parser.add_argument("--fused_adamw", action="store_true", help="torch.optim.AdamW(fused=True)")
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the HF model's layers")
    parser.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for our worker (default: none)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="cores for each side")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per side, alternated")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one short run per side")
    parser.add_argument("--against", metavar="DIR", help="the other side: ours from the checkout in DIR (not HF)")
    parser.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.dim, args.layers, args.heads, args.ffn, args.vocab, args.seq, args.batch = 64, 2, 4, 128, 256, 32, 2
        args.kv_heads = min(args.kv_heads, args.heads)
        args.steps, args.repeats = 1, 1
    return args


# ----------------------------------------------------------------------------- the two workers

def model_config(args):
    """Our model.Config of the benchmark's dims (the HF side builds the same model)."""
    import model
    return model.Config(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                        n_kv_heads=args.kv_heads, ffn_dim=args.ffn, max_seq_len=args.seq, dtype=args.dtype,
                        remat=args.remat, attention=args.attention)


def ours(args):
    """Our step. Returns (step(), matmul_rate(), meta); step() runs one optimizer step to completion."""
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    sys.path.insert(0, ROOT)
    import jax
    import numpy as np

    import attention
    import config
    import model
    import sharding
    import train

    mcfg = model_config(args)
    tcfg = config.TrainConfig(model=mcfg, batch_size=args.batch, seq_len=args.seq, microbatches=1,
                              mesh=(1, 1, 1), lr=3e-4, warmup_steps=0, steps=10 ** 6)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx = train.make_optimizer(tcfg)
    state = train.init_state(tx, mcfg, mesh, jax.random.key(0))
    step_fn = train.make_train_step(tcfg, tx, mcfg, mesh)
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1), dtype=np.int32)
    batch = sharding.global_batch({"tokens": tokens}, mesh, microbatches=1)
    holder, go_on = {"state": state}, train.stop_flags(mesh, False)

    def step():
        holder["state"], metrics = step_fn(holder["state"], batch, go_on)
        return float(metrics["loss"])  # waits for the step

    n = 2048 if args.device == "cpu" else 8192
    meta = {"flops_per_token": model.flops_per_token(mcfg, args.seq), "params": model.param_count(mcfg),
            "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "attention": attention.resolve(mcfg.attention, jax.devices()[0].platform),
            "device_kind": jax.devices()[0].device_kind, "peak_memory": lambda: peak_memory(jax.devices()[0])}
    return step, lambda: matmul_rate(n, args.dtype), meta


def matmul_rate(n: int, dtype: str, calls: int = 1, tries: int = 5) -> float:
    """FLOP/s of a jitted n^3 jnp.dot in `dtype`: the best of `tries` timings of `calls` products
    queued back to back (a warm-up call first compiles)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = jnp.asarray(np.random.default_rng(1).standard_normal((n, n), np.float32), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(calls):
            out = dot(a, a)
        out.block_until_ready()
        best = min(best, time.perf_counter() - start)
    return calls * 2 * n ** 3 / best


def peak_memory(device):
    """Bytes the JAX device has held at most so far (None where the backend does not say)."""
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def hf(args):
    """Hugging Face LlamaForCausalLM + torch AdamW, same dims: fp32 params, compute in args.dtype
    (torch.autocast when bfloat16)."""
    import contextlib

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = "cuda" if args.device == "gpu" else "cpu"
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                                   attention_bias=False, mlp_bias=False)
    if args.hf_attention:
        cfg._attn_implementation = args.hf_attention
    with torch.device(device):  # initialised where it runs
        net = transformers.LlamaForCausalLM(cfg).float()
    net.train()
    if args.torch_compile:  # layer by layer: compiling the whole model would make transformers build
        for layer in net.model.layers:  # a dense 4-D causal mask, and sdpa a slower kernel (no is_causal, no GQA)
            layer.compile()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                            fused=args.fused_adamw or None)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    compute = (torch.autocast(device, dtype=torch.bfloat16) if args.dtype == "bfloat16"
               else contextlib.nullcontext())

    def step():
        with compute:
            loss = net(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    meta = {"torch": torch.__version__, "transformers": transformers.__version__,
            "attn_implementation": net.config._attn_implementation,
            "device_kind": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "matmul_params": sum(p.numel() for p in net.parameters()) - args.vocab * args.dim,
            "peak_memory": torch.cuda.max_memory_allocated if device == "cuda" else lambda: None}
    return step, None, meta


def worker(args):
    """Set up one side, then serve 'run' requests on stdin with JSON lines on stdout."""
    os.sched_setaffinity(0, range(args.threads))
    start = time.perf_counter()
    step, matmul_rate, meta = (ours if args.worker == "ours" else hf)(args)
    peak_memory = meta.pop("peak_memory")
    loss = step()  # compile (ours) / warm up (theirs)
    step()
    meta.update(setup_seconds=time.perf_counter() - start, first_loss=loss, peak_memory=peak_memory())
    print(json.dumps(meta), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["what"] == "steps":
            start = time.perf_counter()
            for _ in range(request["n"]):
                step()
            print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
        elif request["what"] == "matmul":
            print(json.dumps({"flops_per_sec": matmul_rate()}), flush=True)


# ----------------------------------------------------------------------------- the parent

class Worker:
    def __init__(self, side, argv, root=ROOT):
        script = os.path.join(root, "bench", "step.py")
        self.proc = subprocess.Popen([sys.executable, script, "--worker", side, *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)
        self.meta = self.read()

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"a benchmark worker died (exit code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def ask(self, **request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def main(argv):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    # set up one side at a time (compiling would otherwise steal the other's cores)
    a = Worker("ours", argv)
    b = Worker("ours", argv, os.path.abspath(args.against)) if args.against else Worker("hf", argv)
    other = f"ours@{args.against}" if args.against else "HF"
    tokens = args.batch * args.seq * args.steps
    ours_rates, hf_rates, matmul = [], [], []
    for _ in range(args.repeats):
        ours_rates.append(tokens / a.ask(what="steps", n=args.steps)["seconds"])
        hf_rates.append(tokens / b.ask(what="steps", n=args.steps)["seconds"])
        matmul.append(a.ask(what="matmul")["flops_per_sec"])
    a.close()
    b.close()

    ours_rate, hf_rate = statistics.median(ours_rates), statistics.median(hf_rates)
    ratio = statistics.median(o / h for o, h in zip(ours_rates, hf_rates))
    peak = max(matmul)
    flops = a.meta["flops_per_token"]
    print(f"model: dim {args.dim}, {args.layers} layers, {args.heads} heads, {args.kv_heads} kv heads, "
          f"ffn {args.ffn}, vocab {args.vocab}, {a.meta['params']:,} params; batch {args.batch} x seq {args.seq}, "
          f"{args.dtype}, {args.threads} threads each; ours: remat={args.remat}; "
          f"{other} attention: {b.meta.get('attn_implementation', args.attention)}")
    print(f"setup (compile / warm-up): ours {a.meta['setup_seconds']:.1f} s, {other} {b.meta['setup_seconds']:.1f} s; "
          f"first loss ours {a.meta['first_loss']:.3f}, {other} {b.meta['first_loss']:.3f}")
    print("ours tokens/s per run: " + ", ".join(f"{r:,.0f}" for r in ours_rates))
    print(f"{other} tokens/s per run: " + ", ".join(f"{r:,.0f}" for r in hf_rates))
    print(f"ours {ours_rate:,.0f} tokens/s, {other} {hf_rate:,.0f} tokens/s, ratio {ratio:.3f}")
    print(f"model FLOPs {flops / 1e6:.1f} M/token: ours {ours_rate * flops / 1e9:.1f} GFLOP/s, "
          f"{other} {hf_rate * flops / 1e9:.1f} GFLOP/s; fp32 matmul (jnp.dot 2048^3) {peak / 1e9:.1f} GFLOP/s")
    print(json.dumps({"ours_tokens_per_sec": ours_rate, "hf_torch_tokens_per_sec": hf_rate, "ratio": ratio,
                      "flops_fraction_of_matmul": ours_rate * flops / peak,
                      "hf_flops_fraction_of_matmul": hf_rate * flops / peak, "matmul_flops_per_sec": peak,
                      "model_flops_per_token": flops, "params": a.meta["params"],
                      "dims": {k: getattr(args, k) for k in ("dim", "layers", "heads", "kv_heads", "ffn", "vocab",
                                                               "seq", "batch")},
                      "remat": args.remat, "threads": args.threads, "steps_per_run": args.steps,
                      "repeats": args.repeats, "xla_flags": a.meta["xla_flags"],
                      "hf_attn_implementation": b.meta.get("attn_implementation"), "against": args.against,
                      "versions": {"jax": a.meta["jax"], "torch": b.meta.get("torch"),
                                   "transformers": b.meta.get("transformers")},
                      "smoke": args.smoke}))


if __name__ == "__main__":
    main(sys.argv[1:])
