"""Lemur continued pretraining: the paper's optimizer and schedule, the 4M-token batch, the loop.

    python train.py configs/tiny.py                  # the demo: a few minutes on a CPU
    python train.py configs/lemur70b.py              # the paper's run: same command on every host
    python train.py configs/tiny.py --lr=1e-3 --mesh=1,4,2   # type-checked overrides
    python train.py configs/lemur70b.py --aot=v4-512 # compile for a TPU topology on this machine

The step: the global batch (batch_size rows of seq_len+1 tokens) arrives as `microbatches`
sequential chunks; one jitted, donated step scans over them summing loss and gradients (so k
microbatches give exactly the update of one big batch), clips the global gradient norm at 1.0,
and applies Adam (b1 0.9, b2 0.95) with linear warmup to the peak lr and cosine decay to end_lr.
A non-finite loss or gradient skips the update. All collectives live in sharding.py.

The loop: resumes from the newest complete checkpoint in out_dir, logs one step late so the host
never waits on the device, evaluates each data source on held-out rows, checkpoints atomically
(checkpoint.py), and on SIGTERM/SIGINT (preemption) finishes the step, saves and exits 0.
"""
import dataclasses
import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import optax

import checkpoint
import config
import data
import model
import sharding

# peak dense bf16 FLOP/s per device, by jax's device_kind; unknown (e.g. a CPU) -> no MFU
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA H100 80GB HBM3": 989e12}


# ----------------------------------------------------------------------------- optimizer

def lr_schedule(tcfg: config.TrainConfig):
    """Linear warmup from 0 to lr over warmup_steps, then cosine from lr to end_lr at `steps`."""
    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        warm = tcfg.lr * step / max(tcfg.warmup_steps, 1)
        progress = jnp.clip((step - tcfg.warmup_steps) / max(tcfg.steps - tcfg.warmup_steps, 1), 0.0, 1.0)
        cosine = tcfg.end_lr + 0.5 * (tcfg.lr - tcfg.end_lr) * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < tcfg.warmup_steps, warm, cosine)
    return lr


def decay_mask(params):
    """Weight decay applies to matrices only, chosen by path (stacked norm scales are 2-D too)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "norm" not in jax.tree_util.keystr(path), params)


def make_optimizer(tcfg: config.TrainConfig) -> optax.GradientTransformation:
    """Clip, Adam, optional decoupled weight decay (AdamW-style, scaled by the lr), lr schedule."""
    parts = [optax.clip_by_global_norm(tcfg.grad_clip), optax.scale_by_adam(b1=tcfg.b1, b2=tcfg.b2, eps=1e-8)]
    if tcfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(tcfg.weight_decay, mask=decay_mask))
    parts.append(optax.scale_by_learning_rate(lr_schedule(tcfg)))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------- state and step

def model_config(tcfg: config.TrainConfig) -> model.Config:
    return tcfg.model if isinstance(tcfg.model, model.Config) else model.preset(tcfg.model)


def state_shardings(tcfg, mcfg, mesh):
    """NamedShardings of {params, opt_state, step}: Adam moments sharded like their params."""
    params = sharding.param_shardings(mcfg, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shapes = jax.eval_shape(make_optimizer(tcfg).init, jax.eval_shape(lambda: model.init_params(mcfg, jax.random.key(0))))
    opt = optax.tree_map_params(make_optimizer(tcfg), lambda _, s: s, shapes, params,
                                transform_non_params=lambda _: replicated)
    return {"params": params, "opt_state": opt, "step": replicated}


def state_shapes(tcfg, mcfg, mesh):
    """jax.ShapeDtypeStruct of every state leaf, with its sharding (for AOT and restore)."""
    params = jax.eval_shape(lambda: model.init_params(mcfg, jax.random.key(0)))
    shapes = {"params": params, "opt_state": jax.eval_shape(make_optimizer(tcfg).init, params),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, state_shardings(tcfg, mcfg, mesh))


def init_state(tcfg, mcfg, mesh, key, params=None):
    """A fresh train state, created already sharded (nothing whole on one device)."""
    if params is None:
        params = sharding.init_params_sharded(mcfg, mesh, key)
    shardings = state_shardings(tcfg, mcfg, mesh)
    opt_state = jax.jit(make_optimizer(tcfg).init, out_shardings=shardings["opt_state"])(params)
    return {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.int32(0), shardings["step"])}


def load_params(init_from: str, mcfg: model.Config, mesh):
    """Sharded params from "hf:DIR" (a Hugging Face Llama) or "ckpt:DIR" (a checkpoint or a run's
    out_dir); each process reads only the slices its devices hold."""
    kind, _, path = init_from.partition(":")
    shardings = sharding.param_shardings(mcfg, mesh)
    if kind == "hf":
        import convert
        saved_cfg, params = convert.load_hf(path, shardings)
    else:
        path = checkpoint.latest(path)
        saved_cfg = model.Config(**checkpoint.Reader(path).meta["model"])
        shapes = jax.eval_shape(lambda: model.init_params(mcfg, jax.random.key(0)))
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
        params = checkpoint.restore(path, {"params": target})[0]["params"]
    if dataclasses.replace(saved_cfg, dtype=mcfg.dtype, remat=mcfg.remat) != mcfg:
        raise ValueError(f"{init_from}: the saved model {saved_cfg} is not the configured {mcfg}")
    return params


def make_train_step(tcfg, mcfg, mesh):
    """jitted step(state, batch) -> (state, metrics); batch["tokens"] is (microbatches, rows, T+1)."""
    tx = make_optimizer(tcfg)
    shardings = state_shardings(tcfg, mcfg, mesh)

    def step(state, batch):
        params = state["params"]

        def accumulate(carry, microbatch):
            loss_sum, weight_sum, grads = carry
            (l, w), g = sharding.loss_sum_and_grad(params, microbatch, mcfg, mesh)
            return (loss_sum + l, weight_sum + w, jax.tree.map(jnp.add, grads, g)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss_sum, weight_sum, grads), _ = jax.lax.scan(accumulate, (0.0, 0.0, zeros), batch)
        loss = loss_sum / jnp.maximum(weight_sum, 1.0)
        grads = jax.tree.map(lambda g: g / jnp.maximum(weight_sum, 1.0), grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # skip the update, keep the old state
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = {"params": keep(new_params, params), "opt_state": keep(opt_state, state["opt_state"]),
                     "step": state["step"] + 1}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(tcfg)(state["step"]),
                   "skipped": ~ok}
        return new_state, metrics

    return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh, microbatched=True)),
                   out_shardings=(shardings, None), donate_argnums=0)


def make_eval_step(mcfg, mesh):
    """jitted (params, batch) -> (loss_sum, weight_sum), scanning microbatches like the step."""
    def evaluate(params, batch):
        def accumulate(carry, microbatch):
            l, w = sharding.loss_sum(params, microbatch, mcfg, mesh)
            return (carry[0] + l, carry[1] + w), None
        return jax.lax.scan(accumulate, (0.0, 0.0), batch)[0]
    return jax.jit(evaluate, in_shardings=(sharding.param_shardings(mcfg, mesh), sharding.batch_sharding(mesh, microbatched=True)))


def flops_per_token(mcfg: model.Config, seq_len: int) -> float:
    """Model FLOPs per trained token: 6 per matmul weight (forward + backward) plus causal
    attention (QK^T and AV over T/2 keys on average: 6 * L * T * D); remat not counted."""
    matmul_params = model.param_count(mcfg) - mcfg.vocab_size * mcfg.dim  # the embedding is a lookup
    return 6 * matmul_params + 6 * mcfg.n_layers * seq_len * mcfg.dim


# ----------------------------------------------------------------------------- the loop

def validate(tcfg: config.TrainConfig, mcfg: model.Config):
    """Config errors that must surface before any data is read or anything compiled."""
    for key in ("steps", "batch_size", "seq_len", "microbatches", "log_every", "eval_every", "checkpoint_every"):
        if getattr(tcfg, key) <= 0:
            raise ValueError(f"config: {key} must be positive, got {getattr(tcfg, key)}")
    if not 0 <= tcfg.warmup_steps <= tcfg.steps:
        raise ValueError(f"config: warmup_steps={tcfg.warmup_steps} must lie in [0, steps={tcfg.steps}]")
    if tcfg.batch_size % tcfg.microbatches:
        raise ValueError(f"config: batch_size={tcfg.batch_size} is not divisible by microbatches={tcfg.microbatches}")
    if tcfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"config: seq_len={tcfg.seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len}")
    if tcfg.init_from and not tcfg.init_from.startswith(("hf:", "ckpt:")):  # ckpt: sft.py's init_params
        raise ValueError(f"config: init_from={tcfg.init_from!r} must be '' (random), 'hf:DIR' or 'ckpt:DIR'")
    if math.prod(tcfg.mesh) != jax.device_count():
        raise ValueError(f"config: mesh={tcfg.mesh} (data, fsdp, tensor) needs {math.prod(tcfg.mesh)} "
                         f"devices, this run has {jax.device_count()}")
    if tcfg.batch_size % jax.process_count():
        raise ValueError(f"config: batch_size={tcfg.batch_size} is not divisible by {jax.process_count()} processes")


class Stop:
    """SIGTERM/SIGINT ask the loop to finish its step, save and exit 0 (TPU VMs are preempted)."""
    requested = False

    @classmethod
    def install(cls):
        def handler(signum, frame):
            cls.requested = True
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def log_metrics(out_dir, record):
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(out_dir, step):
    """Drop records past the checkpoint we resume from: those steps are about to be redone."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def train(tcfg: config.TrainConfig, mcfg: model.Config = None, make_loader=data.make_loader, init_params=None):
    """The loop. sft.py reuses it with its own model config (a grown vocabulary), loader (rows
    with loss weights) and initial params (a pretraining checkpoint): one loop in the project.
    make_loader(tcfg, process_index, process_count) -> an object like data.Loader;
    init_params(mcfg, mesh) -> sharded params, used when out_dir has no checkpoint yet."""
    from tqdm import tqdm

    mcfg = mcfg or model_config(tcfg)
    validate(tcfg, mcfg)
    mesh = sharding.make_mesh(*tcfg.mesh)
    sharding.check_divisible(mcfg, mesh, tcfg.batch_size // tcfg.microbatches)
    main_process = jax.process_index() == 0
    os.makedirs(tcfg.out_dir, exist_ok=True)
    if main_process:
        print(config.to_json(tcfg))
        with open(os.path.join(tcfg.out_dir, "config.json"), "w") as f:
            f.write(config.to_json(tcfg))

    loader = make_loader(tcfg, jax.process_index(), jax.process_count())
    if loader.tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer has {loader.tokenizer.vocab_size} tokens, model {tcfg.model} only {mcfg.vocab_size}")
    steps_done = checkpoint.committed(tcfg.out_dir)
    if steps_done:
        path = checkpoint.step_dir(tcfg.out_dir, steps_done[-1])
        state, saved = checkpoint.restore(path, state_shapes(tcfg, mcfg, mesh))
        loader.restore(data.merge_states(saved.data_states()))
        if main_process:
            truncate_metrics(tcfg.out_dir, saved.meta["step"])
            print(f"resumed from {path}")
    else:
        params = None
        if init_params:
            params = init_params(mcfg, mesh)
        elif tcfg.init_from:
            params = load_params(tcfg.init_from, mcfg, mesh)
        state = init_state(tcfg, mcfg, mesh, jax.random.key(tcfg.seed), params)

    train_step, eval_step = make_train_step(tcfg, mcfg, mesh), make_eval_step(mcfg, mesh)
    start = int(state["step"])
    m, rows = tcfg.microbatches, tcfg.batch_size // jax.process_count() // tcfg.microbatches
    peak = PEAK_FLOPS.get(jax.devices()[0].device_kind)
    flops = flops_per_token(mcfg, tcfg.seq_len)
    Stop.install()

    def to_device(batch):
        """This process's rows -> global arrays (microbatches, rows, ...) split over the mesh."""
        batch = {k: v.reshape(m, rows, *v.shape[1:]) for k, v in batch.items()}
        return sharding.global_batch(batch, mesh, microbatched=True)

    def save(step):
        meta = {"config": json.loads(config.to_json(tcfg)), "model": dataclasses.asdict(mcfg), "seed": tcfg.seed}
        checkpoint.save(tcfg.out_dir, step, state, loader.state(), meta, tcfg.keep_checkpoints)

    def evaluate(step):
        record = {"step": step}
        for source, batches in loader.eval_batches(tcfg.eval_batches).items():
            total, count = 0.0, 0.0
            for batch in batches:
                l, w = eval_step(state["params"], to_device(batch))
                total, count = total + float(l), count + float(w)
            record[f"eval/{source}"] = total / max(count, 1.0)
        return record

    bar = tqdm(range(start, tcfg.steps), initial=start, total=tcfg.steps, disable=not main_process)
    nonfinite, last_log, interval_losses = 0, (start, time.time()), []

    def report(step, metrics):
        """Log step `step`'s metrics (read one step late, so the device is already busy). The
        logged loss is the mean over the steps since the previous record: one batch is noisy."""
        nonlocal nonfinite, last_log
        metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
        nonfinite = nonfinite + 1 if metrics["skipped"] else 0
        if not metrics["skipped"]:
            interval_losses.append(metrics["loss"])
        if nonfinite >= tcfg.max_nonfinite_steps:
            raise SystemExit(f"stopping: {nonfinite} consecutive non-finite losses (updates skipped) up to "
                             f"step {step}; the last checkpoint in {tcfg.out_dir} is intact")
        if step % tcfg.log_every and not metrics["skipped"] and step not in (start + 1, tcfg.steps):
            return
        now = time.time()
        tokens_per_sec = (step - last_log[0]) * tcfg.batch_size * tcfg.seq_len / (now - last_log[1])
        last_log = (step, now)
        loss = sum(interval_losses) / len(interval_losses) if interval_losses else metrics["loss"]
        interval_losses.clear()
        record = {"step": step, "loss": loss, "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
                  "tokens": step * tcfg.batch_size * tcfg.seq_len, "tokens_per_sec": tokens_per_sec,
                  "mfu": flops * tokens_per_sec / (peak * jax.device_count()) if peak else None,
                  "skipped": bool(metrics["skipped"])}
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{tokens_per_sec:.0f}")
        if main_process:
            log_metrics(tcfg.out_dir, record)

    pending = None
    for step in bar:
        state, metrics = train_step(state, to_device(next(loader)))
        if pending is not None:
            report(*pending)
        pending = (step + 1, metrics)
        done = step + 1
        if done % tcfg.eval_every == 0 or done == tcfg.steps:
            record = evaluate(done)
            if main_process:
                log_metrics(tcfg.out_dir, record)
                bar.write(" ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "step") + f" (step {done})")
        if done % tcfg.checkpoint_every == 0 or done == tcfg.steps or Stop.requested:
            save(done)
        if Stop.requested:
            if main_process:
                print(f"stop requested: saved step {done} in {tcfg.out_dir}, exiting")
            break
    if pending is not None:
        report(*pending)
    loader.close()
    if tcfg.sample_prompt and int(state["step"]) == tcfg.steps:
        import sample
        tok = loader.tokenizer
        prompt = [tok.bos_id] + tok.encode(tcfg.sample_prompt)
        out = sample.generate(state["params"], mcfg, prompt, 64, stop_tokens=(tok.eos_id,), vocab_size=tok.vocab_size)
        if main_process:
            print(f"sample: {tcfg.sample_prompt}{tok.decode(out)}")
    return state


def main(argv):
    if len(argv) < 1 or argv[0].startswith("--"):
        raise SystemExit("usage: python train.py CONFIG [--key=value ...] [--aot=TOPOLOGY]")
    aot = [a for a in argv[1:] if a.startswith("--aot=")]
    overrides = [a for a in argv[1:] if not a.startswith("--aot=")]
    tcfg = config.load(argv[0], overrides)
    if aot:
        import aot as aot_module
        return aot_module.compile_train_step(tcfg, aot[0].split("=", 1)[1])
    sharding.initialize_distributed()
    train(tcfg)


if __name__ == "__main__":
    main(sys.argv[1:])
