"""GPU figures in one go: every check and measurement of the project on one NVIDIA GPU (H100/H200),
for a machine that is lent for minutes and has no network (it runs with the packages it finds).

    python bench/gpu.py --out DIR                      # everything, ~5 minutes on one H100/H200
    python bench/gpu.py --out DIR --only correctness,step
    python bench/gpu.py --out DIR --smoke              # tiny sizes on any devices (tests/test_bench.py: CPU)

The checks, most important first. Each runs in its own process, one after another (each has the
whole GPU; a crash, hang or out-of-memory is recorded and the rest go on), and DIR/gpu.json is
rewritten after every measurement, so whatever finished is kept if the machine is taken away:
  env          the GPU (nvidia-smi), Python, and the packages' versions (pip show)
  correctness  each attention implementation the platform has ("cudnn" and "jnp" on a GPU) in
               bf16 with grouped-query heads, values and gradients, against the plain masked
               softmax in fp32; the sharded train step on a mesh of all devices: in fp32 it equals
               the unsharded model, in bf16 every implementation's three steps follow jnp's; the
               bf16 matmul rate (8192^3), the ceiling beside the datasheet's peak
  step/...     the train step (forward, backward, clip, Adam) of a 0.89B Llama (dim 2048, 16 layers,
               16 heads on 8 kv heads, ffn 5632, vocab 32000) at seq 2048, bf16 compute over fp32
               params on both sides: ours with each implementation, then transformers + torch with
               sdpa and eager attention (autocast, AdamW(fused=True)); tokens/s, MFU against the
               dense bf16 peak of sharding.PEAK_FLOPS, peak memory (everything at a batch that fits
               an 80 GB H100). The first of ours also records a jax.profiler trace of 3 steps and
               summarises it here into DIR/trace_top.txt (top kernels and HLO ops by GPU time):
               a trace folder cannot be brought back from such a machine, nor read there
  decode       greedy generation of the same model through decode.generate on one device, bf16
               weights, 128-token prompts, 128 new tokens: output tokens/s at 1 row and at 8 rows
               (compile time apart), and how many of the 8 rows equal their prompt decoded alone
  attention    attention alone, forward + backward, at seq 2048 and 8192: ours against torch sdpa
  compile      (if time is left) transformers + torch.compile
At the end, DIR/gpu.md holds the table for BENCHMARKS.md, the GPU and the versions on every row.
`--budget` seconds (default 300) bound the run: a check that would not fit what is left is
skipped, and says so.
"""
import argparse
import collections
import dataclasses
import glob
import gzip
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt",
            "torch", "transformers", "optax", "numpy", "sentencepiece", "safetensors", "tqdm", "tensorboard")
# the 0.89B Llama of the step check, and the tiny sizes of --smoke (flags of bench/step.py)
LLAMA_1B = dict(dim=2048, layers=16, heads=16, kv_heads=8, ffn=5632, vocab=32000, seq=2048, batch=4)
SMOKE = dict(dim=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=256, seq=64, batch=2)
ATTENTION_SIZES = [(8, 2048), (2, 8192)]  # (batch, seq); 16 heads on 8 kv heads of 128, as the 1B model


def checks(smoke: bool, gpu: bool) -> list:
    """(name, worker options, seconds it takes on one H100/H200 (estimates: XLA autotunes every
    matmul shape of a program on a GPU), optional) in the order they run. Our fastest path and the
    two HF steps it is measured against come before our jnp step, whose program has four times as
    many matmul shapes to tune."""
    impls = ["cudnn", "jnp"] if gpu else ["jnp"]
    dims = SMOKE if smoke else LLAMA_1B
    ours = lambda impl, seconds: (f"step/ours-{impl}", {"worker": "step", "side": "ours", "attention": impl},
                                  seconds, False)
    hf = lambda attn: (f"step/hf-{attn}", {"worker": "step", "side": "hf", "attention": attn}, 30, False)
    out = [("env", {"worker": "env"}, 5, False), ("correctness", {"worker": "correctness", "impls": impls}, 80, False),
           *[ours(impl, 75) for impl in impls if impl != "jnp"], hf("eager"), hf("sdpa"), ours("jnp", 120),
           ("decode", {"worker": "decode"}, 60, False),
           ("attention", {"worker": "attention", "impls": impls}, 90, False),
           ("compile", {"worker": "step", "side": "hf", "attention": "sdpa", "compile": True}, 150, True)]
    for _, options, _, _ in out:
        options.update(smoke=smoke, gpu=gpu, dims=dims)
    return out


# ----------------------------------------------------------------------------- workers

def bench_module(name: str):
    """bench/NAME.py as a module (bench/attention.py would shadow the project's attention.py)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def emit(part: str, **result):
    """One measurement of a worker: a JSON line on stdout, read by the parent as it comes."""
    print(json.dumps({"part": part, **result}), flush=True)


def attempt(part: str, fn, *args):
    """Run one part of a worker; its failure is emitted as that part's result and the worker goes on."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 (each part records its own failure)
        traceback.print_exc()
        emit(part, ok=False, error=f"{type(e).__name__}: {e}"[:2000])


def env_worker(options):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True) if options["gpu"] else None
    emit("gpu", ok=bool(smi and smi.returncode == 0) or not options["gpu"], nvidia_smi=smi and smi.stdout.strip())
    versions = {}
    for name in PACKAGES:  # what `pip show` reports, read from the same installed metadata
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    emit("versions", ok=True, python=sys.version.split()[0], versions=versions)


def correctness_worker(options):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import config
    import model
    import sharding
    import train

    attention_bench = bench_module("attention")
    smoke, impls = options["smoke"], options["impls"]
    platform = jax.devices()[0].platform
    emit("devices", ok=True, platform=platform, device_kind=jax.devices()[0].device_kind, count=jax.device_count())

    def attention_check():
        B, T, N, K, H = (2, 64, 4, 2, 16) if smoke else (2, 1024, 16, 8, 128)
        result = attention_bench.measure(B, T, N, K, H, "bfloat16", impls, repeats=0, check=True)
        # bf16 inputs to the matmuls (q, k, v and the probabilities) cost a few times 2^-8 of the
        # largest value; an implementation passes within 5x that, whatever the others do
        worst = {impl: max(errors.values()) for impl, errors in result["errors"].items()}
        tolerance = 5 * 2 ** -8
        emit("attention", ok=max(worst.values()) <= tolerance, tolerance=tolerance, errors=result["errors"],
             dims=dict(B=B, T=T, N=N, K=K, H=H))

    n = jax.device_count()
    tensor = 2 if n % 2 == 0 else 1
    mesh = sharding.make_mesh(1, n // tensor, tensor)
    tiny = model.Config(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=128)
    rows = 2 * n // tensor
    tokens = np.random.default_rng(0).integers(0, tiny.vocab_size, (rows, tiny.max_seq_len + 1), dtype=np.int32)

    def sharded_equals_unsharded():
        cfg = dataclasses.replace(tiny, dtype="float32", attention="jnp")
        params = model.init_params(cfg, jax.random.key(0))
        with jax.default_matmul_precision("highest"):  # no TF32: the check is of the program, not the rounding
            loss, grads = jax.jit(jax.value_and_grad(model.loss_fn), static_argnums=2)(params, tokens, cfg)
            sloss, sgrads = jax.jit(lambda p, t: sharding.loss_and_grad(p, t, cfg, mesh))(
                sharding.shard_params(params, cfg, mesh), tokens)
        diff = max(float(jnp.abs(a - b).max() / jnp.abs(a).max()) for a, b in
                   zip(jax.tree.leaves(grads), jax.tree.leaves(sgrads)))
        emit("sharded_fp32", ok=abs(float(loss) - float(sloss)) < 1e-5 and diff < 1e-4, mesh=list(mesh.shape.values()),
             loss=float(loss), sharded_loss=float(sloss), grad_max_rel_diff=diff)

    def bf16_steps(impl):
        cfg = dataclasses.replace(tiny, attention=impl)
        tcfg = config.TrainConfig(model=cfg, batch_size=rows, seq_len=cfg.max_seq_len, microbatches=1,
                                  mesh=tuple(mesh.shape.values()), lr=1e-3, warmup_steps=0, steps=100)
        tx = train.make_optimizer(tcfg)
        state = train.init_state(tx, cfg, mesh, jax.random.key(0))
        step = train.make_train_step(tcfg, tx, cfg, mesh)
        batch = sharding.global_batch({"tokens": tokens}, mesh, microbatches=1)
        losses = []
        for _ in range(3):
            state, metrics = step(state, batch, train.stop_flags(mesh, False))
            losses.append(float(metrics["loss"]))
        return losses

    def bf16_check():
        losses = {impl: bf16_steps(impl) for impl in impls}
        follows = all(abs(a - b) < 2e-2 for impl in impls for a, b in zip(losses[impl], losses["jnp"]))
        learns = all(ls[-1] < ls[0] and all(np.isfinite(ls)) for ls in losses.values())
        emit("sharded_bf16_steps", ok=follows and learns, losses=losses, mesh=list(mesh.shape.values()))

    def matmul():  # 10 products queued per timing, so none waits on the host
        size = 256 if smoke else 8192
        emit("matmul", ok=True, size=size,
             bf16_flops_per_sec=bench_module("step").matmul_rate(size, "bfloat16", calls=10))

    for part, fn in [("attention", attention_check), ("sharded_fp32", sharded_equals_unsharded),
                     ("sharded_bf16_steps", bf16_check), ("matmul", matmul)]:
        attempt(part, fn)


def step_worker(options):
    """One side of the step comparison: compile / warm up, time steps, and (ours, with "trace")
    profile three more."""
    step_bench = bench_module("step")
    dims, side = options["dims"], options["side"]
    if side == "hf":
        os.environ["JAX_PLATFORMS"] = "cpu"  # JAX only counts the model's FLOPs here
    argv = [f"--{k}={v}" for k, v in dims.items()] + [
        "--dtype=bfloat16", f"--device={'gpu' if options['gpu'] else 'cpu'}", "--remat=none", "--fused_adamw"]
    argv.append(f"--attention={options['attention']}" if side == "ours" else f"--hf_attention={options['attention']}")
    argv += ["--torch_compile"] if options.get("compile") else []
    args = step_bench.parse_args(argv)
    start = time.perf_counter()
    step, _, meta = (step_bench.ours if side == "ours" else step_bench.hf)(args)
    peak_memory = meta.pop("peak_memory")
    first_loss = step()
    step()
    setup = time.perf_counter() - start
    times = []
    for _ in range(2 if options["smoke"] else 10):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)

    import model
    import sharding
    mcfg = step_bench.model_config(args)
    params = model.param_count(mcfg)
    matmul_params = params - mcfg.vocab_size * mcfg.dim
    flops, peak = model.flops_per_token(mcfg, args.seq), sharding.PEAK_FLOPS.get(meta["device_kind"])
    tokens_per_sec = args.batch * args.seq / statistics.median(times)
    # ok: both sides built the same model (HF counts its own matmul params)
    emit("timing", **{**meta, "ok": meta.get("matmul_params", matmul_params) == matmul_params,
                      "tokens_per_sec": tokens_per_sec, "params": params,
                      "mfu": flops * tokens_per_sec / peak if peak else None, "peak_flops": peak,
                      "model_flops_per_token": flops, "step_seconds": times, "setup_seconds": setup,
                      "first_loss": first_loss, "peak_memory": peak_memory()})
    if options.get("trace"):
        attempt("trace", trace, step, options["out"])


def trace(step, out):
    """Profile three steps and summarise the trace on this machine into out/trace_top.txt."""
    import jax

    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(3):
                step()
        (path,) = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
        summary = summarise_trace(path)
    with open(os.path.join(out, "trace_top.txt"), "w") as f:
        f.write(format_trace(summary))
    emit("trace", ok=bool(summary["top_kernels"]), **{k: v[:25] if isinstance(v, list) else v
                                                      for k, v in summary.items()})


def decode_worker(options):
    """Greedy generation of the step check's model (random weights) through decode.generate, the
    one decode path (an Engine of one slot per prompt), on a mesh of one device: output tokens/s
    (prefill included) of 8 prompts each decoded alone, then of the 8 at once, each after a warm-up
    call that compiles (its time beyond a timed call: compile_seconds), and how many of the 8 rows
    equal their prompt decoded alone. In fp32 (--smoke) they must; in bf16 the count is reported,
    not judged: a batch of 8 may run other kernels, and a near tie of two logits flips with them."""
    import jax
    import numpy as np

    import decode
    import model
    import sharding

    dims = options["dims"]
    prompt_len, new = (16, 16) if options["smoke"] else (128, 128)
    cfg = model.Config(vocab_size=dims["vocab"], dim=dims["dim"], n_layers=dims["layers"], n_heads=dims["heads"],
                       n_kv_heads=dims["kv_heads"], ffn_dim=dims["ffn"], max_seq_len=dims["seq"],
                       dtype="float32" if options["smoke"] else "bfloat16")
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params = decode.reshard(model.init_params(cfg, jax.random.key(0)), cfg, mesh)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, prompt_len)).tolist()
    about = dict(params=model.param_count(cfg), dtype=cfg.dtype, prompt_tokens=prompt_len, new_tokens=new)
    alone = []

    def timed(batch):  # generate returns once every token is on the host
        start = time.perf_counter()
        out = decode.generate(params, cfg, mesh, batch, new)
        return out, time.perf_counter() - start

    def one_row():
        _, first = timed(prompts[:1])  # compiles the 1-row prefill and decode steps
        runs = [timed([prompt]) for prompt in prompts]
        alone.extend(out for (out,), _ in runs)
        seconds = [s for _, s in runs]
        emit("rows-1", ok=True, rows=1, tokens_per_sec=len(prompts) * new / sum(seconds),
             compile_seconds=first - seconds[0], seconds=seconds, **about)

    def eight_rows():
        _, first = timed(prompts)  # compiles the 8-row steps
        out, seconds = timed(prompts)
        equal = sum(a == b for a, b in zip(out, alone))
        emit("rows-8", ok=equal == len(prompts) or cfg.dtype == "bfloat16", rows=len(prompts),
             tokens_per_sec=len(prompts) * new / seconds, compile_seconds=first - seconds, seconds=seconds,
             rows_equal_alone=equal, **about)

    attempt("rows-1", one_row)
    attempt("rows-8", eight_rows)


def attention_worker(options):
    """Each implementation at each size, emitted one by one: the fused kernels at both sizes first,
    jnp (its compile the longest: 64 query blocks at seq 8192) last."""
    attention_bench = bench_module("attention")
    smoke, gpu = options["smoke"], options["gpu"]
    N, K, H = (4, 2, 16) if smoke else (16, 8, 128)
    sizes = [(2, 64), (1, 128)] if smoke else ATTENTION_SIZES
    order = [impl for impl in options["impls"] if impl != "jnp"] + ["sdpa", "jnp"]
    for impl in order:
        for B, T in sizes:
            def measure(B=B, T=T, impl=impl):
                (ms,) = attention_bench.measure(B, T, N, K, H, "bfloat16", [impl], repeats=1 if smoke else 10,
                                                torch_device="cuda" if gpu else "cpu")["ms"].values()
                emit(f"{impl}-seq{T}", ok=True, impl=impl, dims=dict(B=B, T=T, N=N, K=K, H=H), ms=ms,
                     tflops_per_sec=attention_bench.causal_flops(B, T, N, H) / ms / 1e9)
            attempt(f"{impl}-seq{T}", measure)


WORKERS = {"env": env_worker, "correctness": correctness_worker, "step": step_worker, "decode": decode_worker,
           "attention": attention_worker}


# ----------------------------------------------------------------------------- the trace

KINDS = [("attention", ("fmha", "flash", "sdpa", "attention", "cudnn")),
         ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "wgmma", "matmul", "dot")),
         ("communication", ("nccl", "all-reduce", "all-gather", "reduce-scatter", "all_reduce")),
         ("copy", ("memcpy", "memset", "copy", "transpose")),
         ("reduction", ("reduce",))]


def kind_of(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, words in KINDS if any(w in lower for w in words)), "other (elementwise fusions)")


def leaves(events: list) -> list:
    """The events that hold no other event of their line (a CPU's executor wraps its ops in spans)."""
    out = []
    by_line = collections.defaultdict(list)
    for e in events:
        by_line[e["pid"], e.get("tid")].append(e)
    for line in by_line.values():
        line.sort(key=lambda e: (e["ts"], -e["dur"]))
        out += [e for e, after in zip(line, line[1:] + [None]) if after is None or after["ts"] >= e["ts"] + e["dur"]]
    return out


def summarise_trace(path: str) -> dict:
    """GPU time per kernel, per HLO op and per kind of work in a jax.profiler perfetto trace, and
    the share of the traced window in which any kernel ran. On a GPU the kernels are the events
    of the device's stream lines and the HLO ops those of its "XLA Ops" line (or the kernels'
    hlo_op argument); on a CPU, XLA's executor threads stand in for the streams."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e["name"] == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    line = lambda e: threads.get((e["pid"], e.get("tid")), "")
    device = [e for e in spans if processes.get(e["pid"], "").startswith("/device:")]
    if device:
        kernels = leaves([e for e in device if line(e).lower().startswith("stream")])
        ops = [e for e in device if line(e) == "XLA Ops"]
    else:
        kernels, ops = leaves([e for e in spans if line(e).startswith("tf_XLA")]), []
    if not ops:
        ops = [{**e, "name": e["args"]["hlo_op"]} for e in kernels if "hlo_op" in e.get("args", {})]

    def top(events):
        total = collections.Counter()
        count = collections.Counter()
        for e in events:
            total[e["name"]] += e["dur"]
            count[e["name"]] += 1
        whole = sum(total.values()) or 1
        return [(name, us / 1e3, us / whole, count[name]) for name, us in total.most_common()]

    kernel_ms = sum(e["dur"] for e in kernels) / 1e3
    busy, end = 0.0, None  # the union of the kernels' intervals
    for e in sorted(kernels, key=lambda e: e["ts"]):
        start, stop = e["ts"], e["ts"] + e["dur"]
        if end is None or start > end:
            busy, end = busy + stop - start, stop
        elif stop > end:
            busy, end = busy + stop - end, stop
    window = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)) if kernels else 0
    kinds = collections.Counter()
    for e in kernels:
        kinds[kind_of(e["name"])] += e["dur"] / 1e3
    lines = collections.Counter()
    for e in device or spans:
        lines[f"{processes.get(e['pid'], e['pid'])} / {line(e)}"] += e["dur"] / 1e3
    return {"kernel_ms": kernel_ms, "window_ms": window / 1e3, "busy_fraction": busy / window if window else None,
            "kinds": [(k, ms, ms / (kernel_ms or 1)) for k, ms in kinds.most_common()],
            "top_kernels": top(kernels), "top_ops": top(ops), "lines": lines.most_common(),
            "kernel_arg_names": sorted(kernels[0].get("args", {})) if kernels else []}


def format_trace(summary: dict) -> str:
    busy = summary["busy_fraction"]
    out = [f"kernel time {summary['kernel_ms']:.1f} ms over a window of {summary['window_ms']:.1f} ms "
           f"(3 steps); busy {busy:.1%} of it" if busy is not None else "no kernels found", "", "by kind of work:"]
    out += [f"  {share:6.1%} {ms:10.2f} ms  {kind}" for kind, ms, share in summary["kinds"]]
    for title, rows in (("kernels", summary["top_kernels"]), ("HLO ops", summary["top_ops"])):
        out += ["", f"top {title} by time (share, ms, calls, name):"]
        out += [f"  {share:6.1%} {ms:10.2f} ms {n:6d}  {name[:160]}" for name, ms, share, n in rows[:40]]
    out += ["", "trace lines (ms):"] + [f"  {ms:10.2f}  {name}" for name, ms in summary["lines"][:30]]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- the parent

def run_check(name, options, timeout, record, save, log):
    """Run one check's worker; every measurement it emits lands in record["parts"] and is saved."""
    # JAX takes GPU memory as it needs it (the attention worker shares the GPU with torch), up to
    # 95% of it (its default cap is 75%: 60 GB of an 80 GB H100)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", "JAX_PLATFORMS": "cuda" if options["gpu"] else "cpu"}
    if not options["gpu"]:
        if options["worker"] == "correctness":  # a real mesh on the CPU
            env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    log.write(f"===== {name}\n")
    log.flush()
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(options)],
                            stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=env)
    record.update(ok=None, parts={})

    def read():
        for text in proc.stdout:
            try:
                message = json.loads(text)
            except ValueError:
                message = None
            if isinstance(message, dict) and "part" in message:
                record["parts"][message.pop("part")] = message
                save()
            else:
                log.write(text)
    reader = threading.Thread(target=read)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        record["error"] = f"timed out after {timeout:.0f} s"
    reader.join()
    parts = [value for part, value in record["parts"].items() if part != "trace"]  # a profile is no verdict
    record.update(seconds=time.monotonic() - start, exit_code=proc.returncode,
                  ok=proc.returncode == 0 and bool(parts) and all(p.get("ok") for p in parts))
    if proc.returncode and "error" not in record:
        record["error"] = f"exit code {proc.returncode}; see log.txt"
    save()



def has_gpu() -> bool:
    """An NVIDIA GPU is attached (asked without starting CUDA in this process)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def goals(results) -> dict:
    """The issue's goals, read from the step check: our best MFU >= 45% and >= 1.3x HF eager."""
    timing = lambda name: results["checks"].get(name, {}).get("parts", {}).get("timing", {})
    ours = {name: timing(name) for name in results["checks"] if name.startswith("step/ours-") and timing(name)}
    if not ours:
        return {}
    best = max(ours, key=lambda name: ours[name]["tokens_per_sec"])
    out = {"best_ours": best, "mfu": ours[best].get("mfu")}
    for hf in ("eager", "sdpa"):
        if theirs := timing(f"step/hf-{hf}"):
            out[f"over_hf_{hf}"] = ours[best]["tokens_per_sec"] / theirs["tokens_per_sec"]
    out["mfu_at_least_45"] = out["mfu"] is not None and out["mfu"] >= 0.45
    out["at_least_1.3x_hf_eager"] = out.get("over_hf_eager", 0) >= 1.3
    return out


def table(results) -> str:
    """The markdown table for BENCHMARKS.md: one row per figure, the GPU and versions on each,
    then whatever failed or was skipped."""
    checks = results["checks"]
    parts = lambda name: checks.get(name, {}).get("parts", {})
    versions = parts("env").get("versions", {}).get("versions", {})
    plugin = next((f"{k} {v}" for k, v in versions.items() if "plugin" in k), "no CUDA plugin")
    where = (f"{parts('correctness').get('devices', {}).get('device_kind', '?')}; jax {versions.get('jax', '?')} "
             f"({plugin}), torch {versions.get('torch', '?')}, transformers {versions.get('transformers', '?')}")
    rows = ["| measurement | figure | | GPU and versions |", "|---|---|---|---|"]
    row = lambda what, figure, more="": rows.append(f"| {what} | {figure} | {more} | {where} |")
    verdict = lambda part: "ok" if part.get("ok") else "FAILED"

    correctness = parts("correctness")
    for impl, errors in correctness.get("attention", {}).get("errors", {}).items():
        row(f"attention {impl}, bf16 against fp32 (values, grads)", f"max rel err {max(errors.values()):.2e}",
            verdict(correctness["attention"]))
    for name in ("sharded_fp32", "sharded_bf16_steps"):
        if "mesh" in correctness.get(name, {}):
            row(f"train step {name.replace('_', ' ')}, mesh {correctness[name]['mesh']}", verdict(correctness[name]))
    if correctness.get("matmul", {}).get("ok"):
        matmul = correctness["matmul"]
        row(f"bf16 matmul {matmul['size']}^3", f"{matmul['bf16_flops_per_sec'] / 1e12:.0f} TFLOP/s")
    eager = parts("step/hf-eager").get("timing", {}).get("tokens_per_sec")
    dims = results["dims"]
    for name in checks:
        if (timing := parts(name).get("timing", {})).get("tokens_per_sec"):
            mfu = f"MFU {timing['mfu']:.1%}" if timing.get("mfu") is not None else "MFU ?"
            peak = timing.get("peak_memory")
            over = " (over an 80 GB H100)" if peak and peak > 78 * 2**30 else ""
            memory = f", peak {peak / 2**30:.1f} GiB{over}" if peak else ""
            ratio = f", {timing['tokens_per_sec'] / eager:.2f}x HF eager" if eager else ""
            row(f"{name}: {timing['params'] / 1e9:.2f}B params, batch {dims['batch']} x seq {dims['seq']}",
                f"{timing['tokens_per_sec']:,.0f} tokens/s", f"{mfu}{memory}{ratio}")
    for value in parts("decode").values():
        if value.get("tokens_per_sec"):
            equal = value.get("rows_equal_alone")
            equal = "" if equal is None else f", {equal}/{value['rows']} rows as decoded alone"
            row(f"decode {value['params'] / 1e9:.2f}B params {value['dtype']}, {value['rows']} x "
                f"({value['prompt_tokens']} prompt + {value['new_tokens']} new), greedy",
                f"{value['tokens_per_sec']:,.0f} tokens/s", f"compile {value['compile_seconds']:.0f} s{equal}")
    for value in parts("attention").values():
        if value.get("ok"):
            row(f"attention fwd+bwd {value['impl']}, batch {value['dims']['B']} x seq {value['dims']['T']}",
                f"{value['ms']:.2f} ms", f"{value['tflops_per_sec']:.0f} TFLOP/s")
    for name, check in checks.items():
        if check.get("ok") is None:
            row(name, "skipped", check.get("skipped", ""))
        elif check.get("error"):
            row(name, "FAILED", check["error"])
        for part, value in check.get("parts", {}).items():
            if value.get("error"):
                row(f"{name} {part}", "FAILED", value["error"][:200].replace("|", "/").replace("\n", " "))
    return "\n".join(rows) + "\n"


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/gpu", help="folder of gpu.json, gpu.md, log.txt, trace_top.txt")
    parser.add_argument("--budget", type=float, default=300, help="seconds for the whole run")
    parser.add_argument("--only", default="", help="comma-separated checks (env, correctness, step, decode, "
                        "attention, compile); default all")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a few seconds a check, on any devices")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, ROOT)
        options = json.loads(args.worker)
        return attempt(options["worker"], WORKERS[options["worker"]], options)

    out = os.path.abspath(args.out)  # the workers run in the repository root
    os.makedirs(out, exist_ok=True)
    gpu = has_gpu()
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "smoke": args.smoke, "gpu": gpu,
               "budget_seconds": args.budget, "dims": SMOKE if args.smoke else LLAMA_1B, "checks": {}}
    if not gpu:
        results["not_checked"] = "cuDNN attention: no NVIDIA GPU here"
    path = os.path.join(out, "gpu.json")
    lock = threading.Lock()

    def save():
        with lock, open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)

    start, only = time.monotonic(), set(filter(None, args.only.split(",")))
    with open(os.path.join(out, "log.txt"), "w") as log:
        for name, options, seconds, optional in checks(args.smoke, gpu):
            if only and name.split("/")[0] not in only:
                continue
            left = args.budget - (time.monotonic() - start)
            needs = 0 if args.smoke else seconds
            record = results["checks"][name] = {}
            if optional and args.smoke and not only:
                record.update(ok=None, skipped="not in a smoke run unless asked for with --only")
            elif needs > left:
                record.update(ok=None, skipped=f"{left:.0f} s of the budget left, needs ~{needs} s")
            else:
                print(f"{name} ...", flush=True)
                # the first of our steps that runs records the trace
                traced = any("trace" in c.get("parts", {}) for c in results["checks"].values())
                options.update(out=out, trace=options.get("side") == "ours" and not traced)
                run_check(name, options, left if args.smoke else max(30, min(left, 3 * seconds)), record, save, log)
                print(f"{name}: {'ok' if record['ok'] else 'FAILED'} in {record['seconds']:.0f} s "
                      f"{record.get('error', '')}", flush=True)
            save()
    results.update(goals=goals(results), seconds=time.monotonic() - start)
    save()
    with open(os.path.join(out, "gpu.md"), "w") as f:
        f.write(table(results))
    print(table(results))
    print(json.dumps({"ok": all(c["ok"] is not False for c in results["checks"].values()),
                      "checks": {name: c["ok"] for name, c in results["checks"].items()}, "goals": results["goals"]}))


if __name__ == "__main__":
    main(sys.argv[1:])
