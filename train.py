"""Lemur continued pretraining: the paper's optimizer and schedule, the accumulated step, the loop.

    python train.py configs/tiny.py                          # the demo: a few minutes on a CPU
    python train.py configs/lemur70b.py                      # the paper's run: same command on every host
    python train.py configs/tiny.py --lr=1e-3 --mesh=1,4,2   # type-checked overrides (config.py)

Read top to bottom: the optimizer (Adam b1 0.9, b2 0.95, global-norm clip 1.0, linear warmup to the
peak lr then cosine decay to end_lr; the values live in the config file), the step, preemption,
then the loop. sft.py runs the same loop with chat rows; tools/aot.py compiles the same step for a
TPU slice.

The step: the global batch (batch_size rows of seq_len+1 tokens) arrives as `microbatches`
sequential chunks; one jitted, donated step scans over them summing loss and gradients (so k
microbatches give exactly the update of one big batch), divides once by the token count, clips,
and applies Adam. A non-finite loss, gradient or new state skips the update. All collectives live
in sharding.py.

The loop: resume from the newest checkpoint in out_dir that verifies (checkpoint.restore_newest),
then per step: train, log the previous step (read one step late, so the host never waits on the
device), evaluate each source on held-out rows, save (atomically, with the run's tokenizer and the
loop's own position), stop if preempted. On SIGTERM/SIGINT every process stops after the same step,
saves it and exits 0.
"""
import dataclasses
import json
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import config
import data
import decode
import model
import sharding
from formats import checkpoint, storage, tracking, weights

# ----------------------------------------------------------------------------- optimizer

def lr_schedule(cfg: config.TrainConfig):
    """Linear warmup from 0 to lr over warmup_steps, then cosine from lr to end_lr at `steps`.
    (optax needs a cosine of at least one step; with warmup_steps == steps it is never reached.)"""
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
                                              decay_steps=max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.end_lr)


def decay_mask(params):
    """Weight decay applies to matrices only, chosen by path (stacked norm scales are 2-D too)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "norm" not in jax.tree_util.keystr(path), params)


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
        checkpoint.check_same_model(saved_cfg, mcfg, init_from)
        return sharding.param_structs(mcfg, mesh)
    return weights.read(path, structs_of, kind=kind)[0]


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
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.stack(
            jax.tree.leaves(checkpoint.finite((new_params, opt_state)))))
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


# ----------------------------------------------------------------------------- preemption
# TPU VMs are preempted with SIGTERM, and on a pod the signal reaches the hosts at different
# moments. So a signal only sets this process's flag; the flags of all processes go into the next
# step as its input, the step reduces them, and every process reads the same `stop` from that
# step's metrics: all stop after the same step, save it and exit 0.

_stop_requested = False


def handle_stop_signals():
    def handler(signum, frame):
        global _stop_requested
        _stop_requested = True
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def stop_sharding(mesh):
    """The sharding of the stop flags a step takes: one flag per device, each process setting its own."""
    return NamedSharding(mesh, P(("data", "fsdp", "tensor")))


def stop_flags(mesh, requested: bool):
    """This process's stop request as the step's input: every device of this process gets the flag."""
    return jax.make_array_from_process_local_data(stop_sharding(mesh), np.full(len(mesh.local_devices), requested))


# ----------------------------------------------------------------------------- the loop

class Log:
    """The loop's record keeping, fed each step's metrics one step late: the mean loss over each
    logging interval (one batch is noisy), the count of consecutive skipped (non-finite) steps, the
    throughput clock. `position` is what a checkpoint keeps of it, so a resumed run logs exactly
    what an uninterrupted one does."""

    def __init__(self, cfg: config.TrainConfig, mcfg: model.Config, tracker, bar, start: int, position: dict):
        self.cfg, self.tracker, self.bar, self.main_process = cfg, tracker, bar, jax.process_index() == 0
        self.nonfinite, self.losses = position.get("nonfinite", 0), position.get("interval_losses", [])
        self.flops, self.peak = model.flops_per_token(mcfg, cfg.seq_len), sharding.PEAK_FLOPS.get(jax.devices()[0].device_kind)
        self.clock = (start, time.time())

    def position(self) -> dict:
        return {"nonfinite": self.nonfinite, "interval_losses": self.losses}

    def step(self, step: int, metrics) -> bool:
        """Take step `step`'s metrics (device arrays); write its record when it is due (every
        log_every steps, the first and last step, a skipped step). Returns whether any process
        asked to stop (the same answer on every process)."""
        cfg = self.cfg
        metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
        self.nonfinite = self.nonfinite + 1 if metrics["skipped"] else 0
        if not metrics["skipped"]:
            self.losses.append(metrics["loss"])
        if self.nonfinite >= cfg.max_nonfinite_steps:
            saved = checkpoint.committed(cfg.out_dir)
            where = (f"the newest checkpoint, {checkpoint.step_dir(cfg.out_dir, saved[-1])}, holds finite params"
                     if saved else f"no checkpoint has been saved in {cfg.out_dir}")
            raise SystemExit(f"stopping: {self.nonfinite} consecutive steps up to step {step} were not finite (loss, "
                             f"gradient, new params or optimizer state; their updates were skipped); {where}")
        if step % cfg.log_every and not metrics["skipped"] and step not in (1, cfg.steps):
            return metrics["stop"]
        now = time.time()
        tokens_per_sec = (step - self.clock[0]) * cfg.batch_size * cfg.seq_len / (now - self.clock[1])
        self.clock = (step, now)
        loss = sum(self.losses) / len(self.losses) if self.losses else metrics["loss"]
        self.losses.clear()
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{tokens_per_sec:.0f}")
        self.write({"step": step, "loss": loss, "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
                    "tokens": step * cfg.batch_size * cfg.seq_len, "tokens_per_sec": tokens_per_sec,
                    "mfu": self.flops * tokens_per_sec / (self.peak * jax.device_count()) if self.peak else None,
                    "skipped": bool(metrics["skipped"])})
        return metrics["stop"]

    def write(self, record: dict):
        """metrics.jsonl, then TensorBoard and W&B (process 0)."""
        if self.main_process:
            tracking.log_metrics(self.cfg.out_dir, record)
            self.tracker.log(record)


def start(cfg: config.TrainConfig, mcfg: model.Config, tx, mesh, make_loader, init_params):
    """(state, loader, checkpoint reader or None, history): the newest checkpoint of out_dir that
    verifies, with the loader moved to its position; else a fresh state from init_params, init_from
    or random. The data (tokenizer, sources, their first batch) is checked first, then the config
    against the checkpoint's, key by key (a refused key stops the run): nothing is written before.
    history: the checkpoint's record of changed settings, plus this start's changes at step + 1."""
    loader = make_loader(cfg, jax.process_index(), jax.process_count())
    if loader.tokenizer.vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer has {loader.tokenizer.vocab_size} tokens, model {cfg.model} only {mcfg.vocab_size}")
    loader.ready()  # a source that yields nothing fails now, not after config.json is written
    state, reader, data_states = checkpoint.restore_newest(cfg.out_dir, state_structs(tx, mcfg, mesh), mcfg, cfg)
    if reader:
        loader.restore(data.merge_states(data_states))
        changes = config.resume_changes(reader.meta.get("config", {}), reader.meta["model"], cfg, mcfg, reader.path)
        history = reader.meta.get("config_history", []) + ([{"step": int(state["step"]) + 1, "changes": changes}]
                                                           if changes else [])
        if jax.process_index() == 0:
            print(f"resumed from {reader.path}" + "".join(f"; {k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        return state, loader, reader, history
    params = None
    if init_params or cfg.init_from:
        params = init_params(mcfg, mesh) if init_params else load_params(cfg.init_from, mcfg, mesh)
    if params is not None and (bad := checkpoint.nonfinite_paths(params)):
        raise ValueError(f"{cfg.init_from}: non-finite values in {', '.join(bad[:4])}")
    return init_state(tx, mcfg, mesh, jax.random.key(cfg.seed), params), loader, None, []


def evaluate(eval_step, params, loader, cfg: config.TrainConfig, mesh, step: int) -> dict:
    """{"step", "eval/<source>": mean loss on its held-out rows} (a source without held-out tokens
    has no entry, not a 0.0)."""
    record = {"step": step}
    for source, batches in loader.eval_batches(cfg.eval_batches).items():
        total, count = 0.0, 0.0
        for batch in batches:
            l, w = eval_step(params, sharding.global_batch(batch, mesh, cfg.microbatches))
            total, count = total + float(l), count + float(w)
        if count:
            record[f"eval/{source}"] = total / count
    return record


def save(cfg: config.TrainConfig, mcfg: model.Config, step: int, state, loader, log: Log, history: list = ()):
    """An atomic checkpoint of `step`: the state (finite: the step never writes a non-finite one),
    every process's loader position, the loop's position, the run's tokenizer, the history of its
    changed settings; every metrics record up to `step` is written before it commits."""
    meta = {"config": json.loads(config.to_json(cfg)), "model": dataclasses.asdict(mcfg), "seed": cfg.seed,
            "loop": log.position(), "config_history": list(history)}
    if jax.process_index() == 0:
        tracking.flush_metrics(cfg.out_dir)
    checkpoint.save(cfg.out_dir, step, state, loader.state(), meta, cfg.keep_checkpoints, loader.tokenizer)


def sample(params, mcfg: model.Config, mesh, tokenizer, prompt: str):
    """The end-of-run greedy continuation of `prompt` (64 tokens), decoded as sample.py decodes, on
    the training mesh in decode.py's layout (tensor-parallel: leave sample_prompt empty where the
    model split over the tensor axis alone does not fit a device beside the train state)."""
    ids = decode.generate(decode.reshard(params, mcfg, mesh), mcfg, mesh,
                          [[tokenizer.bos_id] + tokenizer.encode(prompt)], 64,
                          stop_tokens=(tokenizer.eos_id,), vocab_size=tokenizer.vocab_size)[0]
    if jax.process_index() == 0:
        print(f"sample: {prompt}{tokenizer.decode(ids)}")


def train(cfg: config.TrainConfig, mcfg: model.Config = None, make_loader=data.make_loader, init_params=None):
    """The loop. sft.py reuses it with its own model config (a grown vocabulary), loader (rows
    with loss weights) and initial params (a pretraining checkpoint): one loop in the project.
    make_loader(cfg, process_index, process_count) -> an object like data.Loader;
    init_params(mcfg, mesh) -> sharded params, used when out_dir has no checkpoint yet."""
    mcfg = mcfg or config.model_config(cfg)
    config.validate(cfg, mcfg, jax.device_count(), jax.process_count(), jax.devices()[0].platform)
    mesh, tx, main_process = sharding.make_mesh(*cfg.mesh), make_optimizer(cfg), jax.process_index() == 0
    state, loader, reader, history = start(cfg, mcfg, tx, mesh, make_loader, init_params)
    first = int(state["step"])
    storage.makedirs(cfg.out_dir)  # nothing is written before every check has passed
    if main_process:
        print(config.to_json(cfg))
        run = {**json.loads(config.to_json(cfg)), "history": history}  # what the run uses, and since when
        storage.write_bytes(storage.join(cfg.out_dir, "config.json"), json.dumps(run, indent=2).encode())
        tracking.trim_metrics(cfg.out_dir, first)
        if history and history[-1]["step"] == first + 1:  # this start's changes, from the step they apply to
            tracking.log_metrics(cfg.out_dir, {"step": first + 1, "config_changes": history[-1]["changes"]})
    bar = tqdm(range(first, cfg.steps), initial=first, total=cfg.steps, disable=not main_process)
    log = Log(cfg, mcfg, tracking.Tracker(cfg, first, main_process), bar, first,
              reader.meta.get("loop", {}) if reader else {})
    train_step, eval_step = make_train_step(cfg, tx, mcfg, mesh), make_eval_step(mcfg, mesh)
    handle_stop_signals()

    pending, stop = None, False  # pending: (step, metrics) not yet logged
    saved = first if reader else None  # the newest step committed, for a stop on a storage failure
    try:
        for step in (s + 1 for s in bar):  # `step` counts the updates done once this one is
            batch = sharding.global_batch(next(loader), mesh, cfg.microbatches)
            state, metrics = train_step(state, batch, stop_flags(mesh, _stop_requested))
            if pending:
                stop = log.step(*pending) or stop
            pending = (step, metrics)
            evaluating = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
            saving = step % cfg.checkpoint_every == 0 or step == cfg.steps or stop
            if evaluating or saving:  # this step's record first: a kill after the save must not lose it
                stop = log.step(*pending) or stop
                pending, saving = None, saving or stop
            if evaluating:
                if len(record := evaluate(eval_step, state["params"], loader, cfg, mesh, step)) > 1:
                    log.write(record)
                    bar.write(" ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "step") + f" (step {step})")
            if saving:
                save(cfg, mcfg, step, state, loader, log, history)
                saved = step
            if stop:
                if main_process:
                    print(f"stop requested: saved step {step} in {cfg.out_dir}, exiting")
                break
    except OSError as e:  # storage out of reach after storage.py's retries, a full disk, ...
        log.tracker.abandon()  # its files live there too: no more writes, at exit neither
        where = (f"step {saved} is safely committed in {checkpoint.step_dir(cfg.out_dir, saved)}: run the same "
                 "command again to resume from it" if saved is not None else
                 f"no checkpoint was committed in {cfg.out_dir}: run the same command again to start over")
        raise SystemExit(f"stopping in step {step}: {' '.join(str(e).split())}; {where}") from e
    if pending:
        log.step(*pending)
    if main_process:
        tracking.flush_metrics(cfg.out_dir)
    loader.close()
    log.tracker.close()
    if cfg.sample_prompt and int(state["step"]) == cfg.steps:
        sample(state["params"], mcfg, mesh, loader.tokenizer, cfg.sample_prompt)
    return state


def main(argv):
    if len(argv) < 1 or argv[0].startswith("--"):
        raise SystemExit("usage: python train.py CONFIG [--key=value ...]")
    sharding.select_platforms()
    cfg = config.load(argv[0], argv[1:])
    sharding.initialize_distributed()
    train(cfg)


if __name__ == "__main__":
    config.command(main)
