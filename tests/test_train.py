"""train.py, train.py and checkpoint.py: the schedule, the step, and crash/preemption-proof resume."""
import dataclasses
import functools
import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from runs import HANG, MICRO, SLOW_FEED, losses, run, start, wait_for_step, write_config

import config
import model
import sharding
import train
from formats.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- schedule

def test_schedule_boundaries():
    """The Lemur schedule at its boundaries, against the formula written out by hand."""
    tcfg = config.load(os.path.join(ROOT, "configs/lemur70b.py"))
    assert (tcfg.steps, tcfg.warmup_steps, tcfg.lr, tcfg.end_lr) == (21458, 2000, 4e-5, 4e-6)
    assert tcfg.steps == round(90e9 / (tcfg.batch_size * tcfg.seq_len))
    lr = train.lr_schedule(tcfg)
    peak, end = 4e-5, 4e-6

    def expected(step):
        if step < 2000:
            return peak * step / 2000
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (step - 2000) / (21458 - 2000)))

    # optax computes in fp32 as peak - peak * (1 - step / warmup): rounding of the order of fp32's
    # epsilon times the peak, which is what the absolute tolerance allows
    for step, value in [(0, 0.0), (1, 2e-8), (1000, 2e-5), (2000, peak), (2001, None), (11729, (peak + end) / 2), (21458, end)]:
        np.testing.assert_allclose(float(lr(step)), expected(step), rtol=1e-5, atol=peak * 2 ** -20)
        if value is not None:
            np.testing.assert_allclose(float(lr(step)), value, rtol=1e-5, atol=peak * 2 ** -20)


def test_weight_decay_by_path():
    params = jax.eval_shape(lambda: model.init_params(MICRO, jax.random.key(0)))
    mask = train.decay_mask(params)
    assert mask["layers"]["wq"] and mask["embed"] and mask["output"]
    assert not mask["layers"]["attn_norm"] and not mask["layers"]["mlp_norm"] and not mask["norm"]


# ----------------------------------------------------------------------------- the step

def _step_setup(microbatches, mesh_shape=(2, 2, 2), lr=1e-2):
    tcfg = config.TrainConfig(model=MICRO, batch_size=16, seq_len=32, microbatches=microbatches,
                              mesh=mesh_shape, lr=lr, warmup_steps=0, steps=10)
    mesh = sharding.make_mesh(*mesh_shape)
    tx = train.make_optimizer(tcfg)
    state = train.init_state(tx, MICRO, mesh, jax.random.key(0))
    return tcfg, mesh, state, train.make_train_step(tcfg, tx, MICRO, mesh)


def _batch(mesh, microbatches, weights=None):
    tokens = np.random.default_rng(0).integers(0, MICRO.vocab_size, (16, 33), dtype=np.int32)
    batch = {"tokens": tokens} if weights is None else {"tokens": tokens, "weights": weights}
    return sharding.global_batch(batch, mesh, microbatches)


# a loss mask whose microbatches hold different numbers of weighted tokens (as SFT's masks do):
# rows keep 10% ... 95% of their targets, so the 4 microbatches of 4 rows carry ~1/6 ... ~1/3 each
UNEVEN_WEIGHTS = (np.random.default_rng(1).random((16, 32)) < np.linspace(0.1, 0.95, 16)[:, None]).astype(np.float32)


def step_results(microbatches):
    """(Adam's first moment, metrics) after one step on the same 16 weighted rows, split into
    `microbatches`. After one step the first moment is (1 - b1) x the clipped gradient: the
    accumulated gradient itself, where the params would only show Adam's ~lr * sign(g)."""
    tcfg, mesh, state, step = _step_setup(microbatches)
    state, metrics = step(state, _batch(mesh, microbatches, UNEVEN_WEIGHTS), train.stop_flags(mesh, False))
    return jax.device_get(optax.tree_utils.tree_get(state["opt_state"], "mu")), jax.device_get(metrics)


def assert_same_step(one, many):
    np.testing.assert_allclose(one[1]["loss"], many[1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(one[1]["grad_norm"], many[1]["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one[0]), jax.tree.leaves(many[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())


@functools.cache
def one_batch_step():
    return step_results(1)  # one microbatch: a mean of means is the mean, so the guard below shares it


def test_microbatched_step_equals_one_batch():
    assert_same_step(one_batch_step(), step_results(4))


def test_microbatch_check_catches_a_mean_of_means(monkeypatch):
    """Guard: averaging each microbatch on its own (then averaging the averages) is not the big
    batch's mean when microbatches hold different numbers of weighted tokens; the check sees it."""
    summed = sharding.loss_sum_and_grad

    def normalised_per_microbatch(params, batch, cfg, mesh):
        (loss, weight), grads = summed(params, batch, cfg, mesh)
        return (loss / weight, 1.0), jax.tree.map(lambda g: g / weight, grads)

    monkeypatch.setattr(sharding, "loss_sum_and_grad", normalised_per_microbatch)
    with pytest.raises(AssertionError):
        assert_same_step(one_batch_step(), step_results(4))


def test_nonfinite_loss_skips_update():
    tcfg, mesh, state, step = _step_setup(2)
    before = jax.device_get(state)
    weights = np.ones((16, 32), np.float32)
    weights[3, 5] = np.nan  # one poisoned token in one microbatch
    state, metrics = step(state, _batch(mesh, 2, weights), train.stop_flags(mesh, False))
    assert bool(metrics["skipped"]) and not np.isfinite(float(metrics["loss"]))
    assert int(state["step"]) == 1
    for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(jax.device_get(state["params"]))):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, _batch(mesh, 2), train.stop_flags(mesh, False))  # the next good batch trains normally
    assert not bool(metrics["skipped"])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 1e39 as float32, the point of the test
def test_an_update_that_overflows_the_params_is_skipped():
    """lr=1e39 is finite for Python but not for float32: the update makes every param infinite
    while the loss and gradient are finite. The step must keep the old state."""
    tcfg, mesh, state, step = _step_setup(1, lr=1e39)
    before = jax.device_get(state["params"])
    state, metrics = step(state, _batch(mesh, 1), train.stop_flags(mesh, False))
    assert bool(metrics["skipped"]) and np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state["params"]))):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- config errors

def test_bad_config_values_fail_before_compile(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'stpes'.*valid keys"):
        config.load(os.path.join(ROOT, "configs/tiny.py"), ["--stpes=3"])
    with pytest.raises(ValueError, match="--steps='many'"):
        config.load(os.path.join(ROOT, "configs/tiny.py"), ["--steps=many"])
    tcfg = config.load(os.path.join(ROOT, "configs/tiny.py"))
    mcfg = config.model_config(tcfg)
    with pytest.raises(ValueError, match=r"mesh=\(1, 4, 4\).*needs 16 devices.*has 8"):
        config.validate(dataclasses.replace(tcfg, mesh=(1, 4, 4)), mcfg, 8)
    with pytest.raises(ValueError, match=f"batch_size={tcfg.batch_size} is not divisible by microbatches=3"):
        config.validate(dataclasses.replace(tcfg, mesh=(1, 2, 4), microbatches=3), mcfg, 8)
    with pytest.raises(ValueError, match="init_from"):
        config.validate(dataclasses.replace(tcfg, mesh=(1, 2, 4), init_from="/some/dir"), mcfg, 8)


@pytest.mark.parametrize("key, value, message", [
    ("lr", -1e-4, "lr=-0.0001 must be a finite number >= 0"), ("lr", float("nan"), "lr=nan must be a finite"),
    ("end_lr", float("inf"), "end_lr=inf must be a finite"), ("weight_decay", -0.1, "weight_decay=-0.1"),
    ("b1", 1.0, "b1=1.0 must lie in"), ("b2", -0.5, "b2=-0.5 must lie in"), ("grad_clip", 0.0, "grad_clip=0.0"),
    ("eval_every", -1, "eval_every=-1 must be positive, or 0"), ("eval_batches", 0, "eval_batches=0 must be positive"),
    ("keep_checkpoints", 0, "keep_checkpoints=0 must be positive"), ("max_nonfinite_steps", 0, "max_nonfinite_steps=0"),
    ("bad_records", "ignore", "bad_records='ignore'"), ("model", dataclasses.replace(MICRO, dtype="int8"), "dtype='int8'"),
    ("model", dataclasses.replace(MICRO, remat="some"), "remat='some'"),
    ("model", dataclasses.replace(MICRO, n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),
])
def test_values_that_cannot_be_right_are_refused_by_key(key, value, message):
    tcfg = dataclasses.replace(config.TrainConfig(model=MICRO, batch_size=8, seq_len=32, steps=10, warmup_steps=2,
                                                  mesh=(2, 2, 2)), **{key: value})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.validate(tcfg, config.model_config(tcfg), 8)
    config.validate(dataclasses.replace(tcfg, **{key: getattr(config.TrainConfig(model=MICRO), key)}), MICRO, 8)


# ----------------------------------------------------------------------------- crash, preemption, resume

def test_sigterm_saves_and_exits_zero(corpus, tmp_path):
    out_dir = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.py", corpus, out_dir, checkpoint_every=1000)
    proc = start(cfg, code=SLOW_FEED)
    wait_for_step(out_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=HANG)
    assert proc.returncode == 0, out
    from formats import checkpoint
    saved = checkpoint.committed(str(out_dir))
    assert len(saved) == 1 and 3 <= saved[0] < 16, (saved, out)


def test_resume_on_another_mesh(corpus, reference, tmp_path):
    """A checkpoint of a (1, 2, 2) run restored onto (2, 2, 2) with 8 devices and 2 microbatches."""
    import shutil

    from formats import checkpoint
    ref_dir, ref = reference
    out_dir = tmp_path / "out"
    os.makedirs(out_dir)
    shutil.copytree(checkpoint.step_dir(str(ref_dir), 8), checkpoint.step_dir(str(out_dir), 8))
    rc, out = run(write_config(tmp_path / "cfg.py", corpus, out_dir, mesh=(2, 2, 2)), 8)
    assert rc == 0 and "resumed from" in out, out
    resumed = losses(out_dir)
    assert sorted(resumed) == list(range(9, 17))
    np.testing.assert_allclose([resumed[s] for s in range(9, 17)], [ref[s] for s in range(9, 17)], rtol=1e-5)


def test_export_checkpoint_to_hf(reference, tmp_path):
    """python -m tools.convert OUT_DIR HF_DIR: transformers runs the exported model to our logits."""
    import torch
    import transformers

    from formats import checkpoint, hf
    from tools import convert
    convert.main([str(reference[0]), str(tmp_path), "--dtype=float32"])
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    reader = checkpoint.Reader(checkpoint.step_dir(str(reference[0]), 16))
    tok, text = reader.tokenizer(), "alpha beta gamma"  # the run's tokenizer goes along, read alike
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).encode(text) == [tok.bos_id] + tok.encode(text)
    params = {"embed": None, "norm": None, "output": None, "layers": {}}
    for key, _ in hf.flatten(model.param_shapes(MICRO)):
        *parent, leaf = key.split("/")
        (params["layers"] if parent else params)[leaf] = jnp.asarray(reader.read("params/" + key))
    tokens = np.arange(20)[None] * 7 % MICRO.vocab_size
    with torch.no_grad():
        expected = theirs(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.forward(params, jnp.asarray(tokens), MICRO), expected, atol=1e-4)


def test_export_refuses_a_non_empty_target_and_replaces_only_an_exports_files(reference, tmp_path, capsys):
    """An earlier export's index and shards must not outlive a new export (loaders would read the
    old weights through the stale index); other files stay."""
    from formats import hf
    from tools import convert
    old = model.init_params(MICRO, jax.random.key(5))
    hf.save_hf(old, MICRO, str(tmp_path), dtype="float32", max_shard_bytes=60_000)  # sharded, with an index
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        convert.main([str(reference[0]), str(tmp_path)])
    err = capsys.readouterr().err
    assert f"{tmp_path} is not empty" in err and "pass --force" in err
    with pytest.raises(SystemExit):
        convert.main([str(reference[0]), str(tmp_path / "new"), "--dtype=int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    convert.main([str(reference[0]), str(tmp_path), "--dtype=float32", "--force"])
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "notes.txt", "tokenizer.model",
                                            "tokenizer_config.json"]
    _, loaded = hf.load_hf(str(tmp_path))
    from formats import checkpoint
    saved = checkpoint.Reader(checkpoint.step_dir(str(reference[0]), 16))
    np.testing.assert_array_equal(np.asarray(loaded["layers"]["wq"]), saved.read("params/layers/wq"))


def test_init_from_hf_and_checkpoint(reference, tmp_path):
    """init_from="hf:DIR" / "ckpt:DIR" load straight into the sharded params of the configured mesh."""
    from formats import checkpoint, hf
    mesh = sharding.make_mesh(2, 2, 2)
    params = model.init_params(MICRO, jax.random.key(7))
    hf.save_hf(params, MICRO, str(tmp_path), dtype="float32")
    from_ckpt = train.load_params(f"ckpt:{reference[0]}", MICRO, mesh)
    reader = checkpoint.Reader(checkpoint.latest(str(reference[0])))
    for source, expected in (("hf", params), ("ckpt", None)):
        loaded = train.load_params(f"hf:{tmp_path}", MICRO, mesh) if source == "hf" else from_ckpt
        shardings = dict(hf.flatten(sharding.param_shardings(MICRO, mesh)))
        for key, a in hf.flatten(loaded):
            assert a.sharding == shardings[key]
            want = hf.flatten(expected) if expected is not None else None
            want = dict(want)[key] if want else reader.read("params/" + key)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(want))
    with pytest.raises(ValueError, match="holds another model than the configured one"):
        train.load_params(f"hf:{tmp_path}", dataclasses.replace(MICRO, n_layers=3), mesh)


def unigram_entropy(sources, tokenizer) -> float:
    """Entropy (nats) of the token distribution of the training mixture: the loss of the best
    model that ignores context, mixing each source's token frequencies by its weight."""
    tok, total, mix = Tokenizer(tokenizer), sum(s.weight for s in sources), 0.0
    for src in sources:
        with open(src.paths[0], encoding="utf-8") as f:
            ids = np.concatenate([[tok.bos_id, *t, tok.eos_id] for t in
                                  tok.encode_batch([json.loads(line)[src.field] for line in f])])
        mix = mix + src.weight / total * np.bincount(ids, minlength=tok.vocab_size) / len(ids)
    return float(-(mix[mix > 0] * np.log(mix[mix > 0])).sum())


def test_tiny_run_learns(runs_dir):
    """The README's main job, shortened to 100 steps: python train.py configs/tiny.py on the demo
    corpus. Learning means: the mean loss of its last 30 steps is at most 0.75 of the first step's
    (about 7.0, uniform over 1024 tokens) and 0.5 nats below the unigram entropy of the training
    tokens (5.7 nats), which no model that ignores context can beat. About 4.7 is typical."""
    from formats import checkpoint, demo
    out_dir = runs_dir / "tiny"
    steps = ["--steps=100", "--warmup_steps=10", "--eval_every=50", "--checkpoint_every=50"]
    rc, out = run(os.path.join(ROOT, "configs/tiny.py"), 1, f"--out_dir={out_dir}", *steps, timeout=900)
    assert rc == 0, out[-3000:]
    log = losses(out_dir)
    final = np.mean([log[s] for s in (80, 90, 100)])  # records are 10-step means: the last 30 steps
    entropy = unigram_entropy(*demo.corpus(demo.cache_dir(str(out_dir))))
    assert final <= 0.75 * log[1] and final <= entropy - 0.5, (final, entropy, log)
    with open(out_dir / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "eval/code" in r]
    assert [r["step"] for r in evals] == [50, 100] and all("eval/text" in r for r in evals)
    assert checkpoint.committed(str(out_dir)) == [50, 100]
    assert f"sample: {config.load(os.path.join(ROOT, 'configs/tiny.py')).sample_prompt}" in out
