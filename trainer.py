"""The Lemur optimizer and schedule, the accumulated train step, and the loop that train.py, sft.py
and aot.py share.

The step: the global batch (batch_size rows of seq_len+1 tokens) arrives as `microbatches`
sequential chunks; one jitted, donated step scans over them summing loss and gradients (so k
microbatches give exactly the update of one big batch), clips the global gradient norm, and
applies Adam (b1 0.9, b2 0.95) with linear warmup to the peak lr and cosine decay to end_lr. A
non-finite loss or gradient skips the update. All collectives live in sharding.py.

The loop: resumes from the newest checkpoint in out_dir that verifies, logs one step late so the
host never waits on the device, evaluates each data source on held-out rows, checkpoints
atomically (checkpoint.py, with the run's tokenizer and the loop's own position), and on
SIGTERM/SIGINT (preemption) all processes agree on a step, save it and exit 0 (recovery.py).
"""
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import checkpoint
import config
import data
import generate
import model
import recovery
import sharding
import storage
import tracking
import weights

# peak dense bf16 FLOP/s per device, by jax's device_kind; unknown (e.g. a CPU) -> no MFU
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA H100 80GB HBM3": 989e12,
              "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12}


# ----------------------------------------------------------------------------- optimizer

def lr_schedule(cfg: config.TrainConfig):
    """Linear warmup from 0 to lr over warmup_steps, then cosine from lr to end_lr at `steps`."""
    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * step / max(cfg.warmup_steps, 1)
        progress = jnp.clip((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 0.0, 1.0)
        cosine = cfg.end_lr + 0.5 * (cfg.lr - cfg.end_lr) * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < cfg.warmup_steps, warm, cosine)
    return lr


def decay_mask(params):
    """Weight decay applies to matrices only, chosen by path (stacked norm scales are 2-D too)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "norm" not in jax.tree_util.keystr(path), params)


def make_optimizer(cfg: config.TrainConfig) -> optax.GradientTransformation:
    """Clip, Adam, optional decoupled weight decay (AdamW-style, scaled by the lr), lr schedule."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip), optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=1e-8)]
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    parts.append(optax.scale_by_learning_rate(lr_schedule(cfg)))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------- state and step

def state_structs(tx, mcfg: model.Config, mesh) -> dict:
    """ShapeDtypeStruct, with its sharding, of every leaf of the train state {params, opt_state,
    step}: Adam's moments are sharded like their params, its counters replicated. The target of a
    restore and the arguments of an ahead-of-time compile; nothing is allocated."""
    params = sharding.param_structs(mcfg, mesh)
    replicated = NamedSharding(mesh, P())
    struct = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
    opt_state = optax.tree_map_params(tx, lambda s, p: struct(s, p.sharding), jax.eval_shape(tx.init, params),
                                      params, transform_non_params=lambda s: struct(s, replicated))
    return {"params": params, "opt_state": opt_state, "step": struct(jax.ShapeDtypeStruct((), jnp.int32), replicated)}


def shardings_of(structs):
    return jax.tree.map(lambda s: s.sharding, structs)


def init_state(tx, mcfg: model.Config, mesh, key, params=None) -> dict:
    """A fresh train state, created already sharded (nothing whole on one device)."""
    shardings = shardings_of(state_structs(tx, mcfg, mesh))
    if params is None:
        params = sharding.init_params_sharded(mcfg, mesh, key)
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    return {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.int32(0), shardings["step"])}


def load_params(init_from: str, mcfg: model.Config, mesh):
    """Sharded params from "hf:DIR" (a Hugging Face Llama) or "ckpt:DIR" (a checkpoint or a run's
    out_dir); each process reads only the slices its devices hold."""
    kind, _, path = init_from.partition(":")

    def structs_of(saved_cfg):
        if model.math_of(saved_cfg) != model.math_of(mcfg):
            raise ValueError(f"{init_from}: the saved model {saved_cfg} is not the configured {mcfg}")
        return sharding.param_structs(mcfg, mesh)
    return weights.read(path, structs_of, kind=kind)[0]


def stop_sharding(mesh):
    """The sharding of the stop flags a step takes: one flag per device, each process setting its own."""
    return NamedSharding(mesh, P(("data", "fsdp", "tensor")))


def stop_flags(mesh, requested: bool):
    """This process's stop request as the step's input: every device of this process gets the flag."""
    return jax.make_array_from_process_local_data(stop_sharding(mesh), np.full(len(mesh.local_devices), requested))


def all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(cfg: config.TrainConfig, tx, mcfg: model.Config, mesh):
    """jitted step(state, batch, stop) -> (state, metrics); batch["tokens"] is (microbatches, rows,
    T+1), stop the stop_flags of every process. metrics["stop"] is whether any process asked to
    stop: computed inside the step, so every process reads the same answer with the step's other
    metrics, without a collective of its own."""
    shardings = shardings_of(state_structs(tx, mcfg, mesh))

    def step(state, batch, stop):
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
        # skip the update, keeping the old state, unless everything it would write is finite (a
        # finite loss and gradient can still overflow the params, e.g. at a huge learning rate)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_params) & all_finite(opt_state)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = {"params": keep(new_params, params), "opt_state": keep(opt_state, state["opt_state"]),
                     "step": state["step"] + 1}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(cfg)(state["step"]), "skipped": ~ok,
                   "stop": jnp.any(stop)}
        return new_state, metrics

    in_shardings = (shardings, sharding.batch_sharding(mesh, microbatched=True), stop_sharding(mesh))
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(shardings, None), donate_argnums=0)


def make_eval_step(mcfg: model.Config, mesh):
    """jitted (params, batch) -> (loss_sum, weight_sum), scanning microbatches like the step."""
    def evaluate(params, batch):
        def accumulate(carry, microbatch):
            l, w = sharding.loss_sum(params, microbatch, mcfg, mesh)
            return (carry[0] + l, carry[1] + w), None
        return jax.lax.scan(accumulate, (0.0, 0.0), batch)[0]
    return jax.jit(evaluate, in_shardings=(sharding.param_shardings(mcfg, mesh),
                                           sharding.batch_sharding(mesh, microbatched=True)))


# ----------------------------------------------------------------------------- the loop

def train(cfg: config.TrainConfig, mcfg: model.Config = None, make_loader=data.make_loader, init_params=None):
    """The loop. sft.py reuses it with its own model config (a grown vocabulary), loader (rows
    with loss weights) and initial params (a pretraining checkpoint): one loop in the project.
    make_loader(cfg, process_index, process_count) -> an object like data.Loader;
    init_params(mcfg, mesh) -> sharded params, used when out_dir has no checkpoint yet."""
    from tqdm import tqdm

    mcfg = mcfg or config.model_config(cfg)
    config.validate(cfg, mcfg, jax.device_count(), jax.process_count(), jax.devices()[0].platform)
    mesh = sharding.make_mesh(*cfg.mesh)
    tx = make_optimizer(cfg)
    main_process = jax.process_index() == 0
    state, reader, data_states = recovery.restore_newest(cfg.out_dir, state_structs(tx, mcfg, mesh), mcfg)
    storage.makedirs(cfg.out_dir)  # nothing is written before the checkpoint is known good
    if main_process:
        print(config.to_json(cfg))
        storage.write_bytes(storage.join(cfg.out_dir, "config.json"), config.to_json(cfg).encode())
        recovery.trim_metrics(cfg.out_dir, reader.meta["step"] if reader else 0)
    tracker = tracking.Tracker(cfg, reader.meta["step"] if reader else 0, main_process)

    def log(record):  # process 0: metrics.jsonl, then TensorBoard and W&B
        recovery.log_metrics(cfg.out_dir, record)
        tracker.log(record)

    loader = make_loader(cfg, jax.process_index(), jax.process_count())
    if loader.tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer has {loader.tokenizer.vocab_size} tokens, model {cfg.model} only {mcfg.vocab_size}")
    if reader:
        loader.restore(data.merge_states(data_states))
        if main_process:
            print(f"resumed from {reader.path}")
    else:
        params = None
        if init_params or cfg.init_from:
            params = init_params(mcfg, mesh) if init_params else load_params(cfg.init_from, mcfg, mesh)
        if params is not None and (bad := recovery.nonfinite_paths(params)):
            raise ValueError(f"{cfg.init_from}: non-finite values in {', '.join(bad[:4])}")
        state = init_state(tx, mcfg, mesh, jax.random.key(cfg.seed), params)

    train_step, eval_step = make_train_step(cfg, tx, mcfg, mesh), make_eval_step(mcfg, mesh)
    start = int(state["step"])
    peak = PEAK_FLOPS.get(jax.devices()[0].device_kind)
    flops = model.flops_per_token(mcfg, cfg.seq_len)
    to_device = lambda batch: sharding.global_batch(batch, mesh, cfg.microbatches)
    loop = reader.meta.get("loop", {}) if reader else {}  # the loop's own position at the checkpoint
    nonfinite, interval_losses = loop.get("nonfinite", 0), loop.get("interval_losses", [])
    recovery.Stop.install()

    def save(step):
        if bad := recovery.nonfinite_paths(state):  # cannot happen (such steps are skipped): never save it
            print(f"not saving step {step}: non-finite values in {', '.join(bad[:4])}")
            return
        meta = {"config": json.loads(config.to_json(cfg)), "model": dataclasses.asdict(mcfg), "seed": cfg.seed,
                "loop": {"nonfinite": nonfinite, "interval_losses": interval_losses}}
        if main_process:
            recovery.flush_metrics(cfg.out_dir)  # every record up to `step` is written before it commits
        checkpoint.save(cfg.out_dir, step, state, loader.state(), meta, cfg.keep_checkpoints, loader.tokenizer)

    def evaluate(step):
        record = {"step": step}
        for source, batches in loader.eval_batches(cfg.eval_batches).items():
            total, count = 0.0, 0.0
            for batch in batches:
                l, w = eval_step(state["params"], to_device(batch))
                total, count = total + float(l), count + float(w)
            if count:  # a source without held-out tokens has no eval loss (not a 0.0)
                record[f"eval/{source}"] = total / count
        return record

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not main_process)
    last_log = (start, time.time())

    def report(step, metrics) -> bool:
        """Log step `step`'s metrics (read one step late, so the device is already busy). The
        logged loss is the mean over the steps since the previous record: one batch is noisy.
        Returns whether any process asked to stop (the same answer on every process)."""
        nonlocal nonfinite, last_log
        metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
        nonfinite = nonfinite + 1 if metrics["skipped"] else 0
        if not metrics["skipped"]:
            interval_losses.append(metrics["loss"])
        if nonfinite >= cfg.max_nonfinite_steps:
            saved = checkpoint.committed(cfg.out_dir)
            where = (f"the newest checkpoint, {checkpoint.step_dir(cfg.out_dir, saved[-1])}, holds finite params"
                     if saved else f"no checkpoint has been saved in {cfg.out_dir}")
            raise SystemExit(f"stopping: {nonfinite} consecutive steps up to step {step} were not finite (loss, "
                             f"gradient, new params or optimizer state; their updates were skipped); {where}")
        if step % cfg.log_every and not metrics["skipped"] and step not in (1, cfg.steps):
            return metrics["stop"]
        now = time.time()
        tokens_per_sec = (step - last_log[0]) * cfg.batch_size * cfg.seq_len / (now - last_log[1])
        last_log = (step, now)
        loss = sum(interval_losses) / len(interval_losses) if interval_losses else metrics["loss"]
        interval_losses.clear()
        record = {"step": step, "loss": loss, "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
                  "tokens": step * cfg.batch_size * cfg.seq_len, "tokens_per_sec": tokens_per_sec,
                  "mfu": flops * tokens_per_sec / (peak * jax.device_count()) if peak else None,
                  "skipped": bool(metrics["skipped"])}
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{tokens_per_sec:.0f}")
        if main_process:
            log(record)
        return metrics["stop"]

    pending, stopping = None, False
    for step in bar:
        state, metrics = train_step(state, to_device(next(loader)), stop_flags(mesh, recovery.Stop.requested))
        if pending is not None:
            stopping = report(*pending)
        pending, done = (step + 1, metrics), step + 1
        evaluating = cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps)
        saving = done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping
        if evaluating or saving:  # this step's record first: a kill after the save must not lose it
            stopping = report(*pending) or stopping
            pending, saving = None, saving or stopping
        if evaluating:
            record = evaluate(done)
            if main_process and len(record) > 1:
                log(record)
                bar.write(" ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "step") + f" (step {done})")
        if saving:
            save(done)
        if stopping:
            if main_process:
                print(f"stop requested: saved step {done} in {cfg.out_dir}, exiting")
            break
    if pending is not None:
        report(*pending)
    if main_process:
        recovery.flush_metrics(cfg.out_dir)
    loader.close()
    tracker.close()
    if cfg.sample_prompt and int(state["step"]) == cfg.steps:
        tok = loader.tokenizer
        prompt = [tok.bos_id] + tok.encode(cfg.sample_prompt)
        out = generate.generate(state["params"], mcfg, prompt, 64, stop_tokens=(tok.eos_id,), vocab_size=tok.vocab_size)
        if main_process:
            print(f"sample: {cfg.sample_prompt}{tok.decode(out)}")
    return state
